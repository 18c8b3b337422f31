"""Running one dynamo-compiled graph with captured graphs: padding, dispatch, cut-back.

Dynamo hands a backend an FX graph whose inputs are the user's tensors, the module's parameters
and buffers (lifted to inputs), and, with dynamic shapes, SymInt sizes. A
:class:`CompiledGraphRunner` finds the batch dim among them, keeps padded static buffers for
the batched inputs, and on each call:

1. asks a :class:`~ascend_aclgraph.GraphDispatcher` for ``(runtime mode, descriptor)`` given the
   batch size and the :func:`~ascend_aclgraph.batch_hint`;
2. NONE (above the largest size, or a mixed batch under FULL_DECODE_ONLY): runs the graph
   eagerly on the caller's tensors;
3. otherwise copies the batch into the buffers, pads it to the descriptor's size, runs the
   graph under :func:`~ascend_aclgraph.graph_context`, and cuts batched outputs back.

The graph runs through the wrappers of the configured mode, nested as in vLLM: FULL is one
:class:`~ascend_aclgraph.GraphWrapper` around the graph; PIECEWISE is the split graph with one
wrapper per piece; FULL_AND_PIECEWISE is a FULL wrapper around the split graph.

Which inputs are batched: with dynamic shapes, the tensors whose ``dynamic_dim`` is the batch
symbol (the symbol at that dim of the first tensor input that has one), and SymInt inputs equal
to it take the padded size. A graph dynamo specialised to one size has no symbol; its batched
inputs are the caller's own tensors (not parameters or buffers), and it is captured at exactly
its size, since its shapes are baked in. Graphs with any other symbolic size run eagerly, with
a warning: a captured graph cannot follow a size the descriptor does not key.

Python floats: with ``dynamic=True`` dynamo passes float attributes (an RMSNorm's ``eps``) as
0-d tensors and reads them with ``.item()`` inside the graph, a host sync no device graph can
hold. The graph that gets captured has those values baked in as constants; a call that passes
another value runs the original graph eagerly, so a changed float is never silently ignored.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ascend_aclgraph.backends import GraphBackend, GraphPool
from ascend_aclgraph.batch_hint import current_uniform_decode
from ascend_aclgraph.capture_sizes import CaptureSizes
from ascend_aclgraph.compile_options import AclGraphCompileOptions
from ascend_aclgraph.dispatcher import GraphDispatcher
from ascend_aclgraph.graph_context import graph_context
from ascend_aclgraph.modes import BatchDescriptor, GraphMode
from ascend_aclgraph.piecewise import PiecewiseGraph, sum_stats
from ascend_aclgraph.static_inputs import StaticBatchInputs
from ascend_aclgraph.stats import GraphStats
from ascend_aclgraph.wrapper import GraphOptions, GraphWrapper

__all__ = ["CompiledGraphRunner"]

logger = logging.getLogger(__name__)


@dataclass
class _Layout:
    """Where the batch dim is in a compiled graph's inputs and outputs."""

    dims: list[int | None] = field(default_factory=list)
    size_slots: list[int] = field(default_factory=list)
    # Per flat output: the dim to cut back along, or None.
    output_dims: list[int | None] = field(default_factory=list)
    # Per flat output: it is a SymInt equal to the batch size.
    output_sizes: list[bool] = field(default_factory=list)
    # Set for a graph specialised to one batch size.
    static_size: int | None = None
    unsupported: str | None = None


