"""The backend boundary: everything device-specific the runtime needs, and nothing more.

Generic code (wrappers, padding, the dispatcher, piecewise capture) talks to a
:class:`GraphBackend` only. Three implementations exist: ``npu`` (torch_npu's ACL graphs),
``cuda`` (torch.cuda graphs) and ``cpu`` (the semantic twin, which records aten ops and replays
them on the same storages). They share one contract:

* a graph is captured once, inside :meth:`GraphBackend.capture`, and replayed many times;
* replay reads the *same* input storages and writes the *same* output storages as capture, so
  callers copy new inputs into static buffers and read outputs from the captured tensors;
* host-side arguments (Python ints and lists) are baked into the graph, unless the op was
  captured as an :class:`~ascend_aclgraph.tasks.UpdatableTask`, whose changes are applied by
  :meth:`Graph.replay` in the order the device needs;
* all graphs captured into one :class:`GraphPool` share its memory, so at most one of them is
  replayed at a time. A graph's temporaries are reused by later captures, and so is the memory
  of its outputs once nothing references them: runners hold outputs through non-owning views,
  as vLLM does, so graphs of every size share one working set. An output is valid until the
  next replay of another graph of the pool; holding it keeps later captures off its memory.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch

from ascend_aclgraph.errors import TaskUpdateError

if TYPE_CHECKING:
    from ascend_aclgraph.tasks import UpdatableTask

__all__ = ["Graph", "GraphBackend", "GraphPool", "TaskUpdates"]

# Argument changes per task of one graph: {task: {argument name: new value}}.
TaskUpdates: TypeAlias = Mapping["UpdatableTask", Mapping[str, Any]]


class GraphPool:
    """Memory shared by the graphs of one runner; subclasses hold the device handle."""

    def __init__(self, handle: Any = None) -> None:
        self.handle = handle
        # Device memory the captures added, as measured around each capture.
        self.captured_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes this pool holds for its graphs."""
        return self.captured_bytes


_NO_UPDATES: Mapping[UpdatableTask, dict[str, Any]] = MappingProxyType({})


class Graph:
    """A captured graph: the backend's native object plus what the runtime tracks about it."""

    def __init__(self, backend: GraphBackend, native: Any, pool: GraphPool) -> None:
        self.backend = backend
        self.native = native
        self.pool = pool
        self.tasks: list[UpdatableTask] = []
        self.captured = False

    def replay(self, updates: TaskUpdates | None = None) -> None:
        """Launch the captured work; outputs land in the tensors produced at capture.

        ``updates`` changes arguments of this graph's tasks for this replay, as
        :meth:`~ascend_aclgraph.tasks.UpdatableTask.update` would; changes staged with
        ``update()`` since the last replay are applied too. The backend applies host-side
        changes in its device's order: on the NPU the replay is enqueued first and each task is
        rewritten on the update stream while the graph waits at the task's event; on the twin
        each changed task's op is recorded again when the replay reaches it. A rewritten task
        keeps its new arguments, and what its op computed from them on the host.
        """
        if not self.captured:
            raise RuntimeError("replay() of a graph that was never captured successfully")
        if updates is None and not self.tasks:
            self.backend.replay(self, _NO_UPDATES)  # the common case, on every step's path
            return
        for task, changes in (updates or {}).items():
            if task.graph is not self:
                raise TaskUpdateError(
                    f"{task.describe()} belongs to another graph; replay() updates only the "
                    "tasks of the graph it replays"
                )
            task.update(**changes)
        staged = {task: task.pending for task in self.tasks if task.pending}
        self.backend.replay(self, staged)
        for task in staged:
            task._applied()

    def op_names(self) -> tuple[str, ...] | None:
        """Qualified names (``ns::op``) of the operators a replay launches, where knowable.

        The cpu twin knows them (its replay is a recorded op list); device graphs are opaque
        to the host, so ``None`` there.
        """
        return self.backend.op_names(self)

    def updates_for(self, changes: Mapping[str, Any]) -> dict[UpdatableTask, dict[str, Any]]:
        """``changes`` for every task of this graph that takes all of those arguments.

        How a model runner updates every attention layer with one step's sequence lengths:
        ``graph.replay(graph.updates_for({"seq_lens": lens}))``.
        """
        wanted = set(changes)
        return {
            task: dict(changes)
            for task in self.tasks
            if wanted <= set(task.known_names()) | set(task.kwargs)
        }

    def declare_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """Tell the backend which tensors the caller reads after each replay.

        Call it inside the capture block. Device allocators track liveness themselves; the cpu
        twin uses it to pack everything else into the shared pool.
        """
        self.backend.declare_outputs(self, outputs)

    def reset(self) -> None:
        """Release the captured graph; it cannot be replayed afterwards."""
        self.captured = False
        self.tasks.clear()
        self.backend.reset(self)


