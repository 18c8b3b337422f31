"""RMSNorm and add+RMSNorm fusion on aot_autograd (aten-level) inference graphs.

The pattern is what HF transformers' ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``Qwen3RMSNorm``
and vLLM's ``RMSNorm.forward_static`` trace to::

    xf  = _to_copy(x, dtype=float32)          # absent when x is already float32
    var = mean.dim(pow(xf, 2), [-1], True)
    h   = mul(xf, rsqrt(add(var, eps)))
    h   = _to_copy(h, dtype=x.dtype)          # absent when x is float32
    y   = mul(weight, h)                      # either operand order

and, for add+RMSNorm, ``x = add(a, b)`` (HF: ``residual + attn_out``; vLLM's native form is the
same graph in float32). vLLM's 16-bit native add+RMSNorm adds in float32 before rounding the new
residual; that variant is not matched yet.

``eps`` comes in one of three forms. With static shapes it is a constant. Under
``torch.compile(..., dynamic=True)`` dynamo does not specialise Python floats: the module's
``eps`` attribute becomes a 0-d float64 CPU tensor input, read by a chain of dtype casts ending
in float32 (``add(var, convert_element_type(eps_t, float32))``); the fused op then reads that
tensor on the host at run time (``aten._local_scalar_dense``, one host read of a CPU scalar,
shared by the norms using the same input). A graph traced with ``.item()`` kept symbolic adds a
``SymFloat`` node, passed on as is. Anything else added to the variance (a tensor with
elements, a device tensor, an eps rounded below float32 on the way) is not this pattern.

A match is declined when an intermediate escapes (is used outside the pattern), when the weight is
not ``[hidden]``, when the down-cast goes to another dtype than the input's, or when the add
broadcasts or changes dtype. Declines of a recognised norm are recorded with their reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.passes.fx_utils import (
    Decline,
    FusionRewrite,
    SkippedMatch,
    aten,
    fake_val,
    is_call,
    last_dim,
    same_sizes,
)

__all__ = [
    "Eps",
    "RmsNormMatch",
    "fuse_add_rms_norm",
    "fuse_rms_norm",
    "match_rms_norm",
    "same_eps",
]

prims = torch.ops.prims

# Dtypes an eps may pass through on its way to the float32 add without being rounded more than
# the add itself rounds it (the fused kernels round the host float to float32 the same way).
_EPS_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Eps:
    """The eps of a matched norm: a constant, or a value only known when the graph runs.

    Exactly one of ``value`` (a constant) and ``node`` is set; ``node`` is either a node whose
    value is a ``SymFloat`` or, when ``host_tensor`` is True, a 0-d CPU tensor that holds eps.
    """

    value: float | None = None
    node: fx.Node | None = None
    host_tensor: bool = False

    def operand(self, rewrite: FusionRewrite) -> float | fx.Node:
        """The fused op's ``float eps`` argument, inserting a host read of a tensor eps."""
        if self.value is not None:
            return self.value
        assert self.node is not None
        if not self.host_tensor:
            return self.node
        return _host_scalar(rewrite, self.node)


def _host_scalar(rewrite: FusionRewrite, tensor: fx.Node) -> fx.Node:
    """A node reading the 0-d CPU tensor ``tensor`` as a Python float (shared per tensor)."""
    for user in tensor.users:
        if is_call(user, aten._local_scalar_dense.default):
            return user
    from torch._guards import detect_fake_mode

    val = fake_val(tensor)
    mode = detect_fake_mode([val]) if val is not None else None
    if mode is None or mode.shape_env is None:
        raise Decline("eps is a run-time tensor, but the graph has no shape environment")
    # What tracing ``.item()`` would have recorded: a float known only at run time.
    symbol = mode.shape_env.create_unbacked_symfloat()
    return rewrite.insert(aten._local_scalar_dense.default, (tensor,), val=symbol)


