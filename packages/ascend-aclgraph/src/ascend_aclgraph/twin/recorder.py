"""Recording aten ops for the CPU twin: what ran, on which storages, with which host values."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_aclgraph.capture_guard import check_capturable, user_frame
from ascend_aclgraph.errors import CaptureError
from ascend_aclgraph.twin.python_body import python_body_keys, run_python_body

__all__ = [
    "EMPTY_FACTORIES",
    "EMPTY_POISON_BYTE",
    "OpRecord",
    "Recorder",
    "freeze",
    "iter_tensors",
    "storage_bytes",
    "storage_key",
    "written_args",
]

# Bytes the twin fills fresh ``empty`` storages with at capture. Their contents are undefined,
# so any value is allowed; a known one lets the capture tell an output that nothing wrote (an
# attention output buffer of a piecewise graph, filled after it) from one written by code the
# twin cannot see (an inductor kernel).
EMPTY_POISON_BYTE = 0xA5

# Factories whose result holds undefined values until an op writes it.
EMPTY_FACTORIES = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
}


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over all of ``t``'s storage (made and used outside any dispatch mode)."""
    with torch._C._DisableTorchDispatch():
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


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


def freeze(value: Any) -> Any:
    """Copy host-side containers so later caller mutation cannot change what was recorded.

    This copy is what makes host arguments "baked into the graph", as on a device, and what
    makes an updatable task's rewrite a real change to the recorded op.
    """
    if isinstance(value, list):
        return [freeze(v) for v in value]
    if isinstance(value, tuple):
        return tuple(freeze(v) for v in value)
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
    extra: dict[str, Any] = field(default_factory=dict)

    def read_tensors(self) -> Iterator[torch.Tensor]:
        yield from iter_tensors(self.args)
        yield from iter_tensors(self.kwargs)

    def computes(self) -> bool:
        """Whether replaying the op writes memory (views only alias; ``empty`` is undefined)."""
        if self.func._schema.name in EMPTY_FACTORIES and not self.written:
            return False  # contents of `empty` are undefined; nothing to recompute
        return bool(self.fresh or self.written)


@functools.cache
def _written_positions(func: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    # Cached: reading a schema from Python builds its argument objects anew each time.
    return tuple(
        (i, arg.name)
        for i, arg in enumerate(func._schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    )


def written_args(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> list[torch.Tensor]:
    """The tensor arguments ``func`` writes, per its schema's alias annotations."""
    written: list[torch.Tensor] = []
    for i, name in _written_positions(func):
        value = kwargs[name] if name in kwargs else (args[i] if i < len(args) else None)
        written.extend(iter_tensors(value))
    return written


# The twin captures CPU tensors: a Python-bodied op with no tensor argument runs its CPU body.
_CPU = torch.device("cpu")


class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Run every op for real and keep an :class:`OpRecord` of it.

    Ops are refused (``CaptureError``) when they read tensor data on the host or produce
    data-dependent shapes, since a device graph cannot contain them.

    Custom ops with a Python body (see :mod:`.python_body`) are not recorded themselves: their
    body runs with the recorder active, so the ops it calls are checked and recorded, and host
    values it reads (globals, a forward context) are baked in as a device graph bakes them. An
    updatable task is no exception: :meth:`run_task` returns its recorded ops, the task's
    segment, which an update replaces by recording the body again (see :mod:`.segment`).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.records: list[OpRecord] = []
        # Storages created by recorded ops (everything else is external: inputs, weights, caches).
        self.internal: dict[int, torch.UntypedStorage] = {}
        # While run_task waits for its op: the op, then whether it reached this mode as itself.
        self._task_op: torch._ops.OpOverload | None = None
        self._task_reached = False
        self.in_task = False

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self._task_op is not None:
            self._task_reached = func is self._task_op
            self._task_op = None
        keys = python_body_keys(func, args, kwargs, _CPU)
        if keys is not None:
            return run_python_body(self, func, keys, args, kwargs)
        check_capturable(func, args, kwargs)
        for t in iter_tensors(args):
            if t.layout is not torch.strided:
                raise CaptureError(
                    f"cannot capture {func} at {user_frame()}: the cpu twin records strided "
                    f"tensors only, got layout {t.layout}"
                )
        return self._record(func, args, kwargs)

    def run_task(
        self, op: Any, args: Sequence[Any], kwargs: dict[str, Any], what: str
    ) -> tuple[Any, list[OpRecord]]:
        """Run updatable task ``op`` (named ``what`` in errors): its result, and its records.

        The records are the task's segment: the op itself if its kernel is C++, else the ops of
        its Python body. A task must reach the dispatcher as itself; a composite decomposes
        before any dispatch mode sees it, leaving no operator to rewrite.
        """
        if self.in_task:
            raise CaptureError(
                f"{what} at {user_frame()} runs inside another updatable task's op; an update "
                "re-records the outer task's body, so only the outer op can be updatable"
            )
        before = len(self.records)
        self._task_op, self._task_reached = op, False
        self.in_task = True
        try:
            result = op(*args, **kwargs)
        finally:
            self._task_op = None
            self.in_task = False
        recorded = self.records[before:]
        if not self._task_reached:
            names = ", ".join(str(rec.func) for rec in recorded) or "none"
            raise CaptureError(
                f"{what} dispatched {len(recorded)} operator(s) ({names}) without reaching the "
                "dispatcher as itself; an updatable op must be a single operator (an aten op or "
                "a torch.library custom op, not a composite that decomposes), since that "
                "operator is the task whose arguments get rewritten"
            )
        return result, recorded

    def _record(
        self, func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        input_keys = {storage_key(t) for t in iter_tensors((args, kwargs))}
        result = func(*args, **kwargs)
        outputs = list(iter_tensors(result))
        fresh: list[int] = []
        for i, out in enumerate(outputs):
            key = storage_key(out)
            if key not in input_keys and key not in self.internal:
                self.internal[key] = out.untyped_storage()
                fresh.append(i)
        if func._schema.name in EMPTY_FACTORIES:
            for i in fresh:
                storage_bytes(outputs[i]).fill_(EMPTY_POISON_BYTE)
        self.records.append(
            OpRecord(
                func=func,
                args=freeze(args),
                kwargs={k: freeze(v) for k, v in kwargs.items()},
                outputs=outputs,
                fresh=fresh,
                written=written_args(func, args, kwargs),
                extra={"result_paths": list(_tensor_paths(result))},
            )
        )
        return result