def _symbol(value: Any) -> Any:
    """The sympy expression of a symbolic size, or None for a concrete one."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return None if expr.is_number else expr
    return None


def _is_user_input(node: torch.fx.Node) -> bool:
    from torch._dynamo.source import LocalSource

    grapharg = node.meta.get("grapharg")
    return grapharg is not None and isinstance(getattr(grapharg, "source", None), LocalSource)


def _analyze(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], dim: int) -> _Layout:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    layout = _Layout(dims=[None] * len(example_inputs))
    if len(placeholders) != len(example_inputs):
        layout.unsupported = (
            f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs"
        )
        return layout
    values = [
        n.meta.get("example_value", ex) for n, ex in zip(placeholders, example_inputs, strict=True)
    ]
    batch = None
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            batch = _symbol(value.shape[dim])
            if batch is not None:
                break
    if batch is None:
        return _analyze_static(placeholders, example_inputs, dim, layout)
    for i, value in enumerate(values):
        if isinstance(value, torch.SymInt):
            if _symbol(value) != batch:
                layout.unsupported = f"input {i} is a symbolic size {value} other than the batch"
                return layout
            layout.size_slots.append(i)
        elif isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                sym = _symbol(size)
                if sym is None:
                    continue
                if d != dim or sym != batch:
                    layout.unsupported = (
                        f"input {i} has symbolic size {size} at dim {d}; only dim {dim} may "
                        f"vary, and only as the batch size {batch}"
                    )
                    return layout
                layout.dims[i] = dim
    for out in tree_flatten(gm.graph.output_node().args[0])[0]:
        value = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else out
        is_batched = (
            isinstance(value, torch.Tensor)
            and value.dim() > dim
            and _symbol(value.shape[dim]) == batch
        )
        layout.output_dims.append(dim if is_batched else None)
        layout.output_sizes.append(isinstance(value, torch.SymInt) and _symbol(value) == batch)
    return layout


def _analyze_static(
    placeholders: list[torch.fx.Node], example_inputs: Sequence[Any], dim: int, layout: _Layout
) -> _Layout:
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if not (isinstance(ex, torch.Tensor) and ex.dim() > dim and _is_user_input(node)):
            continue
        if layout.static_size is None:
            layout.static_size = int(ex.shape[dim])
        if ex.shape[dim] == layout.static_size:
            layout.dims[i] = dim
    if layout.static_size is None:
        layout.unsupported = f"no input tensor of the caller has a dim {dim} to batch over"
    return layout


def _bake_item_inputs(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[torch.fx.GraphModule, list[tuple[int, float | int | bool]]]:
    """A copy of ``gm`` with ``.item()`` of 0-d tensor inputs replaced by their example value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    targets = []
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs, strict=False)):
        users = list(node.users)
        if (
            isinstance(ex, torch.Tensor)
            and ex.dim() == 0
            and users
            and all(u.op == "call_method" and u.target == "item" for u in users)
        ):
            targets.append((i, node.name, ex.item()))
    if not targets:
        return gm, []
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for _, name, value in targets:
        for item in list(by_name[name].users):

            def swap(a: Any, item: torch.fx.Node = item, value: Any = value) -> Any:
                return value if a is item else a

            for user in list(item.users):
                user.args = tuple(torch.fx.node.map_aggregate(user.args, swap))
                user.kwargs = dict(torch.fx.node.map_aggregate(user.kwargs, swap))
            graph.erase_node(item)
    return torch.fx.GraphModule(gm, graph), [(i, v) for i, _, v in targets]


