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
A match is declined when an intermediate escapes (is used outside the pattern), when the weight is
not ``[hidden]``, when the down-cast goes to another dtype than the input's, or when the add
broadcasts or changes dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.passes.fx_utils import FusionRewrite, aten, fake_val, is_call, last_dim

__all__ = ["RmsNormMatch", "fuse_add_rms_norm", "fuse_rms_norm", "match_rms_norm"]


@dataclass
class RmsNormMatch:
    """One matched RMSNorm: ``out = weight * norm(x, eps)``; ``internal`` nodes die on fusion."""

    x: fx.Node
    weight: fx.Node
    eps: float
    out: fx.Node
    internal: list[fx.Node]
    upcast: fx.Node | None  # the float32 up-cast node of x, if any


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


def match_rms_norm(rsqrt: fx.Node) -> RmsNormMatch | None:
    """Match the RMSNorm around an ``aten.rsqrt`` node, or return None."""
    if not is_call(rsqrt, aten.rsqrt.default) or len(rsqrt.users) != 1:
        return None
    add_eps = rsqrt.args[0]
    if not is_call(add_eps, aten.add.Tensor, aten.add.Scalar) or len(add_eps.users) != 1:
        return None
    assert isinstance(add_eps, fx.Node)
    mean, eps = add_eps.args[0], add_eps.args[1]
    if isinstance(eps, int) and not isinstance(eps, bool):
        eps = float(eps)
    if not isinstance(eps, float) or add_eps.kwargs:
        return None
    if not is_call(mean, aten.mean.dim) or len(mean.users) != 1:
        return None
    assert isinstance(mean, fx.Node)
    sq = mean.args[0]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if keepdim is not True or mean.kwargs.get("dtype") is not None:
        return None
    if not isinstance(sq, fx.Node) or len(sq.users) != 1:
        return None
    is_square = is_call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2
    if is_square or (is_call(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]):
        xf = sq.args[0]
    else:
        return None
    xf_val = fake_val(xf)
    if not isinstance(xf, fx.Node) or xf_val is None or xf_val.dtype != torch.float32:
        return None
    if not last_dim(mean.args[1], xf_val.dim()):
        return None
    (scale,) = rsqrt.users
    if not is_call(scale, aten.mul.Tensor) or _other(scale, rsqrt) is not xf:
        return None
    if len(scale.users) != 1:
        return None
    (nxt,) = scale.users
    internal = [sq, mean, add_eps, rsqrt, scale]
    downcast: fx.Node | None = None
    if is_call(nxt, aten._to_copy.default) and set(nxt.kwargs) == {"dtype"}:
        downcast = nxt
        if len(downcast.users) != 1:
            return None
        (nxt,) = downcast.users
        internal.append(downcast)
    if not is_call(nxt, aten.mul.Tensor):
        return None
    prev = downcast if downcast is not None else scale
    weight = _other(nxt, prev)
    if not isinstance(weight, fx.Node) or weight is prev:
        return None

    upcast = xf if _is_f32_upcast(xf) else None
    x = upcast.args[0] if upcast is not None else xf
    x_val = fake_val(x)
    if not isinstance(x, fx.Node) or x_val is None:
        return None
    # The down-cast must undo the up-cast exactly: any other dtype is a dtype change in between.
    out_dtype = downcast.kwargs["dtype"] if downcast is not None else torch.float32
    if out_dtype != x_val.dtype:
        return None
    w_val = fake_val(weight)
    if w_val is None or w_val.dim() != 1 or w_val.shape[0] != x_val.shape[-1]:
        return None
    if upcast is not None:
        internal.append(upcast)
    return RmsNormMatch(x, weight, eps, nxt, internal, upcast)


def _escapes(match: RmsNormMatch, extra: tuple[fx.Node, ...] = ()) -> bool:
    """Whether the float32 up-cast (an intermediate) is used outside the pattern."""
    if match.upcast is None:
        return False
    allowed = set(match.internal) | set(extra)
    return any(user not in allowed for user in match.upcast.users)


def _all_matches(graph: fx.Graph) -> list[RmsNormMatch]:
    found = []
    for node in graph.nodes:
        m = match_rms_norm(node)
        if m is not None:
            found.append(m)
    return found


def fuse_rms_norm(graph: fx.Graph) -> int:
    """Replace every RMSNorm with ``npugraph_ex.rms_norm``; returns the number fused."""
    rewrite = FusionRewrite(graph)
    count = 0
    for m in _all_matches(graph):
        if _escapes(m):
            continue
        args = (m.x, m.weight, m.eps)
        if rewrite.apply(fused_op("rms_norm"), args, [m.out], [m.out, *m.internal]):
            count += 1
    return count


def _plain_add(node: object) -> tuple[fx.Node, fx.Node] | None:
    """``(a, b)`` if ``node`` is ``aten.add.Tensor(a, b)`` without alpha, broadcast or promotion."""
    if not is_call(node, aten.add.Tensor) or not isinstance(node, fx.Node) or node.kwargs:
        return None
    a, b = node.args[0], node.args[1]
    out, va, vb = fake_val(node), fake_val(a), fake_val(b)
    if out is None or va is None or vb is None:
        return None
    if not (va.shape == vb.shape == out.shape and va.dtype == vb.dtype == out.dtype):
        return None
    assert isinstance(a, fx.Node)
    assert isinstance(b, fx.Node)
    return a, b


def fuse_add_rms_norm(graph: fx.Graph) -> int:
    """Replace residual add + RMSNorm with ``npugraph_ex.add_rms_norm``; returns the count."""
    rewrite = FusionRewrite(graph)
    op = fused_op("add_rms_norm")
    count = 0
    for m in _all_matches(graph):
        pair = _plain_add(m.x)
        if pair is None or _escapes(m):
            continue
        erase = [m.out, *m.internal, m.x]
        if rewrite.apply(op, (pair[0], pair[1], m.weight, m.eps), [m.out, m.x], erase):
            count += 1
    return count
