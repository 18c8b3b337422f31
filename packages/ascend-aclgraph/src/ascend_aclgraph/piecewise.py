"""PIECEWISE graphs: a split FX graph whose pieces capture/replay and whose attention runs eagerly.

The runtime half of vLLM's ``PiecewiseBackend``: every non-splitting submodule of
:func:`~ascend_aclgraph.splitting.split_graph`'s result is wrapped in a
:class:`~ascend_aclgraph.wrapper.GraphWrapper` in PIECEWISE mode, all sharing one pool; the
splitting ops stay plain submodules and run eagerly between them. Under a PIECEWISE
:func:`~ascend_aclgraph.graph_context` every piece replays its graph for the context's
descriptor; under any other runtime mode the pieces pass through, which is how a FULL wrapper
around the whole split graph captures everything at once (FULL_AND_PIECEWISE).

Piece ``k + 1`` reads piece ``k``'s outputs. That is safe in one shared pool on every backend:
a graph's outputs stay allocated while they are held (on the twin, their blocks are pinned), so
no later capture places its work on them.

One thing vLLM gets from its model runner and attention ops we do here: a piece after an eager
op receives a *fresh* tensor each step (``scaled_dot_product_attention`` returns a new one),
while its graph reads the address it saw at capture. Each piece therefore keeps the arguments it
was captured with and copies any argument that arrives at another address into them (vLLM's
``cudagraph_copy_inputs``), so eager attention output reaches the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ascend_aclgraph.backends import GraphBackend, GraphPool
from ascend_aclgraph.graph_context import current_graph_context
from ascend_aclgraph.modes import BatchDescriptor, GraphMode
from ascend_aclgraph.splitting import SplitItem, SplittingOps, SplittingOpSpec, split_graph
from ascend_aclgraph.stats import GraphStats
from ascend_aclgraph.wrapper import GraphOptions, GraphWrapper

__all__ = ["PieceRunner", "PiecewiseGraph", "sum_stats"]


class PieceRunner:
    """One captured piece: a PIECEWISE :class:`GraphWrapper` plus its static arguments."""

    def __init__(self, wrapper: GraphWrapper) -> None:
        self.wrapper = wrapper
        self._captured_args: dict[BatchDescriptor, tuple[Any, ...]] = {}

    def __call__(self, *args: Any) -> Any:
        ctx = current_graph_context()
        descriptor = ctx.descriptor
        if ctx.runtime_mode is not GraphMode.PIECEWISE or descriptor is None:
            return self.wrapper(*args)
        static = self._captured_args.get(descriptor)
        if static is not None:
            for arg, kept in zip(args, static, strict=True):
                if (
                    isinstance(kept, torch.Tensor)
                    and arg is not kept
                    and arg.data_ptr() != kept.data_ptr()
                ):
                    kept.copy_(arg)
            return self.wrapper(*static)
        out = self.wrapper(*args)
        entry = self.wrapper.entries.get(descriptor)
        if entry is not None and entry.captured is not None:
            # Holding the capture-time arguments keeps the storages the graph reads alive.
            self._captured_args[descriptor] = args
        return out


def sum_stats(parts: Sequence[GraphStats]) -> GraphStats:
    """Counters of several wrappers added up (pool bytes: the largest of them)."""
    total = GraphStats()
    for s in parts:
        total.captures += s.captures
        total.replays += s.replays
        total.eager_fallbacks += s.eager_fallbacks
        total.capture_failures += s.capture_failures
        total.capture_seconds += s.capture_seconds
        for size, seconds in s.capture_seconds_by_size.items():
            total.capture_seconds_by_size[size] = (
                total.capture_seconds_by_size.get(size, 0.0) + seconds
            )
        total.pool_bytes = max(total.pool_bytes, s.pool_bytes)
    return total


class PiecewiseGraph:
    """``gm`` split at ``splitting_ops`` with every piece captured per batch descriptor.

    Calling it runs the split graph; whether pieces replay depends on the current
    :func:`~ascend_aclgraph.graph_context` (see the module docstring). ``gm`` is not modified.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        *,
        splitting_ops: SplittingOps | Sequence[SplittingOpSpec] | None = None,
        backend: GraphBackend,
        pool: GraphPool,
        options: GraphOptions | None = None,
    ) -> None:
        self.split_module, self.items = split_graph(gm, splitting_ops)
        self.pieces: list[PieceRunner] = []
        for item in self.items:
            if item.is_splitting:
                continue
            piece = PieceRunner(
                GraphWrapper(
                    item.module,
                    GraphMode.PIECEWISE,
                    backend=backend,
                    pool=pool,
                    options=options,
                )
            )
            # The split module's forward looks pieces up as attributes; an instance attribute
            # shadows the registered submodule without nn.Module's type check (as vLLM does).
            self.split_module.__dict__[item.name] = piece
            self.pieces.append(piece)

    @property
    def splitting_items(self) -> list[SplitItem]:
        """The submodules holding a splitting op (they always run eagerly)."""
        return [item for item in self.items if item.is_splitting]

    @property
    def stats(self) -> GraphStats:
        total = sum_stats([p.wrapper.stats for p in self.pieces])
        pools = {id(p.wrapper.pool): p.wrapper.pool for p in self.pieces}
        total.pool_bytes = sum(pool.nbytes for pool in pools.values())
        return total

    def __call__(self, *args: Any) -> Any:
        return self.split_module(*args)
