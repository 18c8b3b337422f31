"""RoPE fusions: ``rotate_half`` RoPE on q and k, and Qwen3's per-head q/k RMSNorm + RoPE.

HF's ``apply_rotary_pos_emb`` traces, per tensor, to::

    add(mul(x, cos), mul(cat([neg(slice(x, -1, d/2, end)), slice(x, -1, 0, d/2)], -1), sin))

Two such chains sharing the same ``cos`` and ``sin`` nodes (q and k) become one
``npugraph_ex.rotary(q, k, cos, sin)``. Then, with ``rms_norm`` already fused,
``rotary(transpose(rms_norm(q)), transpose(rms_norm(k)))`` with one eps becomes
``qk_norm_rope(transpose(q), transpose(k), ...)``: the norm is over the last dim, so the
transpose can move in front of it. Different eps on q and k, a dtype mismatch, or an
intermediate used elsewhere leave the graph alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx

from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.passes.fx_utils import FusionRewrite, aten, fake_val, is_call, last_dim

__all__ = ["fuse_qk_norm_rope", "fuse_rotary"]


@dataclass
class _Rope:
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    out: fx.Node
    internal: list[fx.Node]


def _operands(mul: object, x: fx.Node) -> fx.Node | None:
    """The operand of ``mul`` that is not ``x`` (either order), if ``mul`` is ``x * other``."""
    if not is_call(mul, aten.mul.Tensor) or not isinstance(mul, fx.Node) or mul.kwargs:
        return None
    a, b = mul.args[0], mul.args[1]
    other = b if a is x else a if b is x else None
    return other if isinstance(other, fx.Node) and other is not x else None


def _slice(node: object, ndim: int) -> tuple[fx.Node, int, int] | None:
    if not is_call(node, aten.slice.Tensor) or not isinstance(node, fx.Node):
        return None
    src, dim, start, end = ([*list(node.args), 0, None, None])[:4]
    step = node.args[4] if len(node.args) > 4 else 1
    if not isinstance(src, fx.Node) or not last_dim(dim, ndim) or step != 1:
        return None
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return src, start, end


def _match_rope(add: fx.Node) -> _Rope | None:
    if not is_call(add, aten.add.Tensor) or add.kwargs:
        return None
    for m1, m2 in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        if not (is_call(m1, aten.mul.Tensor) and is_call(m2, aten.mul.Tensor)):
            continue
        assert isinstance(m1, fx.Node)
        assert isinstance(m2, fx.Node)
        cat = next((a for a in m2.args if is_call(a, aten.cat.default)), None)
        if cat is None:
            continue
        sin = _operands(m2, cat)
        parts = cat.args[0]
        vx = None
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or sin is None:
            continue
        neg, lo = parts
        if not is_call(neg, aten.neg.default):
            continue
        assert isinstance(neg, fx.Node)
        hi_slice = neg.args[0]
        for cand in (hi_slice, lo):
            if isinstance(cand, fx.Node) and isinstance(cand.args[0], fx.Node):
                vx = fake_val(cand.args[0])
        if vx is None:
            continue
        d = vx.shape[-1]
        hi, lo_s = _slice(hi_slice, vx.dim()), _slice(lo, vx.dim())
        if hi is None or lo_s is None or hi[0] is not lo_s[0]:
            continue
        x = hi[0]
        half = d // 2
        if d % 2 or lo_s[1:] != (0, half) or hi[1] != half or hi[2] < d:
            continue
        cat_dim = cat.args[1] if len(cat.args) > 1 else 0
        if not last_dim(cat_dim, vx.dim()):
            continue
        cos = _operands(m1, x)
        if cos is None:
            continue
        internal = [m1, m2, cat, neg, hi_slice, lo]
        if any(len(n.users) != 1 for n in internal if isinstance(n, fx.Node)):
            continue
        vc, vs, vo = fake_val(cos), fake_val(sin), fake_val(add)
        if vc is None or vs is None or vo is None:
            continue
        # Same dtype everywhere (HF casts cos/sin to q's dtype); the output keeps x's shape.
        if not (vx.dtype == vc.dtype == vs.dtype == vo.dtype) or vo.shape != vx.shape:
            continue
        if vc.shape[-1] != d or vs.shape != vc.shape:
            continue
        return _Rope(x, cos, sin, add, [n for n in internal if isinstance(n, fx.Node)])
    return None


def fuse_rotary(graph: fx.Graph) -> int:
    """Fuse q/k RoPE pairs that share cos and sin into ``npugraph_ex.rotary``; returns the count."""
    groups: dict[tuple[fx.Node, fx.Node], list[_Rope]] = {}
    for node in graph.nodes:
        m = _match_rope(node)
        if m is not None:
            groups.setdefault((m.cos, m.sin), []).append(m)
    rewrite = FusionRewrite(graph)
    op = fused_op("rotary")
    count = 0
    for (cos, sin), ropes in groups.items():
        # Consecutive pairs in graph order: q then k of one attention layer.
        for q, k in zip(ropes[0::2], ropes[1::2], strict=False):
            erase = [q.out, k.out, *q.internal, *k.internal]
            if rewrite.apply(op, (q.x, k.x, cos, sin), [q.out, k.out], erase):
                count += 1
    return count


def _normed(node: object) -> tuple[fx.Node, tuple[int, int] | None] | None:
    """``(rms_norm node, transpose dims or None)`` for a (transposed) fused rms_norm."""
    dims = None
    if is_call(node, aten.transpose.int):
        assert isinstance(node, fx.Node)
        if len(node.users) != 1:
            return None
        d0, d1 = node.args[1], node.args[2]
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return None
        dims = (d0, d1)
        node = node.args[0]
    if not is_call(node, fused_op("rms_norm")):
        return None
    assert isinstance(node, fx.Node)
    if len(node.users) != 1:
        return None
    return node, dims


def fuse_qk_norm_rope(graph: fx.Graph) -> int:
    """Fuse ``rotary(rms_norm(q), rms_norm(k))`` (same eps) into ``npugraph_ex.qk_norm_rope``."""
    rewrite = FusionRewrite(graph)
    rotary, op = fused_op("rotary"), fused_op("qk_norm_rope")
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, rotary):
            continue
        q, k, cos, sin = node.args
        qn, kn = _normed(q), _normed(k)
        if qn is None or kn is None or qn[1] != kn[1]:
            continue
        (qnorm, dims), (knorm, _) = qn, kn
        (q_in, q_w, q_eps), (k_in, k_w, k_eps) = qnorm.args, knorm.args
        if q_eps != k_eps:
            continue  # one fused op, one eps: different eps stay separate norms
        getitems = list(node.users)
        if not all(is_call(g, operator.getitem) for g in getitems):
            continue
        outs: list[fx.Node | None] = [None, None]
        for g in getitems:
            idx = g.args[1]
            if isinstance(idx, int):
                outs[idx] = g
        q_src, k_src = q_in, k_in
        if dims is not None:
            # The norm is over the last dim, so transposing its *input* (a view) is free and
            # makes the fused op produce the rotary output in exactly the rotary's layout.
            with graph.inserting_after(rewrite.anchor([q_in, k_in])):  # type: ignore[list-item]
                q_src = graph.call_function(aten.transpose.int, (q_in, *dims))
                k_src = graph.call_function(aten.transpose.int, (k_in, *dims))
            for src, base in ((q_src, q_in), (k_src, k_in)):
                base_val = fake_val(base)
                if base_val is not None:
                    src.meta["val"] = base_val.transpose(*dims)
            rewrite.refresh()
        erase = [*getitems, node, qnorm, knorm]
        erase += [n for n in (q, k) if isinstance(n, fx.Node) and n not in (qnorm, knorm)]
        args = (q_src, k_src, q_w, k_w, q_eps, cos, sin)
        if rewrite.apply(op, args, outs, erase):
            count += 1
        elif dims is not None:
            for extra in (k_src, q_src):
                if isinstance(extra, fx.Node) and not extra.users:
                    graph.erase_node(extra)
            rewrite.refresh()
    return count
