"""RoPE fusions: ``rotate_half`` RoPE on q and k, and Qwen3's per-head q/k RMSNorm + RoPE.

HF's ``apply_rotary_pos_emb`` traces, per tensor, to::

    add(mul(x, cos), mul(cat([neg(slice(x, -1, d/2, end)), slice(x, -1, 0, d/2)], -1), sin))

vLLM's ``RotaryEmbedding.forward_native`` (neox style, what vLLM traces when its custom ops are
off) rotates each half of ``x`` with half-width ``cos``/``sin`` instead::

    x1, x2 = split(x, d/2, -1)
    cat([sub(mul(x1, cos), mul(x2, sin)), add(mul(x2, cos), mul(x1, sin))], -1)

which is the same arithmetic, element by element, as the full-width form with ``cat([cos, cos])``
and ``cat([sin, sin])`` (the fused op is fed those), since ``a - b`` and ``a + (-b)`` are one
IEEE operation. vLLM then concatenates the rotated part with the part past ``rotary_dim``; when
that part is empty (``rotary_dim == head_size``, Qwen3 and Llama) that copy goes too.

The q and k RoPEs of one attention become one ``npugraph_ex.rotary(q, k, cos, sin)``. They are
paired by data flow, not by their order in the graph: a pair uses the same ``cos`` and ``sin``
nodes (so the same positions), neither feeds the other (every later layer depends on the earlier
ones through the residual stream, q and k of one attention do not), and among such candidates
the two whose values meet first (at their attention) go together. So a RoPE that is not matched
(written another way in one layer, say) costs that layer its pair, not every later layer. A RoPE
left without a partner (or whose pair the rewrite declines) is fused alone, as
``rotary(x, x, cos, sin)`` with the second output unused: the op has no one-tensor form, and
one call still replaces seven.

Then, with ``rms_norm`` already fused, ``rotary(view(rms_norm(q)), view(rms_norm(k)))`` with one
eps becomes ``qk_norm_rope(view(q), view(k), ...)``, where ``view`` is any chain of transposes,
permutes, views and copies (``clone``) *that keeps the normalised dim last*: the norm is over
the last dim, so such a chain commutes with it and moves in front of it; one that moves the
normalised dim (a transpose of the last dim, a view that splits or merges it) does not, and the
candidate is declined. Consecutive views are one row-major reshape and are judged together:
vLLM's Qwen3 attention views the normalised ``[T, heads, head_dim]`` back to ``[T, heads *
head_dim]`` and its RoPE views that to ``[T, heads, head_dim]`` again. Different
eps on q and k, eps values only known at run time from two different inputs, a dtype mismatch, or
an intermediate used elsewhere leave the graph alone too.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

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
    users_within,
)
from ascend_npugraph_ex.passes.norm import same_eps

__all__ = ["fuse_qk_norm_rope", "fuse_rotary"]


@dataclass
class _Rope:
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    out: fx.Node
    internal: list[fx.Node]
    # vLLM's form: cos and sin are half the width of x; the fused op gets cat([cos, cos], -1).
    half: bool = False


def _table_source(node: fx.Node) -> fx.Node:
    """``node`` without the unsqueezes that broadcast it (each RoPE unsqueezes its own copy)."""
    while is_call(node, aten.unsqueeze.default) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _same_tables(a: _Rope, b: _Rope) -> bool:
    """Whether two RoPEs read the same cos and sin, as the same broadcast view of one table."""
    if a.half != b.half:
        return False
    for x, y in ((a.cos, b.cos), (a.sin, b.sin)):
        if x is y:
            continue
        vx, vy = fake_val(x), fake_val(y)
        if _table_source(x) is not _table_source(y) or vx is None or vy is None:
            return False
        if not same_sizes(vx.shape, vy.shape):
            return False
    return True


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
        if hi is None or lo_s is None or hi[0] is not lo_s[0] or not isinstance(d, int):
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
        if not (vx.dtype == vc.dtype == vs.dtype == vo.dtype) or not same_sizes(vo.shape, vx.shape):
            continue
        if vc.shape[-1] != d or not same_sizes(vs.shape, vc.shape):
            continue
        return _Rope(x, cos, sin, add, [n for n in internal if isinstance(n, fx.Node)])
    return None


def _split_half(node: object) -> tuple[fx.Node, int] | None:
    """``(split, index)`` if ``node`` is ``getitem(split(x, size, dim), index)``."""
    if not is_call(node, operator.getitem):
        return None
    split, index = node.args
    if not is_call(split, aten.split.Tensor) or split.kwargs or not isinstance(index, int):
        return None
    return split, index


def _mul_of(mul: object, x: fx.Node, other: fx.Node) -> bool:
    """Whether ``mul`` is ``x * other`` (either order)."""
    return isinstance(mul, fx.Node) and _operands(mul, x) is other


def _broadcasts_over(table: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``table`` broadcasts over ``x``'s leading dims without enlarging any."""
    if table.dim() != x.dim():
        return False
    return all(
        statically_known_true(t == 1) or statically_known_true(t == s)
        for t, s in zip(table.shape[:-1], x.shape[:-1], strict=True)
    )


