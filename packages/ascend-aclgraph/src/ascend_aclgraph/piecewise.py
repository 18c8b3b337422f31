"""PIECEWISE graphs: a split FX graph whose pieces capture/replay and whose attention runs eagerly.

The runtime half of vLLM's ``PiecewiseBackend``: every non-splitting submodule of
:func:`~ascend_aclgraph.splitting.split_graph`'s result is wrapped in a
:class:`~ascend_aclgraph.wrapper.GraphWrapper` in PIECEWISE mode, all sharing one pool; the
splitting ops stay plain submodules and run eagerly between them. Under a PIECEWISE
:func:`~ascend_aclgraph.graph_context` every piece replays its graph for the context's
descriptor; under any other runtime mode the pieces pass through, which is how a FULL wrapper
around the whole split graph captures everything at once (FULL_AND_PIECEWISE).

Piece ``k + 1`` reads piece ``k``'s outputs, and nothing keeps those once a forward is over
(vLLM's piecewise backend does the same): outputs are held weakly, so the memory of every
size's pieces is one working set in the shared pool. That is safe on every backend. While one
descriptor is captured, each piece's outputs stay alive until the forward finishes, so no
capture of that forward places work on them; afterwards other descriptors' captures may take
that memory, and since a descriptor's pieces always replay in order, each piece writes its
outputs just before the next one reads them. The last piece drops its outputs at capture
already (vLLM's ``weak_ref_output``, set for the last graph only), as nothing after it is
captured in that forward.

One thing vLLM gets from its model runner and attention ops we do here: a piece after an eager
op receives a *fresh* tensor each step (``scaled_dot_product_attention`` returns a new one),
while its graph reads the address it saw at capture. Each piece therefore keeps the arguments it
was captured with and copies any argument that arrives at another address into them (vLLM's
``cudagraph_copy_inputs``), so eager attention output reaches the graph. Outputs of earlier
pieces among those arguments are kept (and captured) through non-owning views: a strong
reference from here would keep them in the pool for good.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ascend_aclgraph.backends import GraphBackend, GraphPool
from ascend_aclgraph.graph_capture import weak_ref_tensor
from ascend_aclgraph.graph_context import current_graph_context
from ascend_aclgraph.modes import BatchDescriptor, GraphMode
from ascend_aclgraph.splitting import SplitItem, SplittingOps, SplittingOpSpec, split_graph
from ascend_aclgraph.stats import GraphStats
from ascend_aclgraph.wrapper import GraphOptions, GraphWrapper

__all__ = ["PieceRunner", "PiecewiseGraph", "sum_stats"]


class _PieceOutputs:
    """The tensors pieces of one split graph returned from a capture, while they are alive."""

    def __init__(self) -> None:
        self._by_id: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def add(self, value: Any) -> None:
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                self._by_id[id(t)] = t

    def __contains__(self, t: object) -> bool:
        return self._by_id.get(id(t)) is t


class PieceRunner:
    """One captured piece: a PIECEWISE :class:`GraphWrapper` plus its static arguments."""

    def __init__(self, wrapper: GraphWrapper, piece_outputs: _PieceOutputs | None = None) -> None:
        self.wrapper = wrapper
        self._piece_outputs = piece_outputs if piece_outputs is not None else _PieceOutputs()
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
        # Earlier pieces' outputs live in the pool, which keeps their memory: the graph reads
        # them through views that do not hold them, as a device graph reads raw addresses.
        # Everything else (eager attention outputs, the caller's buffers) is held from here,
        # which keeps the storages the graph reads alive.
        static = tuple(weak_ref_tensor(a) if a in self._piece_outputs else a for a in args)
        out = self.wrapper(*static)
        entry = self.wrapper.entries.get(descriptor)
        if entry is not None and entry.graph is not None:
            self._captured_args[descriptor] = static
            self._piece_outputs.add(out)
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
    ``options.weak_ref_outputs`` is set per piece, as vLLM does: only the last piece drops its
    outputs at capture, since the others are read by the next piece.
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
        captured_items = [item for item in self.items if not item.is_splitting]
        piece_outputs = _PieceOutputs()
        for item in captured_items:
            piece_options = dataclasses.replace(
                options or GraphOptions(), weak_ref_outputs=item is captured_items[-1]
            )
            piece = PieceRunner(
                GraphWrapper(
                    item.module,
                    GraphMode.PIECEWISE,
                    backend=backend,
                    pool=pool,
                    options=piece_options,
                ),
                piece_outputs,
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