class GraphBackend(abc.ABC):
    """One device family's graph primitives."""

    name: ClassVar[str]
    # Whether capturing also executes the work (the cpu twin must run ops to record them; a
    # device capture only records). Callers replay once after a capture when it does not.
    capture_executes: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device that captured tensors must live on."""

    @abc.abstractmethod
    def new_pool(self) -> GraphPool:
        """A fresh memory pool for a set of graphs that never run concurrently."""

    @abc.abstractmethod
    def new_graph(self, pool: GraphPool) -> Graph:
        """An empty graph that will capture into ``pool``."""

    @abc.abstractmethod
    def _capture(self, graph: Graph) -> contextlib.AbstractContextManager[None]:
        """Backend-native capture context for ``graph``."""

    @abc.abstractmethod
    def is_capturing(self) -> bool:
        """Whether the current stream/thread is capturing a graph of this backend."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all queued device work."""

    @abc.abstractmethod
    def replay(self, graph: Graph, updates: Mapping[UpdatableTask, dict[str, Any]]) -> None:
        """Launch ``graph`` (already captured), rewriting its tasks with ``updates``.

        ``updates`` holds validated host-side changes for some of ``graph``'s tasks. Each
        backend orders the rewrite against the launch as its device requires (see
        :meth:`Graph.replay`); a rewrite never runs while an earlier replay may still read the
        task.
        """

    @abc.abstractmethod
    def reset(self, graph: Graph) -> None:
        """Free the native graph object."""

    # --- updatable tasks -------------------------------------------------------------------

    @abc.abstractmethod
    def run_updatable(
        self,
        task: UpdatableTask,
        op: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run ``op`` inside a capture so that its host-side arguments can be rewritten later."""

    @abc.abstractmethod
    def update_host_args(self, task: UpdatableTask, changes: dict[str, Any]) -> None:
        """Rewrite host-side (non-tensor) arguments of a captured task.

        Only :meth:`replay` calls it, at the point in the launch where its device allows.
        """

    def check_host_update(  # noqa: B027 (accepting everything is the default)
        self, task: UpdatableTask, changes: Mapping[str, Any]
    ) -> None:
        """Raise :class:`~ascend_aclgraph.errors.TaskUpdateError` if ``changes`` cannot be applied.

        Called when a change is staged, so that the error points at the caller's update rather
        than at a later replay. Backends that can rewrite captured tasks accept everything.
        """

    # --- shared behaviour ------------------------------------------------------------------

    def op_names(self, graph: Graph) -> tuple[str, ...] | None:
        """See :meth:`Graph.op_names`; device backends cannot look inside a graph."""
        return None

    @contextlib.contextmanager
    def capture(self, graph: Graph) -> Iterator[None]:
        """Capture everything run in the block into ``graph``.

        Host syncs and data-dependent shapes raise :class:`~ascend_aclgraph.errors.CaptureError`
        naming the user's file and line, on every backend. If the block raises, the graph is
        reset and never replayed: a broken graph never returns outputs.
        """
        from ascend_aclgraph import tasks
        from ascend_aclgraph.capture_guard import host_sync_methods_refused

        if graph.captured:
            raise RuntimeError("graph is already captured; reset() it before capturing again")
        ok = False
        try:
            with (
                torch.no_grad(),
                host_sync_methods_refused(),
                tasks.capturing_into(graph),
                self._capture(graph),
            ):
                yield
            ok = True
        finally:
            if ok:
                graph.captured = True
            else:
                graph.reset()

    def declare_outputs(self, graph: Graph, outputs: Sequence[torch.Tensor]) -> None:  # noqa: B027
        """See :meth:`Graph.declare_outputs`; device backends need nothing (not abstract)."""

    def memory_reserved(self) -> int:
        """Bytes the device allocator holds (used to measure what a capture adds)."""
        return 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} device={self.device}>"
