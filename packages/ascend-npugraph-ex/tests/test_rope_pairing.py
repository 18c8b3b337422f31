"""q and k RoPEs are paired by data flow: one unmatched RoPE does not shift every later pair.

All layers of a model share one cos/sin, so every RoPE of the graph is a candidate partner of
every other. Pairing them by position in the node list breaks as soon as one of them is not
matched: layer 1's k then pairs with layer 2's q, and so on to the last layer.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.ops.reference import rotate_half
from ascend_npugraph_ex.passes import PassManager
from conftest import compile_and_run

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


class _Layer(torch.nn.Module):
    """Attention + residual, HF style; ``odd_q_rope`` writes q's RoPE another (equal) way."""

    def __init__(self, odd_q_rope: bool) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.odd_q_rope = odd_q_rope

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(h).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(h).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.odd_q_rope:
            # The same values through addcmul: not the traced HF pattern, so never matched.
            q = torch.addcmul(q * cos, rotate_half(q), sin)
        else:
            q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return h + self.o_proj(out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))


class _Model(torch.nn.Module):
    def __init__(self, layers: int, odd_layer: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_Layer(i == odd_layer) for i in range(layers))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos[:, None], sin[:, None]  # shared by every layer, as in HF models
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(2, 5, HEAD_DIM // 2, generator=g) * 6.28
    emb = torch.cat((angles, angles), dim=-1)
    return torch.randn(2, 5, HIDDEN, generator=g), emb.cos(), emb.sin()


def _rotary_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is fused_op("rotary")]


@pytest.mark.parametrize("odd_layer", [None, 0, 1, 2])
def test_one_unmatched_rope_costs_only_its_own_pair(odd_layer: int | None) -> None:
    model = _Model(3, odd_layer).eval()
    fused: list[torch.fx.GraphModule] = []

    # Keep the optimised graph to look at which values each rotary call pairs.
    real_call = PassManager.__call__

    def keep(self: PassManager, gm: torch.fx.GraphModule):  # type: ignore[no-untyped-def]
        report = real_call(self, gm)
        fused.append(gm)
        return report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PassManager, "__call__", keep)
        expected, got, reports = compile_and_run(model, *_inputs(), fuse_qk_norm_rope=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    calls = _rotary_calls(fused[0])
    pairs = [c for c in calls if c.args[0] is not c.args[1]]
    singles = [c for c in calls if c.args[0] is c.args[1]]
    # Every layer with two matchable RoPEs gets its pair; the odd layer's k is fused alone.
    assert len(pairs) == (3 if odd_layer is None else 2)
    assert len(singles) == (0 if odd_layer is None else 1)
    assert reports[0].counts["rotary"] == len(calls)
    for single in singles:
        # A lone RoPE's second output is unused.
        assert [u.args[1] for u in single.users if u.target is operator.getitem] == [0]
    # Each pair's q and k come from the same layer's projections, i.e. from the same hidden
    # state: q = view(mm(view(h), W_q)), and likewise for k.
    for pair in pairs:
        sources = {_projection_input(pair.args[0]), _projection_input(pair.args[1])}
        assert len(sources) == 1, pair
    assert reports[0].skipped == ()


def _projection_input(node: torch.fx.Node) -> torch.fx.Node:
    """The hidden state a projected q or k was computed from (walk back to the matmul)."""
    while node.target not in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
        node = node.args[0]  # type: ignore[assignment]
    source = node.args[0]
    assert isinstance(source, torch.fx.Node)
    while source.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
        source = source.args[0]  # type: ignore[assignment]
    return source


def test_a_use_of_qs_rope_before_ks_input_exists_moves_after_the_pair() -> None:
    """``early`` uses q's RoPE before k's input exists, so no node could produce both there; it
    is moved after the pair (nothing k needs depends on it). A pair the rewrite must decline
    (an early user with side effects) is fused as two lone RoPEs: test_vllm_rope.py."""

    def f(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        qr = q * cos + rotate_half(q) * sin
        early = qr.sum(-1)
        k = k * 2
        return early, k * cos + rotate_half(k) * sin, qr

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, n, 5, HEAD_DIM, generator=g) for n in (HEADS, KV_HEADS, 1, 1)]
    expected, got, reports = compile_and_run(f, *args)
    for gv, ev in zip(got, expected, strict=True):
        torch.testing.assert_close(gv, ev, atol=1e-6, rtol=1e-6)
    assert reports[0].counts["rotary"] == 1
    assert not reports[0].skipped
