"""Per-replay updates of attention's host-side parameters in FULL graphs.

A FULL graph captures attention with the host values of the capture step baked in: on the NPU
the sequence lengths (an ``int[]`` argument that sets the kernel's tiling), on the CPU vLLM's
per-step ``scheduler_metadata`` (the work partition computed from the sequence lengths). Replayed
as captured, every later step would attend with the capture's lengths. vllm-ascend captures each
attention call as an updatable task and rewrites it for every replay with the step's values
(``update_full_graph_params``); this module is that bookkeeping:

- during a FULL capture, an attention implementation captures its kernel with
  :func:`ascend_aclgraph.updatable` and registers the task here with a function that reads the
  step's new values from vLLM's forward context;
- before each replay the FULL wrapper asks :func:`full_graph_updates` for them, and the graph
  backend applies them in the device's order (on the NPU after the replay is enqueued, while the
  graph waits at each task's event, as vllm-ascend does).

``VLLM_ASCEND_PLUGIN_SKIP_PARAM_UPDATE=1`` turns the updates off. It exists to show what they
prevent (a test uses it: tokens then differ from eager); never set it in production.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ascend_aclgraph as ag
from ascend_aclgraph.backends.base import TaskUpdates
from ascend_aclgraph.tasks import current_capture

__all__ = [
    "ParamReader",
    "capturing",
    "full_graph_updates",
    "register_task",
    "updates_enabled",
]

# Reads the new values of one task's host-side arguments from the forward context.
ParamReader = Callable[[Any], Mapping[str, Any]]


@dataclass
class _GraphTasks:
    tasks: list[tuple[ag.UpdatableTask, ParamReader]] = field(default_factory=list)


_lock = threading.Lock()
_by_descriptor: dict[Hashable, _GraphTasks] = {}
_state = threading.local()


def updates_enabled() -> bool:
    return os.environ.get("VLLM_ASCEND_PLUGIN_SKIP_PARAM_UPDATE", "0") in ("", "0")


@contextlib.contextmanager
def capturing(descriptor: Hashable) -> Iterator[None]:
    """Within the block, tasks registered belong to the graph of ``descriptor``."""
    previous = getattr(_state, "descriptor", None)
    _state.descriptor = descriptor
    with _lock:
        # A recapture (after clear_graphs) starts the descriptor's task list afresh.
        _by_descriptor[descriptor] = _GraphTasks()
    try:
        yield
    finally:
        _state.descriptor = previous


def register_task(reader: ParamReader) -> None:
    """Register the task just captured by :func:`ascend_aclgraph.updatable` for updates.

    Call it right after the ``updatable`` call, inside a FULL capture; outside one (eager runs,
    PIECEWISE graphs, where attention runs eagerly between pieces) it does nothing.
    """
    graph = current_capture()
    descriptor = getattr(_state, "descriptor", None)
    if graph is None or descriptor is None or not graph.tasks:
        return
    with _lock:
        _by_descriptor[descriptor].tasks.append((graph.tasks[-1], reader))


def full_graph_updates(descriptor: Hashable, graph: ag.Graph) -> TaskUpdates | None:
    """This step's values for every registered task of ``graph`` (``None``: nothing to do)."""
    if not updates_enabled():
        return None
    registered = _by_descriptor.get(descriptor)
    if registered is None or not registered.tasks:
        return None
    from vllm.forward_context import get_forward_context

    context = get_forward_context()
    updates: dict[ag.UpdatableTask, Mapping[str, Any]] = {}
    for task, reader in registered.tasks:
        if task.graph is not graph:  # a task of an earlier capture of this descriptor
            continue
        updates[task] = reader(context)
    return updates
