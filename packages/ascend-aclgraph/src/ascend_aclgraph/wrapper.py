"""GraphWrapper: capture a runnable once per batch descriptor, replay it afterwards.

The device-generic counterpart of vLLM's ``CUDAGraphWrapper`` and vllm-ascend's
``ACLGraphWrapper``. Its workflow:

1. It is created with a runtime mode (PIECEWISE or FULL) and a pool shared with its siblings.
2. Each call reads the current :func:`~ascend_aclgraph.graph_context.graph_context`. If the
   runtime mode is NONE, or differs from the wrapper's, the runnable runs eagerly: that is how
   a FULL wrapper around the whole model and PIECEWISE wrappers around its pieces nest.
3. The first ``num_warmups`` calls for a new descriptor run eagerly (lazy initialisation,
   autotuning, allocator warm-up), then the next call captures a graph for it and returns its
   real outputs.
4. Later calls replay that graph and return the captured outputs as non-owning views.

Outputs live as on a device, and as vLLM holds them: the entry keeps only non-owning views
(``weak_ref_tensors``), so once the caller drops what a capture returned, the pool may give that
memory to later captures, and a replayed output is valid until the next replay of another graph
of the pool. That is what lets graphs of every size share one pool's memory.

The wrapper owns no input buffers: the caller keeps persistent inputs and passes the same
tensors each step (padded to the descriptor's size). A different tensor on a device would read
the captured address and silently compute on stale data; with ``debug=True`` that is an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ascend_aclgraph.backends import Graph, GraphBackend, GraphPool, get_backend
from ascend_aclgraph.backends.base import TaskUpdates
from ascend_aclgraph.errors import GraphInputError
from ascend_aclgraph.graph_capture import (
    CaptureFailures,
    FailurePolicy,
    capture_callable,
    check_failure_policy,
    weak_ref_tensors,
)
from ascend_aclgraph.graph_context import current_graph_context
from ascend_aclgraph.modes import GraphMode
from ascend_aclgraph.stats import GraphStats

__all__ = ["GraphEntry", "GraphOptions", "GraphWrapper"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphOptions:
    """How a :class:`GraphWrapper` captures and replays."""

    num_warmups: int = 1
    # vLLM's weak_ref_output: the capture call, too, returns non-owning views, so the pool may
    # reuse the outputs' memory for the very next capture. Only safe when nothing reads them
    # across another capture (vLLM sets it for the last piece of a piecewise graph only).
    # Replays always return non-owning views.
    weak_ref_outputs: bool = False
    # Check that each replay gets the tensors that were captured (costs one pass over inputs).
    debug: bool = False
    # "raise": a failed capture raises. "eager": warn once, run that descriptor eagerly.
    on_capture_failure: FailurePolicy = "raise"

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_warmups, bool)
            or not isinstance(self.num_warmups, int)
            or self.num_warmups < 0
        ):
            raise ValueError(f"num_warmups must be an int >= 0, got {self.num_warmups!r}")
        check_failure_policy(self.on_capture_failure)


@dataclass
class GraphEntry:
    # A BatchDescriptor, or the integration's own key type (vLLM's BatchDescriptor).
    descriptor: Hashable
    warmups_done: int = 0
    graph: Graph | None = None
    # Non-owning views of the captured outputs: the entry never keeps their memory alive.
    output: Any = None
    input_addresses: list[int] = field(default_factory=list)
    # Capture failed under on_capture_failure="eager": this descriptor always runs eagerly.
    eager: bool = False


def _tensor_addresses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    flat, _ = tree_flatten((args, kwargs))
    return [t.data_ptr() for t in flat if isinstance(t, torch.Tensor)]


class GraphWrapper:
    """Capture/replay ``runnable`` per batch descriptor (see the module docstring)."""

    def __init__(
        self,
        runnable: Callable[..., Any],
        runtime_mode: GraphMode = GraphMode.FULL,
        *,
        backend: str | GraphBackend = "auto",
        pool: GraphPool | None = None,
        options: GraphOptions | None = None,
    ) -> None:
        if runtime_mode not in (GraphMode.PIECEWISE, GraphMode.FULL):
            raise ValueError(
                "a GraphWrapper captures in runtime mode PIECEWISE or FULL, "
                f"not {runtime_mode.name}"
            )
        self.runnable = runnable
        self.runtime_mode = runtime_mode
        self.backend = get_backend(backend)
        self.pool = pool if pool is not None else self.backend.new_pool()
        self.options = options or GraphOptions()
        self.entries: dict[Hashable, GraphEntry] = {}
        self.stats = GraphStats()
        self._failures = CaptureFailures(self.options.on_capture_failure, self.stats)
        self._lock = threading.RLock()

    def unwrap(self) -> Callable[..., Any]:
        return self.runnable

    def __getattr__(self, key: str) -> Any:
        # Forward attribute access to the wrapped runnable (a module's config, say).
        runnable = self.__dict__.get("runnable")
        if runnable is not None and hasattr(runnable, key):
            return getattr(runnable, key)
        raise AttributeError(f"{type(self).__name__} and its runnable have no attribute {key!r}")

    def graph_key(self) -> Hashable | None:
        """The descriptor to capture or replay for this call, or ``None`` to run eagerly.

        Read from the current :func:`~ascend_aclgraph.graph_context.graph_context`: a key only
        when its runtime mode is this wrapper's. Integrations that keep the mode and descriptor
        elsewhere (vLLM's forward context) override this one method.
        """
        ctx = current_graph_context()
        if ctx.runtime_mode is not self.runtime_mode:
            return None
        return ctx.descriptor

    def task_updates(self, entry: GraphEntry) -> TaskUpdates | None:
        """Changes to the tasks of ``entry``'s graph for the replay about to run (none here).

        An integration whose captured tasks take per-step host values (attention's sequence
        lengths) returns them here; the backend applies them in its device's order.
        """
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.graph_key()
        if key is None:
            return self.runnable(*args, **kwargs)
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = GraphEntry(key)
            if entry.eager:
                return self.runnable(*args, **kwargs)
            if entry.graph is None:
                if entry.warmups_done < self.options.num_warmups:
                    entry.warmups_done += 1
                    return self.runnable(*args, **kwargs)
                return self._capture(entry, args, kwargs)
            if self.options.debug:
                addresses = _tensor_addresses(args, kwargs)
                if addresses != entry.input_addresses:
                    raise GraphInputError(
                        f"graph for {entry.descriptor} was captured with input addresses "
                        f"{entry.input_addresses} but is replayed with {addresses}: copy new data "
                        "into the captured input tensors instead of passing new tensors"
                    )
            entry.graph.replay(self.task_updates(entry))
            self.stats.replays += 1
            return entry.output

    def _capture(self, entry: GraphEntry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            captured = capture_callable(self.backend, self.pool, self.runnable, args, kwargs)
        except Exception as exc:
            self._failures.handle(exc, str(entry.descriptor))
            entry.eager = True
            return self.runnable(*args, **kwargs)
        output = captured.outputs
        if self.options.weak_ref_outputs:
            # Nothing holds the strong outputs once this returns: the next capture may reuse
            # their memory.
            output = weak_ref_tensors(output)
        entry.output = weak_ref_tensors(output)
        entry.graph = captured.graph
        entry.input_addresses = _tensor_addresses(args, kwargs)
        # Every descriptor type we key on (ours, vLLM's) carries the padded token count.
        num_tokens = int(getattr(entry.descriptor, "num_tokens", 0))
        self.stats.record_capture(num_tokens, captured.seconds)
        self.stats.pool_bytes = self.pool.nbytes
        logger.debug("captured %s in %.3fs", entry.descriptor, captured.seconds)
        # Unless weak_ref_outputs, the real outputs: while the caller holds them (the next piece
        # of a piecewise graph reads them during this forward), no capture takes their memory.
        return output

    def update_tasks(self, descriptor: Hashable, **changes: Any) -> int:
        """Stage ``changes`` for every updatable task of ``descriptor``'s graph.

        The wrapper's next replay of that graph applies them, in the device's order (on the
        NPU: after the replay is enqueued). Returns how many tasks took the change (tasks
        without such an argument are skipped).
        """
        entry = self.entries.get(descriptor)
        if entry is None or entry.graph is None:
            return 0
        return update_graph_tasks(entry.graph, changes)


def update_graph_tasks(graph: Graph, changes: Mapping[str, Any]) -> int:
    """Stage ``changes`` for every task of ``graph`` that takes all of those arguments.

    The next ``graph.replay()`` applies them; ``graph.replay(graph.updates_for(changes))`` does
    both in one call. Returns how many tasks took the change.
    """
    updates = graph.updates_for(changes)
    for task, task_changes in updates.items():
        task.update(**task_changes)
    return len(updates)
