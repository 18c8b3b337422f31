"""The ``cpu`` backend: a semantic twin of a device graph.

Capture runs the block for real under a recorder that keeps every aten op and the tensors it
touched; replay re-runs the ops that matter on the same storages, writing into the captured
outputs. That gives the device contract on a CPU: static addresses, inputs that must be copied
into static buffers, control flow frozen at capture, host arguments baked in unless captured as
updatable tasks, and host syncs refused. A test that forgets to copy an input sees a stale
result here exactly as it would on an NPU.

An updatable task is a segment of the recorded ops (:mod:`ascend_aclgraph.twin.segment`): an
update records the task's op again, with its new arguments, when the replay reaches it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ascend_aclgraph.backends.base import Graph, GraphBackend, GraphPool
from ascend_aclgraph.capture_guard import check_updatable_op
from ascend_aclgraph.errors import CaptureError
from ascend_aclgraph.tasks import UpdatableTask
from ascend_aclgraph.twin.program import TwinPool, TwinProgram, build_program
from ascend_aclgraph.twin.recorder import Recorder
from ascend_aclgraph.twin.segment import TaskSegment

__all__ = ["CpuTwinBackend", "TwinGraph"]


class _CpuGraphPool(GraphPool):
    def __init__(self) -> None:
        super().__init__(TwinPool())
        self.graphs_own_bytes = 0

    @property
    def nbytes(self) -> int:
        twin: TwinPool = self.handle
        return twin.nbytes + self.graphs_own_bytes


class TwinGraph:
    """Native graph object of the twin: a recorder while capturing, a program afterwards."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.program: TwinProgram | None = None
        # Declared outputs, kept only until the program is built (see _capture).
        self.outputs: list[torch.Tensor] | None = None

    def replay(self) -> None:
        program = self.program
        if program is None:
            raise RuntimeError("replay() of a twin graph that holds no captured program")
        program.replay()


class CpuTwinBackend(GraphBackend):
    """Graph backend for the CPU (see the module docstring)."""

    name = "cpu"
    capture_executes = True

    def __init__(self) -> None:
        self._capturing = threading.local()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def new_pool(self) -> GraphPool:
        return _CpuGraphPool()

    def new_graph(self, pool: GraphPool) -> Graph:
        if not isinstance(pool, _CpuGraphPool):
            raise TypeError(
                f"the cpu backend needs a pool from CpuTwinBackend.new_pool(), got {pool!r}"
            )
        return Graph(self, TwinGraph(), pool)

    @contextlib.contextmanager
    def _capture(self, graph: Graph) -> Iterator[None]:
        native: TwinGraph = graph.native
        if getattr(self._capturing, "active", False):
            raise CaptureError("nested capture on the cpu backend: finish one capture first")
        recorder = Recorder()
        native.recorder = recorder
        self._capturing.active = True
        try:
            with recorder:
                yield
        finally:
            self._capturing.active = False
            native.recorder = None
        pool: _CpuGraphPool = graph.pool  # type: ignore[assignment]
        native.program = build_program(
            recorder.records,
            recorder.internal,
            pool.handle,
            native.outputs,
            keep_alive=[task.args for task in graph.tasks] + [task.kwargs for task in graph.tasks],
            segments=[task.handle for task in graph.tasks],
        )
        # The program replays into the outputs' memory without holding them; keeping them here
        # would keep their pool blocks from ever being reused.
        native.outputs = None
        pool.graphs_own_bytes += native.program.own_bytes

    def declare_outputs(self, graph: Graph, outputs: Sequence[torch.Tensor]) -> None:
        graph.native.outputs = list(outputs)

    def is_capturing(self) -> bool:
        return bool(getattr(self._capturing, "active", False))

    def synchronize(self) -> None:
        """The twin runs synchronously; nothing to wait for."""

    def replay(self, graph: Graph, updates: Mapping[UpdatableTask, dict[str, Any]]) -> None:
        # The device's order: launch, and rewrite each changed task while the graph waits at
        # it. The twin runs synchronously, so the changes are staged on the tasks' segments,
        # and each segment records its task again when the replay reaches it. A refused update
        # raises from there (TaskUpdateError), leaving that task as it was.
        for task, changes in updates.items():
            self.update_host_args(task, changes)
        graph.native.replay()

    def op_names(self, graph: Graph) -> tuple[str, ...] | None:
        program = graph.native.program
        return None if program is None else program.replayed_ops

    def reset(self, graph: Graph) -> None:
        graph.native.program = None
        graph.native.outputs = None

    def run_updatable(
        self,
        task: UpdatableTask,
        op: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        recorder = task.graph.native.recorder
        if recorder is None:
            raise CaptureError("updatable op outside an active cpu-twin capture")
        check_updatable_op(op, task.describe(), self.name)
        assert isinstance(op, torch._ops.OpOverload)  # only operators have a mutable schema
        start = len(recorder.records)
        result, records = recorder.run_task(op, args, kwargs, task.describe())
        task.handle = TaskSegment(task, op, args, kwargs, result, records, start)
        return result

    def update_host_args(self, task: UpdatableTask, changes: dict[str, Any]) -> None:
        segment: TaskSegment = task.handle
        segment.stage(changes)
