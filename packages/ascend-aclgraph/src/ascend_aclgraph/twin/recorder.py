"""Recording aten ops for the CPU twin: what ran, on which storages, with which host values."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_aclgraph.capture_guard import check_capturable, user_frame
from ascend_aclgraph.errors import CaptureError
from ascend_aclgraph.twin.python_body import has_python_body

__all__ = ["OpRecord", "Recorder", "iter_tensors", "storage_key"]


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage behind ``t`` (the StorageImpl address, stable while alive)."""
    return int(t.untyped_storage()._cdata)


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a (nested) argument or result structure."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


def _tensor_paths(value: Any, prefix: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    """Index paths of the tensors in a result, in :func:`iter_tensors` order."""
    if isinstance(value, torch.Tensor):
        yield prefix
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensor_paths(item, (*prefix, i))


def _freeze(value: Any) -> Any:
    """Copy host-side containers so later caller mutation cannot change what was recorded.

    This copy is what makes host arguments "baked into the graph", as on a device, and what
    makes an updatable task's rewrite a real change to the recorded op.
    """
    if isinstance(value, list):
        return [_freeze(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(eq=False, slots=True)
class OpRecord:
    """One operator call seen during capture."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # Flat list of the tensors the op returned, in return order.
    outputs: list[torch.Tensor]
    # Indices into ``outputs`` of tensors on storages this op created (not aliases of inputs).
    fresh: list[int]
    # Tensor arguments the op writes to (per its schema's alias annotations).
    written: list[torch.Tensor]
    location: str = ""
    # Set for updatable tasks: codegen then reads args/kwargs from the record at each replay.
    updatable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def read_tensors(self) -> Iterator[torch.Tensor]:
        yield from iter_tensors(self.args)
        yield from iter_tensors(self.kwargs)


def _written_args(
    func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[torch.Tensor]:
    written: list[torch.Tensor] = []
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = kwargs[arg.name] if arg.name in kwargs else (args[i] if i < len(args) else None)
        written.extend(iter_tensors(value))
    return written


# Where a Python-bodied custom op's body runs: the twin captures CPU tensors only.
_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Run every op for real and keep an :class:`OpRecord` of it.

    Ops are refused (``CaptureError``) when they read tensor data on the host or produce
    data-dependent shapes, since a device graph cannot contain them.

    Custom ops with a Python body (see :mod:`.python_body`) are not recorded themselves: their
    body runs with the recorder active, so the ops it calls are checked and recorded, and host
    values it reads (globals, a forward context) are baked in as a device graph bakes them. An
    updatable task is the exception: it stays one recorded op, whose body replays with the
    task's current arguments, as a device task update re-issues the op.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.records: list[OpRecord] = []
        # Storages created by recorded ops (everything else is external: inputs, weights, caches).
        self.internal: dict[int, torch.UntypedStorage] = {}
        self._next_updatable = False
        # Non-zero while the body of an updatable task runs: its ops are checked, not recorded.
        self._checking_only = 0

    def expect_updatable(self) -> None:
        """Mark the next recorded op as an updatable task."""
        self._next_updatable = True

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        updatable = self._next_updatable
        self._next_updatable = False
        python_body = has_python_body(func)
        if python_body and not updatable:
            return self._run_body(func, args, kwargs)
        check_capturable(func, args, kwargs)
        for t in iter_tensors(args):
            if t.layout is not torch.strided:
                raise CaptureError(
                    f"cannot capture {func} at {user_frame()}: the cpu twin records strided "
                    f"tensors only, got layout {t.layout}"
                )
        if self._checking_only:
            return func(*args, **kwargs)
        if not python_body:
            return self._record(func, args, kwargs, updatable=updatable, run_body=False)
        self._checking_only += 1
        try:
            return self._record(func, args, kwargs, updatable=True, run_body=True)
        finally:
            self._checking_only -= 1

    def _run_body(
        self, func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # Straight to the CPU kernel, below this mode, with this mode pushed again: the ops the
        # Python body calls dispatch back here. (Calling ``func`` with the mode popped, as for
        # any other op, would run the body unseen.)
        with self:
            return func.redispatch(_CPU_KERNEL, *args, **kwargs)

    def _record(
        self,
        func: torch._ops.OpOverload,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        updatable: bool,
        run_body: bool,
    ) -> Any:
        input_keys = {storage_key(t) for t in iter_tensors((args, kwargs))}
        result = self._run_body(func, args, kwargs) if run_body else func(*args, **kwargs)
        outputs = list(iter_tensors(result))
        fresh: list[int] = []
        for i, out in enumerate(outputs):
            key = storage_key(out)
            if key not in input_keys and key not in self.internal:
                self.internal[key] = out.untyped_storage()
                fresh.append(i)
        self.records.append(
            OpRecord(
                func=func,
                args=_freeze(args),
                kwargs={k: _freeze(v) for k, v in kwargs.items()},
                outputs=outputs,
                fresh=fresh,
                written=_written_args(func, args, kwargs),
                updatable=updatable,
                extra={"result_paths": list(_tensor_paths(result))},
            )
        )
        return result