def _match_half_rope(cat: fx.Node) -> _Rope | None:
    """vLLM's neox-style native RoPE ending at ``cat`` (module doc), or None."""
    if not is_call(cat, aten.cat.default) or cat.kwargs:
        return None
    parts = cat.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    o1, o2 = parts
    if not (is_call(o1, aten.sub.Tensor) and is_call(o2, aten.add.Tensor)):
        return None
    if o1.kwargs or o2.kwargs or len(o1.args) != 2 or len(o2.args) != 2:
        return None
    x1_cos, x2_sin = o1.args
    if not (is_call(x1_cos, aten.mul.Tensor) and is_call(x2_sin, aten.mul.Tensor)):
        return None
    x1 = next((a for a in x1_cos.args if (h := _split_half(a)) is not None and h[1] == 0), None)
    if not isinstance(x1, fx.Node):
        return None
    split = x1.args[0]
    x2 = next((a for a in x2_sin.args if _split_half(a) == (split, 1)), None)
    if not isinstance(x2, fx.Node):
        return None
    cos, sin = _operands(x1_cos, x1), _operands(x2_sin, x2)
    if cos is None or sin is None:
        return None
    m1, m2 = o2.args
    if not (
        (_mul_of(m1, x2, cos) and _mul_of(m2, x1, sin))
        or (_mul_of(m2, x2, cos) and _mul_of(m1, x1, sin))
    ):
        return None
    assert isinstance(split, fx.Node)
    assert isinstance(m1, fx.Node)
    assert isinstance(m2, fx.Node)
    src, size = split.args[0], split.args[1]
    dim = split.args[2] if len(split.args) > 2 else 0
    vx, vc, vs, vo = fake_val(src), fake_val(cos), fake_val(sin), fake_val(cat)
    if not isinstance(src, fx.Node) or vx is None or vc is None or vs is None or vo is None:
        return None
    d = vx.shape[-1]
    cat_dim = cat.args[1] if len(cat.args) > 1 else 0
    if not isinstance(d, int) or d % 2 or size != d // 2 or not last_dim(dim, vx.dim()):
        return None
    if not last_dim(cat_dim, vx.dim()) or len(split.users) != 2:
        return None
    if not (vx.dtype == vc.dtype == vs.dtype == vo.dtype) or not same_sizes(vo.shape, vx.shape):
        return None
    if vc.shape[-1] != d // 2 or not same_sizes(vs.shape, vc.shape):
        return None
    if not _broadcasts_over(vc, vx):
        return None
    internal = [cat, o1, o2, x1_cos, x2_sin, m1, m2, x1, x2, split]
    if any(not users_within(n, internal) for n in internal[1:]):
        return None
    x, out = src, cat
    # x[..., :rotary_dim] with rotary_dim == d traces to an alias of x.
    if is_call(src, aten.alias.default) and len(src.users) == 1:
        aliased = src.args[0]
        if isinstance(aliased, fx.Node):
            x = aliased
            internal.append(src)
    # vLLM's cat((rotated, x[..., rotary_dim:]), -1): with nothing past rotary_dim, a copy.
    outer = next(iter(cat.users)) if len(cat.users) == 1 else None
    if is_call(outer, aten.cat.default) and not outer.kwargs:
        rest = outer.args[0]
        if isinstance(rest, (list, tuple)) and len(rest) == 2 and rest[0] is cat:
            tail, v_tail = rest[1], fake_val(rest[1])
            outer_dim = outer.args[1] if len(outer.args) > 1 else 0
            if (
                isinstance(tail, fx.Node)
                and v_tail is not None
                and last_dim(outer_dim, v_tail.dim())
                and statically_known_true(v_tail.shape[-1] == 0)
                and len(tail.users) == 1
            ):
                internal += [outer, tail]
                out = outer
    # The per-RoPE unsqueezes of cos and sin die with it (erased only once unused).
    internal += [n for n in (cos, sin) if is_call(n, aten.unsqueeze.default)]
    internal.remove(out)
    return _Rope(x, cos, sin, out, internal, half=True)


