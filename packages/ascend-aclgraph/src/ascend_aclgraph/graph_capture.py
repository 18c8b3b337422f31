"""Capturing one callable into one graph: the step shared by every runner in this package."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ascend_aclgraph.backends.base import Graph, GraphBackend, GraphPool
from ascend_aclgraph.errors import CaptureError
from ascend_aclgraph.stats import GraphStats

__all__ = [
    "CaptureFailures",
    "CapturedGraph",
    "FailurePolicy",
    "capture_callable",
    "check_failure_policy",
    "weak_ref_tensor",
    "weak_ref_tensors",
]

FailurePolicy = Literal["raise", "eager"]


def check_failure_policy(policy: object) -> None:
    if policy not in ("raise", "eager"):
        raise ValueError(f"on_capture_failure must be 'raise' or 'eager', got {policy!r}")


class CaptureFailures:
    """Applies a runner's failure policy to a failed capture.

    ``"raise"``: the error propagates (wrapped in :class:`CaptureError` if it is not one).
    ``"eager"``: every failure is counted in ``stats.capture_failures`` and the caller runs that
    batch class eagerly from then on. The first failure of a runner is reported once, as one
    WARNING log record and one :class:`RuntimeWarning`; later ones are logged at DEBUG level.
    """

    def __init__(self, policy: FailurePolicy, stats: GraphStats) -> None:
        check_failure_policy(policy)
        self.policy = policy
        self.stats = stats
        self._warned = False

    def handle(self, exc: Exception, what: str) -> None:
        if self.policy == "raise":
            if isinstance(exc, CaptureError):
                raise exc
            raise CaptureError(f"capture of {what} failed: {exc}") from exc
        self.stats.capture_failures += 1
        if self._warned:
            # A model that cannot be captured usually fails at every size for the same reason
            # (a host sync, say): the first report says it all, repeating it per size is noise.
            logger.debug("capture of %s failed, running it eagerly: %s", what, exc)
            return
        self._warned = True
        logger.warning(
            "capture of %s failed, running it eagerly (on_capture_failure='eager'); further "
            "capture failures of this runner are logged at DEBUG level and counted in "
            "stats.capture_failures: %s",
            what,
            exc,
        )
        warnings.warn(
            f"graph capture of {what} failed ({exc}); it runs eagerly "
            "(on_capture_failure='eager'). Further failures are counted in stats.",
            RuntimeWarning,
            stacklevel=4,
        )


logger = logging.getLogger(__name__)


@dataclass
class CapturedGraph:
    graph: Graph
    # What the callable returned at capture; replays write into these same tensors. Strong
    # references: whoever keeps this keeps the outputs' memory from the pool's later captures.
    # Runners keep weak_ref_tensors(outputs) instead, as vLLM does.
    outputs: Any
    seconds: float


def capture_callable(
    backend: GraphBackend,
    pool: GraphPool,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> CapturedGraph:
    """Capture ``fn(*args, **kwargs)`` into a new graph of ``pool``.

    On return the outputs hold the results for ``args``, on every backend: device captures do
    not execute the work, so the graph is replayed once; the cpu twin executed it while
    recording. If capture fails the graph is reset and the error propagates.
    """
    graph = backend.new_graph(pool)
    start = time.perf_counter()
    with backend.capture(graph):
        outputs = fn(*args, **kwargs)
        flat, _ = tree_flatten(outputs)
        graph.declare_outputs([t for t in flat if isinstance(t, torch.Tensor)])
    if not backend.capture_executes:
        graph.replay()
        backend.synchronize()
    seconds = time.perf_counter() - start
    return CapturedGraph(graph, outputs, seconds)


def weak_ref_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor viewing ``t``'s memory without keeping it alive (vLLM's weak_ref_tensors).

    Holding graph outputs this way lets the pool's allocator reuse their memory for the next
    capture: such a view reads what the last replay wrote there, so it is valid until the next
    replay of another graph of the pool, and never after the pool is gone.
    """
    storage = t.untyped_storage()
    weak = torch._C._construct_storage_from_data_pointer(
        storage.data_ptr(), t.device, storage.nbytes()
    )
    return torch.empty((0,), dtype=t.dtype, device=t.device).set_(
        weak, t.storage_offset(), t.size(), t.stride()
    )


def weak_ref_tensors(value: Any) -> Any:
    """``value`` with every tensor in it replaced by :func:`weak_ref_tensor` of it."""
    return tree_map(lambda x: weak_ref_tensor(x) if isinstance(x, torch.Tensor) else x, value)
