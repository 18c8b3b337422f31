"""Do a graph's batch rows stay independent? A dataflow analysis over an aten-level FX graph.

Padding a batch of ``n`` to a captured size ``S`` is only sound when every real row's result
(and every state write) depends on that row alone: then the ``S - n`` padding rows cannot change
what the caller gets back. This module proves that, op by op, on a graph traced with the batch
size as one symbol ``s`` (both the ``aclgraph`` compile path and :func:`ascend_aclgraph.capture`
trace such a graph, see :mod:`ascend_aclgraph.batch_layout`).

Every tensor value gets one of three annotations:

* ``None``: it does not depend on the batch (weights, constants, module state);
* :class:`Rows` ``(dim, factor)``: dim ``dim`` has extent ``factor * s`` and batch row ``r``
  lives in ``[r * factor, (r + 1) * factor)`` along it, computed from row ``r`` of the inputs
  only (``factor`` is 1 except after a batch-major flatten such as ``x.reshape(-1)``);
* :class:`Mixed`: some row of it depends on other rows (a reduction, contraction, sort, softmax
  or shift over the batch dim, a concatenation that interleaves padding with real rows, a gather
  of rows by value, an op we cannot prove row-wise), with the op and the user's source line.

The analysis is conservative: an op it does not know is ``Mixed`` unless it is tagged pointwise
or registered with :func:`register_row_wise_op`. A false ``Mixed`` only costs speed (the graph
is captured at exact sizes); a false "row-wise" would be a wrong answer.

Writes are tracked too: which graph inputs an in-place op writes (their real rows are copied back
to the caller after a replay), and writes of padded rows into a state tensor through a batched
view of it (``cache[:s].copy_(x)``), which would change rows eager never touches.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

__all__ = [
    "Mixed",
    "RowAnalysis",
    "Rows",
    "analyze_rows",
    "register_row_wise_op",
    "row_wise_ops",
]


@dataclass(frozen=True)
class Rows:
    """A tensor whose dim ``dim`` carries the batch, ``factor`` elements per row."""

    dim: int
    factor: int = 1


@dataclass(frozen=True)
class Mixed:
    """A tensor some of whose rows depend on other rows; ``reason`` says which op and where."""

    reason: str


Annotation = Rows | Mixed | None

# Ops whose every output row depends on the same row of every batched input along a leading
# dim, registered by their owners (fused kernels, attention ops that handle padding themselves).
_ROW_WISE: set[str] = set()


def register_row_wise_op(qualified_name: str) -> None:
    """Declare a custom op row-wise: output row ``r`` depends only on input row ``r``.

    ``qualified_name`` is ``"namespace::name"`` (all overloads). Register only ops for which that
    holds along their batched (leading) dims, e.g. a fused RMSNorm, or an attention op that reads
    the real token count from its metadata and never lets padding rows reach real ones.
    """
    if "::" not in qualified_name:
        raise ValueError(f"expected 'namespace::op_name', got {qualified_name!r}")
    _ROW_WISE.add(qualified_name)


def row_wise_ops() -> frozenset[str]:
    """The custom ops registered with :func:`register_row_wise_op`."""
    return frozenset(_ROW_WISE)


@dataclass
class RowAnalysis:
    """What :func:`analyze_rows` found."""

    # Per graph output (flattened): its annotation, or ("size", k) for a SymInt k * batch.
    outputs: list[Annotation | tuple[str, int]]
    # Placeholder indices the graph writes in place.
    written_inputs: set[int] = field(default_factory=set)
    # Why padding is unsound, first cause first (empty: padding is sound).
    mixing: list[str] = field(default_factory=list)


_aten = torch.ops.aten

# Ops that keep the element order of their input (so a batch-major block stays one).
_ORDER_PRESERVING = {
    "aten::view",
    "aten::reshape",
    "aten::_unsafe_view",
    "aten::_reshape_alias",
    "aten::alias",
    "aten::detach",
    "aten::clone",
    "aten::contiguous",
    "aten::_to_copy",
    "aten::to",
    "aten::lift_fresh_copy",
    "aten::lift_fresh",
    "aten::flatten",
    "aten::unflatten",
    "aten::squeeze",
    "aten::unsqueeze",
    "aten::view_as",
    "aten::reshape_as",
    "aten::type_as",
    "aten::_to_dtype",
    "aten::fill",
    "aten::zeros_like",
    "aten::ones_like",
    "aten::empty_like",
    "aten::full_like",
    "aten::rand_like",
    "aten::randn_like",
}
_PERMUTING = {"aten::permute", "aten::transpose", "aten::t", "aten::swapaxes", "aten::movedim"}
_CONTRACTIONS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mv",
    "aten::addmv",
    "aten::matmul",
    "aten::_int_mm",
    "aten::dot",
    "aten::vdot",
    "aten::linear",
}
# Ops that read or write along a `dim`/`dims` argument without mixing rows when that dim is not
# the batch dim; along the batch dim they do mix (a reduction, a sort, a shift, a gather).
_DIM_ARGUMENTS = ("dim", "dims")


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _batch_factor(size: Any, batch: sympy.Symbol) -> int | None:
    """k if ``size`` is k * batch for a positive int k, else None."""
    expr = _expr(size)
    if batch not in expr.free_symbols:
        return None
    ratio = sympy.simplify(expr / batch)
    if ratio.is_Integer and int(ratio) > 0:
        return int(ratio)
    return -1  # depends on the batch, but not as whole rows (s + 1, s**2, 2*s - 1, ...)


def _prod(sizes: Iterable[Any]) -> sympy.Expr:
    out: sympy.Expr = sympy.Integer(1)
    for s in sizes:
        out = out * _expr(s)
    return sympy.simplify(out)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def user_location(node: fx.Node) -> str:
    """The innermost user source line of ``node`` (outside torch and this runtime)."""
    trace = node.meta.get("stack_trace") or ""
    own = os.path.dirname(__file__) + os.sep
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    best = ""
    lines = trace.strip().splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith("File "):
            continue
        path = line.split('"')[1] if '"' in line else ""
        if path.startswith((own, torch_dir, "<")):
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        parts = line.split(", ")
        lineno = parts[1].replace("line ", "") if len(parts) > 1 else "?"
        best = f"{path}:{lineno}" + (f" ({code})" if code else "")
    return best or "<unknown location>"


class _Analyzer:
    def __init__(self, graph: fx.Graph, batch: sympy.Symbol, state_inputs: set[int]) -> None:
        self.graph = graph
        self.batch = batch
        self.ann: dict[fx.Node, Any] = {}
        # Placeholder index each value aliases (through views), if any.
        self.alias_of: dict[fx.Node, int] = {}
        self.state_inputs = state_inputs
        self.result = RowAnalysis(outputs=[])

    # --- helpers ---------------------------------------------------------------------------

    def mixed(self, node: fx.Node, why: str) -> Mixed:
        op = node.target
        name = getattr(op, "__name__", str(op))
        if isinstance(op, torch._ops.OpOverload):
            name = f"{op._schema.name}.{op._overloadname}"
        reason = f"{name} at {user_location(node)}: {why}"
        return Mixed(reason)

    def rows_of_value(self, value: Any) -> Annotation:
        """Annotation of a tensor from its shape alone: its unique batch dim, if any."""
        if not isinstance(value, torch.Tensor):
            return None
        found: list[Rows] = []
        for d, size in enumerate(value.shape):
            k = _batch_factor(size, self.batch)
            if k is None:
                continue
            if k < 0:
                return Mixed(f"a dim of size {size} depends on the batch size but not row-wise")
            found.append(Rows(d, k))
        if not found:
            return None
        if len(found) > 1:
            return Mixed(f"shape {tuple(value.shape)} has the batch in more than one dim")
        return found[0]

    def unique_rows(self, node: fx.Node, value: Any) -> Annotation:
        ann = self.rows_of_value(value)
        if ann is None and isinstance(value, torch.Tensor):
            return self.mixed(node, "the batch dim disappears (reduced or contracted away)")
        if isinstance(ann, Mixed):
            return self.mixed(node, ann.reason)
        return ann

    # --- the walk --------------------------------------------------------------------------

    def run(self, placeholder_anns: Sequence[Annotation]) -> RowAnalysis:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for i, (node, ann) in enumerate(zip(placeholders, placeholder_anns, strict=True)):
            self.ann[node] = ann
            self.alias_of[node] = i
        for node in self.graph.nodes:
            if node.op == "call_function":
                self.visit(node)
            elif node.op == "get_attr":
                self.ann[node] = None
            elif node.op == "output":
                self.collect_outputs(node)
        return self.result

    def collect_outputs(self, node: fx.Node) -> None:
        flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
        for out in flat:
            value = _val(out)
            if isinstance(value, torch.SymInt):
                k = _batch_factor(value, self.batch)
                if k is not None and k > 0:
                    self.result.outputs.append(("size", k))
                elif k is not None:
                    self.result.outputs.append(Mixed(f"an output size {value} is not k * batch"))
                else:
                    self.result.outputs.append(None)
                continue
            ann = self.ann.get(out) if isinstance(out, fx.Node) else None
            self.result.outputs.append(ann)

    def visit(self, node: fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            base, index = node.args
            ann = self.ann.get(base)  # type: ignore[arg-type]
            if isinstance(ann, list):
                self.ann[node] = ann[index]  # type: ignore[index]
            else:
                self.ann[node] = ann
            if base in self.alias_of:
                self.alias_of[node] = self.alias_of[base]  # type: ignore[index]
            return
        if not isinstance(target, torch._ops.OpOverload):
            # Python arithmetic on sizes (operator.mul of SymInts) and the like.
            self.ann[node] = None
            return
        value = node.meta.get("val")
        if not isinstance(value, (torch.Tensor, list, tuple)):
            self.ann[node] = None  # sym_size and other host-side size arithmetic
            return
        inputs = self.tensor_inputs(node)
        mixed = next((a for _, a in inputs if isinstance(a, Mixed)), None)
        if mixed is not None:
            out: Any = mixed
        else:
            out = self.transfer(node, target, inputs, value)
        if isinstance(out, Mixed) and mixed is None:
            self.note(out)
        if isinstance(value, (list, tuple)) and not isinstance(out, list):
            out = [out if isinstance(v, torch.Tensor) else None for v in value]
        self.ann[node] = out
        self.track_writes(node, target, inputs)

    def note(self, mixed: Mixed) -> None:
        if mixed.reason not in self.result.mixing:
            self.result.mixing.append(mixed.reason)

    def tensor_inputs(self, node: fx.Node) -> list[tuple[fx.Node, Annotation]]:
        found: list[tuple[fx.Node, Annotation]] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor):
                found.append((a, self.ann.get(a)))

        fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def bound(self, node: fx.Node, target: torch._ops.OpOverload) -> dict[str, Any]:
        """The node's arguments by schema name (defaults filled in)."""
        out: dict[str, Any] = {}
        for i, arg in enumerate(target._schema.arguments):
            if i < len(node.args):
                out[arg.name] = node.args[i]
            elif arg.name in node.kwargs:
                out[arg.name] = node.kwargs[arg.name]
            elif arg.has_default_value():
                out[arg.name] = arg.default_value
        return out

    # --- writes ----------------------------------------------------------------------------

    def track_writes(
        self,
        node: fx.Node,
        target: torch._ops.OpOverload,
        inputs: list[tuple[fx.Node, Annotation]],
    ) -> None:
        schema = target._schema
        bound = self.bound(node, target)
        written: list[fx.Node] = []
        for arg in schema.arguments:
            info = arg.alias_info
            value = bound.get(arg.name)
            if isinstance(value, fx.Node) and info is not None:
                if info.is_write:
                    written.append(value)
                # A view (or an in-place op's result) aliases its base input.
                if value in self.alias_of and not arg.is_out:
                    self.alias_of[node] = self.alias_of[value]
        for dst in written:
            base = self.alias_of.get(dst)
            if base is not None:
                self.result.written_inputs.add(base)
            sources = [a for n, a in inputs if n is not dst]
            src_batched = any(isinstance(a, Rows) for a in sources)
            dst_ann = self.ann.get(dst)
            if (
                base is not None
                and base in self.state_inputs
                and isinstance(dst_ann, Rows)
                and src_batched
                and schema.name not in ("aten::index_put_", "aten::index_put")
            ):
                self.note(
                    self.mixed(
                        node,
                        "writes padding rows into a state tensor through a batch-sized view "
                        "of it (rows eager never writes)",
                    )
                )
            # Data from other rows written into a value makes it mixed from here on.
            src_mixed = next((a for a in sources if isinstance(a, Mixed)), None)
            if src_mixed is not None:
                self.ann[dst] = src_mixed

    # --- transfer functions ----------------------------------------------------------------

    def transfer(
        self,
        node: fx.Node,
        target: torch._ops.OpOverload,
        inputs: list[tuple[fx.Node, Annotation]],
        value: Any,
    ) -> Any:
        name = target._schema.name
        batched = [(n, a) for n, a in inputs if isinstance(a, Rows)]
        if not batched:
            # Nothing batched flows in; a batch-sized result (arange(s), zeros(s, d), a slice
            # cache[:s] of state) is row-aligned by construction: row r is made for row r.
            return self.rows_of_value(value) if not isinstance(value, (list, tuple)) else None
        if name in _ROW_WISE or name.split("::")[0] + "::*" in _ROW_WISE:
            return self.leading_dims(node, batched, value, name)
        if name in _PERMUTING:
            return self.permute(node, target, batched[0][1], value)
        if name in ("aten::expand", "aten::expand_as", "aten::broadcast_to"):
            ((_, rows),) = batched[:1]
            assert isinstance(rows, Rows)
            return Rows(rows.dim + value.dim() - _val(batched[0][0]).dim(), rows.factor)
        if name in ("aten::slice", "aten::narrow", "aten::select"):
            return self.slice(node, target, batched[0], value)
        if name in ("aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind"):
            return self.split(node, target, batched[0], value)
        if name in ("aten::cat", "aten::stack"):
            return self.concat(node, target, batched, value)
        if name in _CONTRACTIONS:
            return self.contraction(node, target, value)
        if "scaled_dot_product" in name or name.startswith("aten::_flash_attention"):
            return self.leading_dims(node, batched, value, name, trailing=2)
        if name in (
            "aten::index",
            "aten::_unsafe_index",
            "aten::index_put",
            "aten::index_put_",
            "aten::_index_put_impl_",
            "aten::_unsafe_index_put",
        ):
            return self.index(node, target, value)
        if name == "aten::embedding":
            return self.unique_rows(node, value)
        if name in _ORDER_PRESERVING:
            return self.reshape(node, batched[0], value)
        dim_rows = self.dim_argument(node, target, batched)
        if dim_rows is not None:
            return dim_rows
        if torch.Tag.pointwise in target.tags or torch.Tag.inplace_view in target.tags:
            return self.pointwise(node, batched, value)
        if name in ("aten::convolution", "aten::_convolution", "aten::conv1d", "aten::conv2d"):
            return self.leading_dims(node, batched, value, name, max_dim=0)
        if isinstance(value, torch.Tensor) and self.rows_of_value(value) is None:
            return self.mixed(node, "reduces the batch dim away (its result mixes every row)")
        return self.mixed(
            node,
            "no rule proves this op keeps batch rows independent (register it with "
            "ascend_aclgraph.register_row_wise_op if it does)",
        )

    def pointwise(
        self, node: fx.Node, batched: Sequence[tuple[fx.Node, Annotation]], value: Any
    ) -> Annotation:
        out_dims = value.dim() if isinstance(value, torch.Tensor) else 0
        placed: set[Rows] = set()
        for n, rows in batched:
            assert isinstance(rows, Rows)
            placed.add(Rows(rows.dim + out_dims - _val(n).dim(), rows.factor))
        if len(placed) != 1:
            return self.mixed(node, "combines different rows of its inputs (outer broadcast)")
        return placed.pop()

    def permute(
        self, node: fx.Node, target: torch._ops.OpOverload, rows: Annotation, value: Any
    ) -> Annotation:
        assert isinstance(rows, Rows)
        src = _val(node.args[0])
        bound = self.bound(node, target)
        ndim = src.dim()
        order = list(range(ndim))
        name = target._schema.name
        if name == "aten::permute":
            order = [d % ndim for d in bound["dims"]]
        elif name in ("aten::transpose", "aten::swapaxes"):
            a, b = (bound.get("dim0", bound.get("axis0")), bound.get("dim1", bound.get("axis1")))
            a, b = a % ndim, b % ndim
            order[a], order[b] = order[b], order[a]
        elif name == "aten::t":
            order = order[::-1]
        else:
            return self.unique_rows(node, value)
        return Rows(order.index(rows.dim), rows.factor)

    def reshape(self, node: fx.Node, src: tuple[fx.Node, Annotation], value: Any) -> Annotation:
        """Element order is kept: find where the batch-major block lands in the new shape."""
        n, rows = src
        assert isinstance(rows, Rows)
        in_shape = list(_val(n).shape)
        out_shape = list(value.shape)
        before = _prod(in_shape[: rows.dim])
        block = sympy.simplify(rows.factor * _prod(in_shape[rows.dim + 1 :]))
        for e, size in enumerate(out_shape):
            k = _batch_factor(size, self.batch)
            if k is None or k < 0:
                continue
            if (
                sympy.simplify(_prod(out_shape[:e]) - before) == 0
                and sympy.simplify(k * _prod(out_shape[e + 1 :]) - block) == 0
            ):
                return Rows(e, k)
        if len(in_shape) == len(out_shape) and all(
            sympy.simplify(_expr(a) - _expr(b)) == 0
            for a, b in zip(in_shape, out_shape, strict=True)
        ):
            return rows
        return self.mixed(node, "reshapes the batch dim so that rows no longer stay whole")

    def slice(
        self,
        node: fx.Node,
        target: torch._ops.OpOverload,
        src: tuple[fx.Node, Annotation],
        value: Any,
    ) -> Annotation:
        n, rows = src
        assert isinstance(rows, Rows)
        bound = self.bound(node, target)
        ndim = _val(n).dim()
        dim = (bound.get("dim") or 0) % ndim
        name = target._schema.name
        if dim != rows.dim:
            if name == "aten::select" and dim < rows.dim:
                return Rows(rows.dim - 1, rows.factor)
            return rows
        if name != "aten::select":
            k = _batch_factor(value.shape[dim], self.batch)
            start = bound.get("start") or 0
            step = bound.get("step", 1)
            if k == rows.factor and start == 0 and step in (1, None):
                return rows
        return self.mixed(node, "selects rows by position (a padding row may be picked)")

    def split(
        self,
        node: fx.Node,
        target: torch._ops.OpOverload,
        src: tuple[fx.Node, Annotation],
        value: Any,
    ) -> Any:
        n, rows = src
        assert isinstance(rows, Rows)
        bound = self.bound(node, target)
        dim = (bound.get("dim") or 0) % _val(n).dim()
        if dim == rows.dim:
            return self.mixed(node, "splits along the batch dim")
        if target._schema.name == "aten::unbind":
            return [Rows(rows.dim - (dim < rows.dim), rows.factor) for _ in value]
        return [rows for _ in value]

    def concat(
        self,
        node: fx.Node,
        target: torch._ops.OpOverload,
        batched: Sequence[tuple[fx.Node, Annotation]],
        value: Any,
    ) -> Annotation:
        bound = self.bound(node, target)
        ndim = value.dim()
        dim = (bound.get("dim") or 0) % ndim
        stacking = target._schema.name == "aten::stack"
        placed = set()
        for _, rows in batched:
            assert isinstance(rows, Rows)
            placed.add(Rows(rows.dim + (stacking and dim <= rows.dim), rows.factor))
        if len(placed) != 1:
            return self.mixed(node, "joins tensors whose batch dims do not line up")
        rows = placed.pop()
        if not stacking and dim == rows.dim:
            return self.mixed(
                node, "concatenates along the batch dim (padding rows land between real rows)"
            )
        tensors = bound.get("tensors") or []
        if len(batched) != len(tensors):
            # An unbatched tensor joined along another dim must not carry a batch extent.
            for t in tensors:
                v = _val(t)
                if (
                    isinstance(v, torch.Tensor)
                    and self.ann.get(t) is None
                    and v.dim() == ndim
                    and _batch_factor(v.shape[rows.dim], self.batch) is not None
                ):
                    return self.mixed(node, "joins a batch-sized tensor of unknown rows")
        return rows

    def contraction(self, node: fx.Node, target: torch._ops.OpOverload, value: Any) -> Annotation:
        """Matrix products: the batch may be a kept dim of one operand, never contracted."""
        bound = self.bound(node, target)
        name = target._schema.name
        operands = {
            "aten::mm": ("self", "mat2"),
            "aten::_int_mm": ("self", "mat2"),
            "aten::addmm": ("mat1", "mat2"),
            "aten::bmm": ("self", "mat2"),
            "aten::baddbmm": ("batch1", "batch2"),
            "aten::matmul": ("self", "other"),
            "aten::mv": ("self", "vec"),
            "aten::addmv": ("mat", "vec"),
            "aten::dot": ("self", "tensor"),
            "aten::vdot": ("self", "other"),
            "aten::linear": ("input", "weight"),
        }[name]
        a, b = (bound.get(k) for k in operands)
        ra, rb = self.ann.get(a), self.ann.get(b)  # type: ignore[arg-type]
        va, vb = _val(a), _val(b)
        if name == "aten::linear":
            # weight is [out, in]: contracted over its last dim, like the input's last dim.
            if isinstance(rb, Rows) or (isinstance(ra, Rows) and ra.dim == va.dim() - 1):
                return self.mixed(node, "contracts over the batch dim")
            return self.unique_rows(node, value) if isinstance(ra, Rows) else None
        contracted_a = va.dim() - 1
        contracted_b = max(vb.dim() - 2, 0)
        if isinstance(ra, Rows) and ra.dim == contracted_a:
            return self.mixed(node, "contracts over the batch dim (sums across rows)")
        if isinstance(rb, Rows) and rb.dim == contracted_b:
            return self.mixed(node, "contracts over the batch dim (sums across rows)")
        if isinstance(ra, Rows) and isinstance(rb, Rows):
            batch_dims = va.dim() >= 3 and ra.dim < va.dim() - 2 and rb.dim < vb.dim() - 2
            if not batch_dims or ra.dim - va.dim() != rb.dim - vb.dim():
                return self.mixed(node, "pairs every row with every other row (outer product)")
        return self.unique_rows(node, value)

    def leading_dims(
        self,
        node: fx.Node,
        batched: Sequence[tuple[fx.Node, Annotation]],
        value: Any,
        name: str,
        *,
        trailing: int = 1,
        max_dim: int | None = None,
    ) -> Any:
        """Ops that are independent per index of their leading dims (attention, fused norms)."""
        positions = set()
        for n, rows in batched:
            assert isinstance(rows, Rows)
            ndim = _val(n).dim()
            limit = ndim - trailing if max_dim is None else max_dim + 1
            if rows.dim >= limit:
                return self.mixed(node, "the batch is in a dim this op mixes across")
            positions.add(rows.dim - ndim)
        if len(positions) != 1:
            return self.mixed(node, "its inputs carry the batch in different dims")
        if isinstance(value, (list, tuple)):
            return [self.rows_of_value(v) if isinstance(v, torch.Tensor) else None for v in value]
        return self.unique_rows(node, value)

    def index(self, node: fx.Node, target: torch._ops.OpOverload, value: Any) -> Annotation:
        bound = self.bound(node, target)
        base = bound.get("self")
        base_rows = self.ann.get(base)  # type: ignore[arg-type]
        indices = bound.get("indices") or []
        if isinstance(base_rows, Rows):
            if base_rows.dim < len(indices) and indices[base_rows.dim] is not None:
                return self.mixed(node, "picks batch rows by index values (a gather across rows)")
            if any(i is not None for i in indices[: base_rows.dim]):
                # Advanced indexing before the batch dim moves it: let the shape decide.
                return self.unique_rows(node, value)
        index_rows = {
            Rows(a.dim - _val(i).dim(), a.factor)
            for i in indices
            if isinstance(i, fx.Node) and isinstance(a := self.ann.get(i), Rows)
        }
        if len(index_rows) > 1:
            return self.mixed(node, "its index tensors carry the batch in different dims")
        if target._schema.name in (
            "aten::index_put_",
            "aten::index_put",
            "aten::_index_put_impl_",
            "aten::_unsafe_index_put",
        ):
            # The result is `self`, written at the indexed positions.
            return base_rows if isinstance(base_rows, Rows) else None
        return self.unique_rows(node, value)

    def dim_argument(
        self,
        node: fx.Node,
        target: torch._ops.OpOverload,
        batched: Sequence[tuple[fx.Node, Annotation]],
    ) -> Annotation | list[Annotation] | None:
        """Ops with a ``dim``/``dims`` argument: mixing along the batch dim, else row-wise."""
        schema = target._schema
        names = [a.name for a in schema.arguments]
        dim_name = next((d for d in _DIM_ARGUMENTS if d in names), None)
        if dim_name is None:
            if any(a.name in ("keepdim",) for a in schema.arguments):
                return self.mixed(node, "reduces over every dim, the batch included")
            return None
        bound = self.bound(node, target)
        dims = bound.get(dim_name)
        first = bound.get("self", bound.get("input"))
        src = _val(first) if isinstance(first, fx.Node) else _val(batched[0][0])
        ndim = max(src.dim(), 1)
        if dims is None or dims == []:
            # dim=None / dims=[] reduce over everything.
            covered = set(range(ndim))
        elif isinstance(dims, (list, tuple)):
            covered = {d % ndim for d in dims}
        else:
            covered = {dims % ndim}
        for n, rows in batched:
            assert isinstance(rows, Rows)
            if _val(n).dim() == ndim and rows.dim in covered:
                return self.mixed(
                    node, "works along the batch dim (reduces, sorts, shifts or gathers rows)"
                )
        value = node.meta.get("val")
        if isinstance(value, (list, tuple)):
            return [
                self.unique_rows(node, v) if isinstance(v, torch.Tensor) else None for v in value
            ]
        return self.unique_rows(node, value)


def analyze_rows(
    graph: fx.Graph,
    batch: sympy.Symbol,
    placeholder_rows: Sequence[Annotation],
    *,
    state_inputs: Iterable[int] = (),
) -> RowAnalysis:
    """Annotate every value of ``graph`` (module docstring) and report outputs, writes, mixing.

    ``placeholder_rows`` gives each placeholder's annotation (``Rows`` for the caller's batched
    inputs, ``None`` for the rest); ``state_inputs`` are placeholders holding module state
    (parameters, buffers, captured-by-address tensors), whose batch-sized views must not take
    padding rows.
    """
    return _Analyzer(graph, batch, set(state_inputs)).run(placeholder_rows)


def describe(reasons: Sequence[str]) -> str:
    """One line for logs: the first cause, and how many more there are."""
    if not reasons:
        return "rows are independent"
    more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return reasons[0] + more