def _pair_by_data_flow(graph: fx.Graph, ropes: list[_Rope]) -> list[tuple[_Rope, _Rope | None]]:
    """Group ``ropes`` (graph order) into q/k pairs of one attention, and singles (module doc).

    One pass over the graph gives each node the set of RoPE outputs it depends on (a bit mask).
    Two RoPEs can be a pair when they share ``cos`` and ``sin`` and neither depends on the other;
    candidate pairs are then taken in the order their values first meet downstream.
    """
    bit = {r.out: 1 << i for i, r in enumerate(ropes)}
    reach: dict[fx.Node, int] = {}
    for node in graph.nodes:
        mask = bit.get(node, 0)
        for inp in node.all_input_nodes:
            mask |= reach[inp]
        reach[node] = mask

    def pairable(i: int, j: int) -> bool:
        a, b = ropes[i], ropes[j]
        if not _same_tables(a, b):
            return False
        return not (reach[b.x] >> i & 1 or reach[a.x] >> j & 1)

    pairs = [p for p in itertools.combinations(range(len(ropes)), 2) if pairable(*p)]
    # Where each candidate pair's values first meet: a node with an input carrying each.
    nodes = list(graph.nodes)
    meet: dict[tuple[int, int], int] = {}
    unmet = set(pairs)
    for index, node in enumerate(nodes):
        if not unmet:
            break
        if len(node.all_input_nodes) < 2:
            continue
        mask = reach[node]
        for pair in [p for p in unmet if mask >> p[0] & 1 and mask >> p[1] & 1]:
            meet[pair] = index
            unmet.discard(pair)
    ranked = sorted(pairs, key=lambda p: (meet.get(p, len(nodes)), p))
    partner: dict[int, int] = {}
    for i, j in ranked:
        if i not in partner and j not in partner:
            partner[i], partner[j] = j, i
    groups: list[tuple[_Rope, _Rope | None]] = []
    for i, rope in enumerate(ropes):
        other = partner.get(i)
        if other is None:
            groups.append((rope, None))
        elif i < other:
            groups.append((rope, ropes[other]))
    return groups


def fuse_rotary(graph: fx.Graph, skipped: list[SkippedMatch] | None = None) -> int:
    """Fuse q/k RoPE pairs (and lone RoPEs) into ``npugraph_ex.rotary``; returns the count."""
    ropes = [
        m for node in graph.nodes if (m := _match_rope(node) or _match_half_rope(node)) is not None
    ]
    rewrite = FusionRewrite(graph, "rotary", skipped)
    op = fused_op("rotary")
    count = 0
    for q, k in _pair_by_data_flow(graph, ropes):
        paired = False
        if k is not None:
            with rewrite.candidate(q.out):
                args = (q.x, k.x, *_full_width(rewrite, q))
                erase = [q.out, k.out, *q.internal, *k.internal]
                paired = rewrite.apply(op, args, [q.out, k.out], erase)
        if paired:
            count += 1
            continue
        # Alone, or a pair the rewrite declined (a user of q's RoPE before k exists, say):
        # each RoPE on its own still saves its launches.
        for rope in (q,) if k is None else (q, k):
            with rewrite.candidate(rope.out):
                args = (rope.x, rope.x, *_full_width(rewrite, rope))
                if rewrite.apply(op, args, [rope.out, None], [rope.out, *rope.internal]):
                    count += 1
    return count


def _full_width(rewrite: FusionRewrite, rope: _Rope) -> tuple[fx.Node, fx.Node]:
    """The fused op's cos and sin: the RoPE's own, or, for vLLM's half-width ones, each twice."""
    if not rope.half:
        return rope.cos, rope.sin
    cos = rewrite.insert(aten.cat.default, ([rope.cos, rope.cos], -1))
    sin = rewrite.insert(aten.cat.default, ([rope.sin, rope.sin], -1))
    return cos, sin


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
# Ops allowed between the norm and the RoPE: views, and the copy a reshape of a transposed
# tensor adds (a clone keeps every value where it is, so it commutes with the norm too).
_CHAIN = (aten.transpose.int, aten.permute.default, aten.clone.default, *_VIEWS)