class CompiledGraphRunner:
    """The callable the ``aclgraph`` backend returns for one compiled graph (module docstring)."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        options: AclGraphCompileOptions,
        *,
        backend: GraphBackend,
        pool: GraphPool,
    ) -> None:
        self.gm = gm
        self.options = options
        self.mode = options.mode
        self.layout = _analyze(gm, example_inputs, options.dynamic_dim)
        self.eager_calls = 0
        self.eager_fallbacks = 0
        self.piecewise: PiecewiseGraph | None = None
        self.full: GraphWrapper | None = None
        self.runnable: Callable[..., Any] | None = None
        self._lock = threading.Lock()
        self.baked: list[tuple[int, float | int | bool]] = []
        self._grad_inputs = any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
        )
        sizes = self._sizes()
        if sizes is None or self.mode is GraphMode.NONE:
            return
        self.dispatcher = GraphDispatcher(
            self.mode, sizes, max_num_seqs=min(options.max_uniform_batch, sizes.max_size)
        )
        graph_options = GraphOptions(
            num_warmups=options.num_warmups,
            debug=options.debug,
            on_capture_failure=options.on_capture_failure,
        )
        captured_gm, self.baked = _bake_item_inputs(gm, example_inputs)
        inner: Callable[..., Any] = captured_gm
        if self.mode.has_piecewise_graphs():
            self.piecewise = PiecewiseGraph(
                captured_gm,
                splitting_ops=options.splitting_ops,
                backend=backend,
                pool=pool,
                options=graph_options,
            )
            inner = self.piecewise
        if self.mode.has_full_graphs():
            self.full = GraphWrapper(
                inner, GraphMode.FULL, backend=backend, pool=pool, options=graph_options
            )
            inner = self.full
        self.runnable = inner
        self.inputs = StaticBatchInputs(
            example_inputs,
            self.layout.dims,
            max_size=sizes.max_size,
            device=backend.device,
            pad_value=options.pad_value,
            size_slots=self.layout.size_slots,
        )

    def _sizes(self) -> CaptureSizes | None:
        layout, sizes = self.layout, self.options.batch_sizes
        if layout.unsupported is not None:
            warnings.warn(
                f"aclgraph: this compiled graph runs eagerly: {layout.unsupported}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if layout.static_size is None:
            return sizes
        if layout.static_size > sizes.max_size or layout.static_size < 1:
            return None  # every call would be above the largest capture size
        return CaptureSizes([layout.static_size])

    def pools(self) -> list[GraphPool]:
        """Every pool this graph's wrappers capture into."""
        wrappers = [p.wrapper for p in self.piecewise.pieces] if self.piecewise else []
        if self.full is not None:
            wrappers.append(self.full)
        return list({id(w.pool): w.pool for w in wrappers}.values())

    @property
    def stats(self) -> GraphStats:
        """Captures, replays and capture time of this graph's wrappers, plus eager fallbacks."""
        parts = [self.piecewise.stats] if self.piecewise is not None else []
        if self.full is not None:
            parts.append(self.full.stats)
        total = sum_stats(parts)
        total.eager_fallbacks = self.eager_fallbacks
        return total

    def __call__(self, *args: Any) -> Any:
        runnable = self.runnable
        if (
            runnable is None
            or (self._grad_inputs and torch.is_grad_enabled())
            or any(args[i].item() != value for i, value in self.baked)
        ):
            # Graphs are for inference; autograd needs the eager graph.
            self.eager_calls += 1
            return self.gm(*args)
        n = self.inputs.batch_size(args)
        mode, descriptor = (
            self.dispatcher.dispatch(n, uniform_decode=current_uniform_decode())
            if n > 0
            else (GraphMode.NONE, BatchDescriptor(n))
        )
        if mode is GraphMode.NONE:
            self.eager_calls += 1
            if n > self.dispatcher.max_capture_size:
                self.eager_fallbacks += 1
            return self.gm(*args)
        size = descriptor.num_tokens
        with self._lock:
            padded = self.inputs.copy_in(args, n, size)
            with graph_context(mode, descriptor):
                out = runnable(*padded)
            return self._cut_back(out, n)

    def _cut_back(self, out: Any, n: int) -> Any:
        flat, spec = tree_flatten(out)
        layout, clone = self.layout, self.options.clone_outputs
        result: list[Any] = []
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                d = layout.output_dims[i] if i < len(layout.output_dims) else None
                if d is not None:
                    t = t.narrow(d, 0, n)
                result.append(t.clone() if clone else t)
            elif i < len(layout.output_sizes) and layout.output_sizes[i]:
                result.append(n)
            else:
                result.append(t)
        return tree_unflatten(result, spec)
