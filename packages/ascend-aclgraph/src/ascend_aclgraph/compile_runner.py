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

Which inputs are batched, their pad values, which outputs are cut back along which dim, and
whether padding is sound at all are decided by :func:`~ascend_aclgraph.batch_layout.\
layout_for_dynamo_graph` (the one rule shared with :func:`~ascend_aclgraph.capture`). In short:
with dynamic shapes, the tensors whose ``dynamic_dim`` is the batch symbol, never parameters or
buffers; a graph dynamo specialised to one size is captured at exactly that size. A graph whose
rows see each other (a reduction or softmax over the batch, say) captures exact sizes only and
runs other sizes eagerly, said once in the log with the op and the user's source line. Graphs
with any other symbolic size run eagerly, with a warning: a captured graph cannot follow a size
the descriptor does not key. State inputs (parameters, buffers, the caller's unbatched tensors)
are captured by address; a call passing another tensor for one runs eagerly (said once).

Python floats: with ``dynamic=True`` dynamo passes float attributes (an RMSNorm's ``eps``) as
0-d tensors and reads them with ``.item()`` inside the graph, a host sync no device graph can
hold. The graph that gets captured has those values baked in as constants; a call that passes
another value runs the original graph eagerly, so a changed float is never silently ignored.
"""

from __future__ import annotations

import copy
import logging
import operator
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ascend_aclgraph.backends import GraphBackend, GraphPool
from ascend_aclgraph.batch_hint import current_uniform_decode
from ascend_aclgraph.batch_layout import BatchLayout, layout_for_dynamo_graph
from ascend_aclgraph.capture_sizes import CaptureSizes
from ascend_aclgraph.compile_options import AclGraphCompileOptions
from ascend_aclgraph.dispatcher import GraphDispatcher
from ascend_aclgraph.graph_context import (
    GraphContext,
    enter_graph_context,
    exit_graph_context,
    make_graph_context,
)
from ascend_aclgraph.modes import GraphMode
from ascend_aclgraph.piecewise import PiecewiseGraph, sum_stats
from ascend_aclgraph.static_inputs import CutOutputs, OutputCutter, StaticBatchInputs
from ascend_aclgraph.stats import GraphStats
from ascend_aclgraph.wrapper import GraphEntry, GraphOptions, GraphWrapper

__all__ = ["CompiledGraphRunner"]

logger = logging.getLogger(__name__)

_hinted_specialize_float = False


def _hint_specialize_float(count: int) -> None:
    """Say once per process, at INFO, how to spare every call the floats' conversion and check."""
    global _hinted_specialize_float
    if _hinted_specialize_float:
        return
    _hinted_specialize_float = True
    logger.info(
        "aclgraph: dynamo passes %d Python float(s) to this graph as 0-d tensors; the captured "
        "graphs bake them in, and every call converts them and checks that they did not change. "
        "torch._dynamo.config.specialize_float = True makes them constants of the graph instead "
        "(a changed value then compiles a new graph): same graphs, less work per call (said once)",
        count,
    )


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


def _one_of(i: int) -> Callable[[Sequence[Any]], tuple[Any]]:
    """``operator.itemgetter(i)``, but returning a 1-tuple as itemgetter does for several."""
    return lambda args: (args[i],)


class CompiledGraphRunner:
    """The callable the ``aclgraph`` backend returns for one compiled graph (module docstring).

    ``runnable`` is what gets captured and replayed (default: ``gm`` itself); npugraph_ex passes
    its optimized callable here, so that one runner decides padding for both backends.
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        options: AclGraphCompileOptions,
        *,
        backend: GraphBackend,
        pool: GraphPool,
        runnable: Callable[..., Any] | None = None,
    ) -> None:
        self.gm = gm
        self.eager_fn: Callable[..., Any] = runnable if runnable is not None else gm
        self.options = options
        self.mode = options.mode
        self.eager_calls = 0
        self.eager_fallbacks = 0
        self.piecewise: PiecewiseGraph | None = None
        self.full: GraphWrapper | None = None
        self.runnable: Callable[..., Any] | None = None
        self._lock = threading.Lock()
        self._said: set[str] = set()
        self._plans: dict[tuple[int, bool], _RunPlan | None] = {}
        self.baked: list[tuple[int, float | int | bool]] = []
        self._grad_inputs = any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
        )
        layout, static_size, unsupported = layout_for_dynamo_graph(
            gm, example_inputs, options.dynamic_dim, options.pad_values
        )
        self.layout: BatchLayout | None = layout
        # Set for a graph dynamo specialised to one batch size (captured at exactly that size).
        self.static_size = static_size
        self.exact_sizes = False
        sizes = self._sizes(layout, static_size, unsupported)
        if sizes is None or self.mode is GraphMode.NONE or layout is None:
            return
        self.exact_sizes = layout.exact_only and static_size is None
        if self.exact_sizes:
            logger.warning(
                "aclgraph: padding could change real rows of this graph, so each captured "
                "size serves only itself and other sizes run eagerly: %s",
                layout.describe_exact(),
            )
        self.dispatcher = GraphDispatcher(
            self.mode, sizes, max_num_seqs=min(options.max_uniform_batch, sizes.max_size)
        )
        graph_options = GraphOptions(
            num_warmups=options.num_warmups,
            debug=options.debug,
            on_capture_failure=options.on_capture_failure,
        )
        captured: Callable[..., Any] = self.eager_fn
        if runnable is None:
            captured_gm, self.baked = _bake_item_inputs(gm, example_inputs)
            captured = captured_gm
            for i, _ in self.baked:
                layout.inputs[i] = replace(layout.inputs[i], role="baked")
            if self.baked:
                _hint_specialize_float(len(self.baked))
        inner: Callable[..., Any] = captured
        if self.mode.has_piecewise_graphs():
            if not isinstance(captured, torch.fx.GraphModule):
                raise TypeError("PIECEWISE graphs need an FX graph to split")
            self.piecewise = PiecewiseGraph(
                captured,
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
        baked = [i for i, _ in self.baked]
        self._baked_values = [value for _, value in self.baked]
        self._baked_args: Callable[[Sequence[Any]], Sequence[Any]] = (
            operator.itemgetter(*baked) if len(baked) > 1 else _one_of(baked[0] if baked else 0)
        )
        self.inputs = StaticBatchInputs(
            example_inputs, layout.inputs, max_size=sizes.max_size, device=backend.device
        )
        self._cut = OutputCutter(layout.outputs)

    def _sizes(
        self, layout: BatchLayout | None, static_size: int | None, unsupported: str | None
    ) -> CaptureSizes | None:
        sizes = self.options.batch_sizes
        if unsupported is not None or layout is None:
            warnings.warn(
                f"aclgraph: this compiled graph runs eagerly: {unsupported}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if static_size is None:
            return sizes
        if static_size > sizes.max_size or static_size < 1:
            return None  # every call would be above the largest capture size
        return CaptureSizes([static_size])

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

    def _say_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)

    def _eager(self, args: Sequence[Any]) -> Any:
        self.eager_calls += 1
        return self.eager_fn(*args)

    def _plan(self, n: int, uniform: bool) -> _RunPlan | None:
        """How a batch of ``n`` runs (None: eagerly); worked out once per size and hint."""
        mode, descriptor = self.dispatcher.dispatch(n, uniform_decode=uniform)
        if mode is not GraphMode.NONE and self.exact_sizes and descriptor.num_tokens != n:
            self._say_once(
                "exact",
                "aclgraph: batch size %d has no graph of its own and padding is off for this "
                "graph; it runs eagerly (said once)",
                n,
            )
            mode = GraphMode.NONE
        if mode is GraphMode.NONE:
            return None
        return _RunPlan(descriptor.num_tokens, make_graph_context(mode, descriptor))

    def _baked_changed(self, args: Sequence[Any]) -> bool:
        """Whether a float dynamo passed as a 0-d tensor differs from the value baked in."""
        return list(map(torch.Tensor.item, self._baked_args(args))) != self._baked_values

    def __call__(self, *args: Any) -> Any:
        runnable = self.runnable
        if (
            runnable is None
            or (self._grad_inputs and torch.is_grad_enabled())
            or (self.baked and self._baked_changed(args))
        ):
            # Graphs are for inference; autograd needs the eager graph.
            return self._eager(args)
        inputs = self.inputs
        # The first batched argument's size; fill() checks the others (inside the lock), and
        # every way out to eager checks them all first.
        n = inputs.first_batch_size(args)
        key = (n, current_uniform_decode())
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plans[key] = self._plan(*key) if n > 0 else None
        if plan is None:
            inputs.batch_size(args)
            if n > self.dispatcher.max_capture_size:
                self.eager_fallbacks += 1
            return self._eager(args)
        moved = inputs.moved_state(args)
        if moved is not None:
            inputs.batch_size(args)
            self._say_once("moved", "aclgraph: running eagerly: %s (said once)", moved)
            return self._eager(args)
        with self._lock:
            if inputs.has_host:
                inputs.check_host(args)
            replay = plan.replay
            if replay is not None:
                # A captured FULL graph: replay it directly, with what the plan worked out at
                # capture (the input views of this size, the cut outputs). A replay runs no
                # Python that reads the graph context, and the wrapper would only look the
                # same entry up again.
                inputs.fill(args, n, plan.size, plan.views)  # type: ignore[arg-type]
                replay()
                self.full.stats.replays += 1  # type: ignore[union-attr]
                if inputs.has_written:
                    inputs.copy_back(args, n)
                return plan.result()  # type: ignore[misc]
            size = plan.size
            padded = inputs.copy_in(args, n, size)
            token = enter_graph_context(plan.context)
            try:
                out = runnable(*padded)
            finally:
                exit_graph_context(token)
            inputs.copy_back(args, n)
            result = self._cut_back(plan, out, n, size)
            self._arm_replay(plan, n, size)
            return result

    def _arm_replay(self, plan: _RunPlan, n: int, size: int) -> None:
        """Once the FULL wrapper holds a captured graph for the plan's descriptor, precompute
        what its replays need, so that later calls of this size skip the wrapper."""
        entry = self._captured_full_entry(plan)
        if entry is None:
            return
        cut = self._cut.structure(entry.output, n, size)
        plan.views = self.inputs.batch_views(n)
        plan.result = cut.returner(self.options.clone_outputs)
        plan.replay = entry.graph.replay  # type: ignore[union-attr]

    def _captured_full_entry(self, plan: _RunPlan) -> GraphEntry | None:
        full = self.full
        if full is None or plan.context.runtime_mode is not GraphMode.FULL or full.options.debug:
            return None
        entry = full.entries.get(plan.context.descriptor)
        if entry is None or entry.graph is None or entry.eager:
            return None
        return entry

    def _cut_back(self, plan: _RunPlan, out: Any, n: int, size: int) -> Any:
        # A replay returns the very objects it returned last time: reuse their cut views.
        if out is not plan.last_output or plan.cut is None:
            plan.cut = self._cut.structure(out, n, size)
            plan.last_output = out
        return plan.cut.result(self.options.clone_outputs)


@dataclass(eq=False)
class _RunPlan:
    """A batch size's padded size and graph context, and its last outputs' cut views."""

    size: int
    context: GraphContext
    last_output: Any = None
    cut: CutOutputs | None = None
    # Set once the FULL wrapper captured this descriptor (_arm_replay): later calls replay the
    # graph directly, filling ``views`` and returning ``result()``.
    replay: Callable[[], None] | None = None
    views: list[torch.Tensor] | None = None
    result: Callable[[], Any] | None = None
