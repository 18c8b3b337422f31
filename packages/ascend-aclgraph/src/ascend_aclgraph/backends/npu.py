"""The ``npu`` backend: torch_npu's ACL graphs (``torch.npu.NPUGraph``), thin by design.

Written against the public torch_npu API (``torch_npu/npu/graphs.py``):

* capture: ``torch.npu.graph(g, pool=..., capture_error_mode=...)`` into a pool from
  ``torch.npu.graph_pool_handle()``;
* updatable tasks, as vllm-ascend does for ``npu_fused_infer_attention_score``: at capture, an
  ``ExternalEvent`` wait+reset is captured in front of the op, and the op is captured inside
  ``graph_task_group_begin/end``. A replay then goes in vllm-ascend's order
  (``ACLGraphWrapper.__call__``, then ``update_full_graph_params``): synchronize the current
  stream, enqueue the replay (it stops on-device at each task's wait node), and on a dedicated
  update stream re-issue each changed task's op with its new host arguments between
  ``graph_task_update_begin/end``, then record the task's event, which releases the graph there.
  Unchanged tasks only get their event recorded.

torch_npu is imported lazily: importing it needs CANN, and installing it on a machine without
one breaks ``import torch`` (it autoloads), so nothing here runs unless this backend is asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ascend_aclgraph.backends.base import Graph
from ascend_aclgraph.backends.device import DeviceGraphBackend
from ascend_aclgraph.capture_guard import check_updatable_op
from ascend_aclgraph.errors import BackendUnavailableError
from ascend_aclgraph.tasks import UpdatableTask

__all__ = ["NpuGraphBackend", "npu_available"]


def _import_torch_npu() -> Any:
    try:
        import torch_npu
    except ImportError as exc:
        raise BackendUnavailableError(
            "the npu backend needs torch_npu (pip install torch-npu, matching your torch) and the "
            f"Ascend CANN toolkit; importing torch_npu failed: {exc}"
        ) from exc
    return torch_npu


@functools.cache
def npu_available() -> bool:
    """True if torch_npu imports and sees at least one NPU."""
    try:
        _import_torch_npu()
    except BackendUnavailableError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


class NpuGraphBackend(DeviceGraphBackend):
    """Graph backend over ``torch.npu.NPUGraph`` (ACL graph capture, ``aclmdlRI*``)."""

    name = "npu"

    def __init__(self, capture_error_mode: str = "global") -> None:
        _import_torch_npu()
        npu = torch.npu  # type: ignore[attr-defined]
        if not npu.is_available():
            raise BackendUnavailableError(
                "torch_npu is installed but no NPU is visible: check the Ascend driver, CANN, "
                "and ASCEND_RT_VISIBLE_DEVICES"
            )
        # torch_npu is PyTorch's PrivateUse1 backend, renamed "npu": this is torch.device("npu",
        # i) once torch_npu is imported. Naming it by the dispatch key also lets the tests drive
        # this backend through a stand-in ``torch.npu`` that records calls, with no NPU at all.
        device = torch.device("privateuseone", npu.current_device())
        super().__init__(npu, npu.NPUGraph, device, capture_error_mode)
        self._npu = npu
        # Task updates run on their own stream so they overlap the replay, as in vllm-ascend.
        self._update_stream = npu.Stream()

    def replay(self, graph: Graph, updates: Mapping[UpdatableTask, dict[str, Any]]) -> None:
        if not graph.tasks:
            graph.native.replay()
            return
        # A task rewrite (or event record) for this step must not land while the previous
        # replay still runs that task: vllm-ascend's ACLGraphWrapper synchronizes here too.
        self._npu.current_stream().synchronize()
        # Enqueued first: the graph runs up to each task's captured event wait, and the tasks
        # are rewritten meanwhile on the update stream.
        graph.native.replay()
        for task in graph.tasks:
            changes = updates.get(task)
            if changes:
                self.update_host_args(task, changes)
            else:
                # Its captured (or last written) arguments stand; release the graph there.
                task.event.record(self._update_stream)

    def run_updatable(
        self,
        task: UpdatableTask,
        op: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        check_updatable_op(op, task.describe(), self.name)
        npu = self._npu
        stream = npu.current_stream()
        event = npu.ExternalEvent()
        event.wait(stream)
        event.reset(stream)
        npu.graph_task_group_begin(stream)
        result = op(*args, **kwargs)
        task.handle = npu.graph_task_group_end(stream)
        task.event = event
        return result

    def update_host_args(self, task: UpdatableTask, changes: dict[str, Any]) -> None:
        """Re-issue ``task``'s op with ``changes`` as a task update, then release its event.

        Only :meth:`replay` calls it, after enqueueing the graph that waits on that event.
        """
        npu = self._npu
        args = list(task.args)
        kwargs = dict(task.kwargs)
        names = task.arg_names or []
        for name, value in changes.items():
            if name in names and names.index(name) < len(args) and name not in kwargs:
                args[names.index(name)] = value
            else:
                kwargs[name] = value
        stream = self._update_stream
        with npu.stream(stream):
            npu.graph_task_update_begin(stream, task.handle)
            task.op(*args, **kwargs)
            npu.graph_task_update_end(stream)
            task.event.record(stream)