def same_eps(a: object, b: object) -> bool:
    """Whether two fused norms' ``eps`` arguments are provably the same value at run time."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if a is b:
            return True
        # Two host reads of one tensor are one value.
        return (
            is_call(a, aten._local_scalar_dense.default)
            and is_call(b, aten._local_scalar_dense.default)
            and a.args[0] is b.args[0]
        )
    return a == b


def _dtype_cast(node: object) -> tuple[fx.Node, torch.dtype] | None:
    """``(input, dtype)`` if ``node`` only changes the dtype of its input."""
    if is_call(node, prims.convert_element_type.default) and not node.kwargs:
        src, dtype = node.args
    elif is_call(node, aten._to_copy.default) and set(node.kwargs) == {"dtype"}:
        src, dtype = node.args[0], node.kwargs["dtype"]
    else:
        return None
    if not isinstance(src, fx.Node) or not isinstance(dtype, torch.dtype):
        return None
    return src, dtype


def _match_eps(operand: object) -> Eps | str | None:
    """Classify what is added to the variance: an :class:`Eps`, a decline reason, or None."""
    if isinstance(operand, bool):
        return None
    if isinstance(operand, (int, float)):
        return Eps(value=float(operand))
    if not isinstance(operand, fx.Node):
        return None
    val = operand.meta.get("val")
    if isinstance(val, torch.SymFloat):
        return Eps(node=operand)
    if not isinstance(val, torch.Tensor):
        return None
    if val.dim() != 0:
        return f"the term added to the variance is a tensor of shape {list(val.shape)}, not eps"
    root = operand
    while (cast := _dtype_cast(root)) is not None:
        src, dtype = cast
        if dtype not in _EPS_DTYPES:
            return f"eps is rounded to {dtype} before it is added to the variance"
        root = src
    root_val = fake_val(root)
    if root_val is None or not root_val.is_floating_point():
        return "the scalar added to the variance is not a floating-point eps"
    if root_val.device.type != "cpu":
        return (
            f"eps is a 0-d tensor on {root_val.device}: passing it to the fused op would read "
            "it on the host, a device sync"
        )
    return Eps(node=root, host_tensor=True)


@dataclass
class RmsNormMatch:
    """One matched RMSNorm: ``out = weight * norm(x, eps)``; ``internal`` nodes die on fusion."""

    x: fx.Node
    weight: fx.Node
    eps: Eps
    out: fx.Node
    internal: list[fx.Node]
    upcast: fx.Node | None  # the float32 up-cast node of x, if any
    eps_nodes: list[fx.Node] = field(default_factory=list)  # eps casts, erased when dead


def _is_f32_upcast(node: object) -> bool:
    # Only a pure dtype change counts: a device or layout change is not part of the pattern.
    return (
        is_call(node, aten._to_copy.default)
        and isinstance(node, fx.Node)
        and set(node.kwargs) == {"dtype"}
        and node.kwargs["dtype"] == torch.float32
    )


def _other(node: fx.Node, one: fx.Node) -> object:
    a, b = node.args[0], node.args[1]
    return b if a is one else a


def _square_of(node: object) -> fx.Node | None:
    """``x`` if ``node`` is ``pow(x, 2)`` or ``mul(x, x)``."""
    squares = is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2
    if not (squares or (is_call(node, aten.mul.Tensor) and node.args[0] is node.args[1])):
        return None
    assert isinstance(node, fx.Node)
    src = node.args[0]
    return src if isinstance(src, fx.Node) else None


def _match(rsqrt: fx.Node) -> RmsNormMatch | str | None:
    """The RMSNorm around an ``aten.rsqrt`` node; a reason once the core is recognised."""
    if not is_call(rsqrt, aten.rsqrt.default) or len(rsqrt.users) != 1:
        return None
    add_eps = rsqrt.args[0]
    if not is_call(add_eps, aten.add.Tensor, aten.add.Scalar) or len(add_eps.users) != 1:
        return None
    mean = next((a for a in add_eps.args[:2] if is_call(a, aten.mean.dim)), None)
    if mean is None or len(mean.users) != 1:
        return None
    sq = mean.args[0]
    xf = _square_of(sq)
    if xf is None or not isinstance(sq, fx.Node) or len(sq.users) != 1:
        return None
    # The core, rsqrt(mean(x^2) + something), is recognised: from here on, say why not.
    if add_eps.kwargs:
        return "the add of eps has an alpha"
    eps = _match_eps(_other(add_eps, mean))
    if eps is None or isinstance(eps, str):
        return eps or "what is added to the variance is not an eps"
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if keepdim is not True or mean.kwargs.get("dtype") is not None:
        return "the mean does not keep its dim, or accumulates in another dtype"
    xf_val, add_val, mean_val = fake_val(xf), fake_val(add_eps), fake_val(mean)
    if xf_val is None or add_val is None or mean_val is None:
        return "missing fake tensor metadata"
    if xf_val.dtype != torch.float32 or add_val.dtype != torch.float32:
        return f"the statistics are computed in {xf_val.dtype}, not float32"
    if not same_sizes(add_val.shape, mean_val.shape):
        return "adding eps broadcasts the variance"
    if not last_dim(mean.args[1], xf_val.dim()):
        return f"the mean is over dims {mean.args[1]}, not the last dim"
    (scale,) = rsqrt.users
    if not is_call(scale, aten.mul.Tensor) or _other(scale, rsqrt) is not xf:
        return "rsqrt(...) does not scale the normalised input"
    if len(scale.users) != 1:
        return "the normalised value is used outside the norm"
    (nxt,) = scale.users
    internal = [sq, mean, add_eps, rsqrt, scale]
    downcast: fx.Node | None = None
    if is_call(nxt, aten._to_copy.default) and set(nxt.kwargs) == {"dtype"}:
        downcast = nxt
        if len(downcast.users) != 1:
            return "the down-cast normalised value is used outside the norm"
        (nxt,) = downcast.users
        internal.append(downcast)
    if not is_call(nxt, aten.mul.Tensor):
        return "the normalised value is not multiplied by a weight"
    prev = downcast if downcast is not None else scale
    weight = _other(nxt, prev)
    if not isinstance(weight, fx.Node) or weight is prev:
        return "the normalised value is not multiplied by a weight tensor"

    upcast = xf if _is_f32_upcast(xf) else None
    x = upcast.args[0] if upcast is not None else xf
    x_val = fake_val(x)
    if not isinstance(x, fx.Node) or x_val is None:
        return "missing fake tensor metadata"
    # The down-cast must undo the up-cast exactly: any other dtype is a dtype change in between.
    out_dtype = downcast.kwargs["dtype"] if downcast is not None else torch.float32
    if out_dtype != x_val.dtype:
        return f"the norm rounds {x_val.dtype} input to {out_dtype}"
    w_val = fake_val(weight)
    if w_val is None or w_val.dim() != 1 or not same_sizes(w_val.shape, x_val.shape[-1:]):
        shape = list(w_val.shape) if w_val is not None else "?"
        return f"the weight has shape {shape}, not [{x_val.shape[-1]}]"
    if upcast is not None:
        internal.append(upcast)
    eps_nodes: list[fx.Node] = []
    cursor = _other(add_eps, mean)
    while isinstance(cursor, fx.Node) and (cast := _dtype_cast(cursor)) is not None:
        eps_nodes.append(cursor)
        cursor = cast[0]
    return RmsNormMatch(x, weight, eps, nxt, internal, upcast, eps_nodes)


def match_rms_norm(rsqrt: fx.Node) -> RmsNormMatch | None:
    """Match the RMSNorm around an ``aten.rsqrt`` node, or return None."""
    m = _match(rsqrt)
    return m if isinstance(m, RmsNormMatch) else None


def _escapes(match: RmsNormMatch) -> bool:
    """Whether the float32 up-cast (an intermediate) is used outside the pattern."""
    if match.upcast is None:
        return False
    allowed = set(match.internal)
    return any(user not in allowed for user in match.upcast.users)


_ESCAPES = "the float32 copy of the input is used outside the norm (fusing would recompute it)"


def fuse_rms_norm(graph: fx.Graph, skipped: list[SkippedMatch] | None = None) -> int:
    """Replace every RMSNorm with ``npugraph_ex.rms_norm``; returns the number fused."""
    rewrite = FusionRewrite(graph, "rms_norm", skipped)
    op = fused_op("rms_norm")
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, aten.rsqrt.default):
            continue
        with rewrite.candidate(node):
            m = _match(node)
            if m is None:
                continue
            if isinstance(m, str):
                rewrite.decline(m)
                continue
            if _escapes(m):
                rewrite.decline(_ESCAPES)
                continue
            args = (m.x, m.weight, m.eps.operand(rewrite))
            erase = [m.out, *m.internal, *m.eps_nodes]
            if rewrite.apply(op, args, [m.out], erase):
                count += 1
    return count


def _plain_add(node: object) -> tuple[fx.Node, fx.Node] | str | None:
    """``(a, b)`` if ``node`` is ``aten.add.Tensor(a, b)`` without alpha, broadcast or promotion;
    a reason if it is an add that is not; None if it is no add."""
    if not is_call(node, aten.add.Tensor):
        return None
    if node.kwargs:
        return "the residual add has an alpha"
    a, b = node.args[0], node.args[1]
    out, va, vb = fake_val(node), fake_val(a), fake_val(b)
    if out is None or va is None or vb is None:
        return None  # a tensor plus a scalar: no residual add
    if not (same_sizes(va.shape, vb.shape) and same_sizes(va.shape, out.shape)):
        return "the residual add broadcasts"
    if not va.dtype == vb.dtype == out.dtype:
        return "the residual add changes dtype"
    assert isinstance(a, fx.Node)
    assert isinstance(b, fx.Node)
    return a, b


def fuse_add_rms_norm(graph: fx.Graph, skipped: list[SkippedMatch] | None = None) -> int:
    """Replace residual add + RMSNorm with ``npugraph_ex.add_rms_norm``; returns the count.

    Norms that are not fusable at all are reported by the ``rms_norm`` pass, not here.
    """
    rewrite = FusionRewrite(graph, "add_rms_norm", skipped)
    op = fused_op("add_rms_norm")
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, aten.rsqrt.default):
            continue
        with rewrite.candidate(node):
            m = match_rms_norm(node)
            if m is None:
                continue
            pair = _plain_add(m.x)
            if pair is None:
                continue
            if isinstance(pair, str):
                rewrite.decline(pair)
                continue
            if _escapes(m):
                rewrite.decline(_ESCAPES)
                continue
            args = (pair[0], pair[1], m.weight, m.eps.operand(rewrite))
            erase = [m.out, *m.internal, *m.eps_nodes, m.x]
            if rewrite.apply(op, args, [m.out, m.x], erase):
                count += 1
    return count
