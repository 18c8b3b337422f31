"""Updatable tasks: captured ops whose host-side arguments are rewritten for each replay.

On an NPU, attention kernels such as ``npu_fused_infer_attention_score`` take the sequence
lengths as host ``int[]`` arguments. The host computes the kernel's tiling from them at launch,
so a captured graph replays with the lengths of the step it was captured on. Copying new values
into static *device* buffers cannot fix that. ACL graphs solve it with task groups: the op is
captured inside ``graph_task_group_begin/end`` and, before each replay, re-issued with new
arguments between ``graph_task_update_begin/end`` on an update stream, which rewrites the task
in place.

This module is the device-generic face of that mechanism::

    out = ascend_aclgraph.updatable(attention_op, q, k, v, seq_lens=lens)   # inside the model
    ...
    graph.replay({task: {"seq_lens": new_lens} for task in graph.tasks})    # each step
    # or: task.update(seq_lens=new_lens) for each task, then graph.replay()

Outside a capture, :func:`updatable` simply calls the op. Tensor arguments of an update are
copied into the captured tensor at once (the device-buffer way, valid on every backend: the
copy is queued on the current stream, ahead of the next replay). Host values are *staged* and
applied by the next :meth:`~ascend_aclgraph.backends.Graph.replay`, in the order the device
needs: on the NPU after the replay is enqueued (the graph waits at each task's event while the
task is rewritten on the update stream; rewriting earlier would race the previous replay), on
the CPU twin when its replay reaches the task. CUDA graphs cannot rewrite a task at all, so
staging a host value there raises (pass the value as a device tensor instead).

A rewrite re-issues the op: its Python body, if it has one, runs again on the host with the new
arguments and reads host state (a forward context) as it is then. Between rewrites the task
replays what the capture, or the last rewrite, computed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ascend_aclgraph.errors import TaskUpdateError

if TYPE_CHECKING:
    from ascend_aclgraph.backends.base import Graph

__all__ = [
    "UpdatableTask",
    "capturing_into",
    "current_capture",
    "declare_host_tensor_arguments",
    "task_overrides",
    "updatable",
]

_state = threading.local()

# op -> names of its tensor arguments that are host-side data (see declare_host_tensor_arguments).
_HOST_TENSOR_ARGUMENTS: dict[Any, frozenset[str]] = {}


def declare_host_tensor_arguments(op: Callable[..., Any], *names: str) -> None:
    """Declare tensor arguments of ``op`` that carry host-side launch data, not device buffers.

    Some kernels take their tiling or work partition as a host tensor computed for each step
    (vLLM's CPU attention takes ``scheduler_metadata``, whose size depends on the sequence
    lengths). For an updatable task such an argument is a host value: an update replaces the
    tensor itself, of any shape, and the task is rewritten with it, exactly as an ``int[]``
    of sequence lengths is on the NPU. Other tensor arguments are device buffers, updated by
    copying into the captured tensor.
    """
    known = _argument_names(op)
    unknown = [n for n in names if known is not None and n not in known]
    if unknown:
        raise TaskUpdateError(
            f"{getattr(op, '__name__', op)!s} has no argument(s) {unknown}; its arguments are: "
            f"{', '.join(known or [])}"
        )
    _HOST_TENSOR_ARGUMENTS[op] = _HOST_TENSOR_ARGUMENTS.get(op, frozenset()) | frozenset(names)


def current_capture() -> Graph | None:
    """The graph this thread is capturing into, if any."""
    return getattr(_state, "graph", None)


@contextlib.contextmanager
def capturing_into(graph: Graph) -> Iterator[None]:
    previous = current_capture()
    _state.graph = graph
    try:
        yield
    finally:
        _state.graph = previous


@contextlib.contextmanager
def task_overrides(values: dict[str, Any]) -> Iterator[None]:
    """Within the block, :func:`updatable` calls take these keyword values instead of their own.

    This keeps the eager fallback path and the graph path in step: a caller that rewrites
    ``seq_lens`` of every task before a replay gets the same values applied when the batch runs
    eagerly instead.
    """
    previous = getattr(_state, "overrides", None)
    _state.overrides = {**(previous or {}), **values}
    try:
        yield
    finally:
        _state.overrides = previous


def _argument_names(op: Callable[..., Any]) -> list[str] | None:
    schema = getattr(op, "_schema", None)
    if schema is None:
        packet_default = getattr(op, "default", None)
        schema = getattr(packet_default, "_schema", None)
    if schema is None:
        return None
    return [a.name for a in schema.arguments]


class UpdatableTask:
    """One captured op call whose arguments can be changed between replays."""

    def __init__(
        self, op: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.op = op
        self.args = args
        self.kwargs = dict(kwargs)
        self.arg_names = _argument_names(op)
        self.host_tensor_args = _HOST_TENSOR_ARGUMENTS.get(op, frozenset())
        # Backend-specific state: the twin's task segment, the NPU task-group handle and event.
        self.handle: Any = None
        self.event: Any = None
        # Host-side changes staged by update(), applied (then cleared) by the next replay.
        self.pending: dict[str, Any] = {}

    def current(self, name: str) -> Any:
        """The value argument ``name`` has in the graph: as captured, or as a replay last set it.

        Changes staged since the last replay are in :attr:`pending` until the next one.
        """
        if name in self.kwargs:
            return self.kwargs[name]
        if self.arg_names is not None and name in self.arg_names:
            pos = self.arg_names.index(name)
            if pos < len(self.args):
                return self.args[pos]
        raise TaskUpdateError(
            f"{self.describe()} has no argument {name!r}; its arguments are: "
            f"{', '.join(self.known_names())}"
        )

    def known_names(self) -> list[str]:
        if self.arg_names is not None:
            return list(self.arg_names)
        return sorted(self.kwargs)

    def describe(self) -> str:
        return f"updatable task {getattr(self.op, '__name__', self.op)!s}"

    def update(self, **changes: Any) -> None:
        """Change arguments for the next replay of this task's graph.

        Tensors are copied into the captured tensor now (same shape and dtype required). Host
        values (ints, floats, lists) are staged in :attr:`pending`; the next replay has the
        backend rewrite the captured task with them, in its device's order (see the module
        docstring). Staging twice before a replay keeps the latest value per argument.
        """
        if current_capture() is not None:
            raise TaskUpdateError("tasks cannot be updated while a graph is being captured")
        host_changes: dict[str, Any] = {}
        for name, value in changes.items():
            old = self.current(name)
            if name in self.host_tensor_args:
                if not isinstance(value, torch.Tensor):
                    raise TaskUpdateError(
                        f"argument {name!r} of {self.describe()} is host-side data held in a "
                        f"tensor; update it with a tensor, got {type(value).__name__}"
                    )
                host_changes[name] = value
            elif isinstance(old, torch.Tensor):
                if not isinstance(value, torch.Tensor):
                    raise TaskUpdateError(
                        f"argument {name!r} of {self.describe()} was captured as a tensor; "
                        f"update it with a tensor of shape {tuple(old.shape)}, "
                        f"got {type(value).__name__}"
                    )
                if value.shape != old.shape or value.dtype != old.dtype:
                    raise TaskUpdateError(
                        f"argument {name!r} of {self.describe()} was captured as "
                        f"{tuple(old.shape)}/{old.dtype}; got {tuple(value.shape)}/{value.dtype}"
                    )
                old.copy_(value)
            else:
                if isinstance(value, torch.Tensor):
                    raise TaskUpdateError(
                        f"argument {name!r} of {self.describe()} is a host value; give a "
                        f"{type(old).__name__}, not a tensor"
                    )
                if isinstance(old, (list, tuple)) and (
                    not isinstance(value, (list, tuple)) or len(value) != len(old)
                ):
                    raise TaskUpdateError(
                        f"argument {name!r} of {self.describe()} was captured with "
                        f"{len(old)} values; an update must keep that length (pad the batch), "
                        f"got {value!r}"
                    )
                host_changes[name] = value
        if host_changes:
            # Refused here rather than at replay, so the error points at the caller's update.
            self.graph.backend.check_host_update(self, host_changes)
            self.pending.update(host_changes)

    def _applied(self) -> None:
        """Called by a replay that rewrote the captured task with :attr:`pending`."""
        for name, value in self.pending.items():
            self._store(name, value)
        self.pending.clear()

    def _store(self, name: str, value: Any) -> None:
        self.args, self.kwargs = self._with_changes(self.args, self.kwargs, {name: value})

    def _with_changes(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], changes: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``args`` and ``kwargs`` of a call of this task's op, with ``changes`` by name.

        A change goes where the argument was passed: positionally if it was, else by keyword.
        """
        args_list = list(args)
        kwargs = dict(kwargs)
        for name, value in changes.items():
            if name in kwargs or self.arg_names is None:
                kwargs[name] = value
                continue
            pos = self.arg_names.index(name)
            if pos < len(args_list):
                args_list[pos] = value
            else:
                kwargs[name] = value
        return tuple(args_list), kwargs

    graph: Graph


def updatable(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``op``; inside a capture, capture it as an :class:`UpdatableTask` of that graph.

    ``op`` must dispatch as a single operator (an aten op, or a custom op registered with
    ``torch.library``), because that operator is the task that gets rewritten.
    """
    overrides = getattr(_state, "overrides", None)
    if overrides:
        names = _argument_names(op)
        kwargs = dict(kwargs)
        for name, value in overrides.items():
            if name in kwargs:
                kwargs[name] = value
            elif names is not None and name in names and names.index(name) < len(args):
                pos = names.index(name)
                args = (*args[:pos], value, *args[pos + 1 :])
    graph = current_capture()
    if graph is None:
        return op(*args, **kwargs)
    task = UpdatableTask(op, args, kwargs)
    task.graph = graph
    result = graph.backend.run_updatable(task, op, args, kwargs)
    graph.tasks.append(task)
    return result