def _keeps_last_dim(node: fx.Node, src: fx.Node) -> str | None:
    """None if view-like ``node`` of ``src`` keeps ``src``'s last dim last and whole, else why."""
    src_val, out_val = fake_val(src), fake_val(node)
    if src_val is None or out_val is None:
        return "missing fake tensor metadata"
    if is_call(node, aten.clone.default):
        return None if set(node.kwargs) <= {"memory_format"} else f"{node.name} is not a copy"
    if node.kwargs:
        return f"{node.name} has keyword arguments"
    ndim = src_val.dim()
    if is_call(node, aten.transpose.int):
        d0, d1 = node.args[1], node.args[2]
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return "a transpose with symbolic dims"
        d0, d1 = d0 % ndim, d1 % ndim
        if d0 != d1 and ndim - 1 in (d0, d1):
            return (
                f"transpose({node.args[1]}, {node.args[2]}) between the norm and the RoPE moves "
                "the normalised (last) dim"
            )
        return None
    if is_call(node, aten.permute.default):
        perm = node.args[1]
        last = perm[-1] if isinstance(perm, (list, tuple)) and perm else None
        if not isinstance(last, int) or last % ndim != ndim - 1:
            return f"permute({perm}) between the norm and the RoPE moves the normalised dim"
        return None
    # A view keeps every row of the last dim intact exactly when that dim keeps its size: it
    # only re-indexes the leading dims, in row-major order.
    if not same_sizes(out_val.shape[-1:], src_val.shape[-1:]):
        return (
            f"a view from {list(src_val.shape)} to {list(out_val.shape)} between the norm and "
            "the RoPE splits or merges the normalised dim"
        )
    return None


def _norm_chain(node: object) -> tuple[fx.Node, list[fx.Node]] | str | None:
    """``(rms_norm node, views from it to node)`` if a fused rms_norm feeds ``node`` through
    views that keep the normalised dim last; a reason if the views do not; None if no norm."""
    chain: list[fx.Node] = []
    while is_call(node, *_CHAIN):
        chain.append(node)
        node = node.args[0]
    if not is_call(node, fused_op("rms_norm")):
        return None
    chain.reverse()  # norm-side first
    src = node
    i = 0
    while i < len(chain):
        # A run of consecutive views is one row-major reshape: judge it from its source to its
        # end (a split of the last dim that a later view undoes keeps every row whole).
        end = i
        if is_call(chain[i], *_VIEWS):
            while end + 1 < len(chain) and is_call(chain[end + 1], *_VIEWS):
                end += 1
        reason = _keeps_last_dim(chain[end], src)
        if reason is not None:
            return reason
        src = chain[end]
        i = end + 1
    for n in (node, *chain):
        if len(n.users) != 1:
            return f"{n.name}, between the norm and the RoPE, is used elsewhere"
    return node, chain


def _replay(rewrite: FusionRewrite, base: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """Apply the views of ``chain`` to ``base`` instead of to the norm's output."""
    out = base
    for view in chain:
        out = rewrite.insert(view.target, (out, *view.args[1:]), dict(view.kwargs))
    return out


def fuse_qk_norm_rope(graph: fx.Graph, skipped: list[SkippedMatch] | None = None) -> int:
    """Fuse ``rotary(rms_norm(q), rms_norm(k))`` (same eps) into ``npugraph_ex.qk_norm_rope``."""
    rewrite = FusionRewrite(graph, "qk_norm_rope", skipped)
    rotary, op = fused_op("rotary"), fused_op("qk_norm_rope")
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, rotary):
            continue
        q, k, cos, sin = node.args
        if q is k:
            continue  # a lone RoPE: normalising it twice would cost more than it saves
        with rewrite.candidate(node):
            qn, kn = _norm_chain(q), _norm_chain(k)
            if qn is None or kn is None:
                continue
            for side in (qn, kn):
                if isinstance(side, str):
                    raise Decline(side)
            assert not isinstance(qn, str)
            assert not isinstance(kn, str)
            (qnorm, q_chain), (knorm, k_chain) = qn, kn
            (q_in, q_w, q_eps), (k_in, k_w, k_eps) = qnorm.args, knorm.args
            if not same_eps(q_eps, k_eps):
                if isinstance(q_eps, fx.Node) or isinstance(k_eps, fx.Node):
                    raise Decline(
                        "the q and k norms read eps from different run-time values (floats "
                        "are graph inputs under dynamic shapes); one fused op has one eps, and "
                        "that they are equal is only known when the graph runs"
                    )
                raise Decline(f"the q and k norms use different eps ({q_eps} and {k_eps})")
            getitems = list(node.users)
            if not all(is_call(g, operator.getitem) for g in getitems):
                raise Decline("the rotary's outputs are used other than through getitem")
            outs: list[fx.Node | None] = [None, None]
            for g in getitems:
                idx = g.args[1]
                if isinstance(idx, int):
                    outs[idx] = g
            assert isinstance(q_in, fx.Node)
            assert isinstance(k_in, fx.Node)
            # The views keep the normalised dim last, so they commute with the norm: applied
            # to its input, they make the fused op produce the rotary's output layout.
            q_src, k_src = _replay(rewrite, q_in, q_chain), _replay(rewrite, k_in, k_chain)
            erase = [*getitems, node, qnorm, knorm, *q_chain, *k_chain]
            if rewrite.apply(op, (q_src, k_src, q_w, k_w, q_eps, cos, sin), outs, erase):
                count += 1
    return count
