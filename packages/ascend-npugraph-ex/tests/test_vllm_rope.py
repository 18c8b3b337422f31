"""vLLM's own RoPE form is fused: ``RotaryEmbedding.forward_native`` and Qwen3's q/k norms.

With its custom ops off (as the vLLM plugin runs it for npugraph_ex on the CPU twin), vLLM traces
its neox-style RoPE as half-width ``cos``/``sin`` products of the two halves of each head, then
concatenates the part past ``rotary_dim``. ``_vllm_rope`` below follows that code
(``vllm/model_executor/layers/rotary_embedding/base.py``, ``common.py``) op for op, so these tests
see the graph vLLM hands the plugin, without vLLM installed.
"""

from __future__ import annotations

import pytest
import torch
from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.passes import PassManager
from conftest import compile_and_run
from torch import fx

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32


def _cos_sin_cache(rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(64).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _vllm_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    rotary_dim: int,
    cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = positions.shape[0]
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    out = []
    for x in (query, key):
        shape = x.shape
        x = x.view(num_tokens, -1, HEAD_DIM)
        rotated = _rotate_neox(x[..., :rotary_dim], cos, sin)
        out.append(torch.cat((rotated, x[..., rotary_dim:]), dim=-1).reshape(shape))
    return out[0], out[1]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """vLLM's ``RMSNorm.forward_static`` without a residual."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    return x.to(dtype) * weight


class _Qwen3Attention(torch.nn.Module):
    """The q/k part of vLLM's Qwen3 attention: split qkv, per-head norms, RoPE."""

    def __init__(self, dtype: torch.dtype, rotary_dim: int = HEAD_DIM, norms: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q_weight = torch.nn.Parameter(torch.randn(HEAD_DIM, generator=g).to(dtype))
        self.k_weight = torch.nn.Parameter(torch.randn(HEAD_DIM, generator=g).to(dtype))
        self.register_buffer("cache", _cos_sin_cache(rotary_dim, dtype))
        self.rotary_dim, self.norms = rotary_dim, norms

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        if self.norms:
            q = _rms_norm(q.view(*q.shape[:-1], HEADS, HEAD_DIM), self.q_weight).view(q.shape)
            k = _rms_norm(k.view(*k.shape[:-1], KV_HEADS, HEAD_DIM), self.k_weight).view(k.shape)
        q, k = _vllm_rope(positions, q, k, self.rotary_dim, self.cache)
        return q, k, v


def _inputs(dtype: torch.dtype, tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    return torch.tensor([3, 0, 17, 40, 63][:tokens]), qkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vllm_rope_is_one_rotary_call_for_q_and_k_and_bitwise_unfused(dtype: torch.dtype) -> None:
    model = _Qwen3Attention(dtype, norms=False)
    expected, got, reports = compile_and_run(model, *_inputs(dtype), fuse_qk_norm_rope=False)
    assert reports[0].counts["rotary"] == 1, reports[0].skipped
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), (e.float() - g.float()).abs().max()


def test_partial_rotary_keeps_the_rest_of_each_head_and_is_bitwise_unfused() -> None:
    model = _Qwen3Attention(torch.float32, rotary_dim=HEAD_DIM // 2, norms=False)
    expected, got, reports = compile_and_run(model, *_inputs(torch.float32))
    assert reports[0].counts["rotary"] == 1, reports[0].skipped
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vllm_qwen3_norms_and_rope_become_one_qk_norm_rope(dtype: torch.dtype) -> None:
    """The views between the norms and the RoPE ([T, H, D] -> [T, H*D] -> [T, H, D]) keep the
    normalised dim whole, so the norms move into the fused RoPE."""
    model = _Qwen3Attention(dtype)
    expected, got, reports = compile_and_run(model, *_inputs(dtype))
    counts = reports[0].counts
    assert counts["qk_norm_rope"] == 1, reports[0].skipped
    assert counts["rms_norm"] == 2  # fused first, then folded into qk_norm_rope
    # Not bitwise: the fused norm's 1/sqrt and torch.rsqrt may round differently.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)


def test_a_view_that_regroups_heads_between_norm_and_rope_is_still_declined() -> None:
    """A run of views is judged as a whole: [T, H, D] -> [T, H*D] -> [T, 2H, D/2] splits the
    normalised dim, and the norm may not move into the RoPE."""

    class Regrouped(_Qwen3Attention):
        def forward(self, positions: torch.Tensor, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
            q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
            q = _rms_norm(q.view(-1, HEADS * 2, HEAD_DIM // 2), self.q_weight[: HEAD_DIM // 2])
            k = _rms_norm(k.view(-1, KV_HEADS * 2, HEAD_DIM // 2), self.k_weight[: HEAD_DIM // 2])
            q, k = _vllm_rope(
                positions, q.reshape(-1, HEADS * HEAD_DIM), k.flatten(1), 32, self.cache
            )
            return q, k, v

    expected, got, reports = compile_and_run(Regrouped(torch.float32), *_inputs(torch.float32))
    assert reports[0].counts["rotary"] == 1
    assert reports[0].counts["qk_norm_rope"] == 0
    assert any("splits or merges the normalised dim" in s.reason for s in reports[0].skipped)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


# ---- moving early users after the fused op -----------------------------------------------------


def _traced_pair(early_user_feeds_k: bool, early_user_writes: bool) -> fx.GraphModule:
    """q's RoPE output is used (viewed, or added into k, or copied into a buffer) before k's
    input exists, as in vLLM's graph where q's RoPE is finished before k's starts."""

    def f(
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cache: torch.Tensor,
        buffer: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
        q_rot = _rotate_neox(q.view(5, HEADS, HEAD_DIM), cos, sin)
        q_flat = q_rot.reshape(5, HEADS * HEAD_DIM)  # the early user
        if early_user_writes:
            buffer.copy_(q_flat)
        k_in = k.view(5, KV_HEADS, HEAD_DIM)
        if early_user_feeds_k:
            k_in = k_in + q_flat[:, : KV_HEADS * HEAD_DIM].view(5, KV_HEADS, HEAD_DIM)
        k_rot = _rotate_neox(k_in, cos, sin)
        return q_flat * 2, k_rot

    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(2)
    args = (
        torch.tensor([1, 2, 3, 4, 5]),
        torch.randn(5, HEADS * HEAD_DIM, generator=g),
        torch.randn(5, KV_HEADS * HEAD_DIM, generator=g),
        _cos_sin_cache(HEAD_DIM, torch.float32),
        torch.zeros(5, HEADS * HEAD_DIM),
    )
    gm = make_fx(f, tracing_mode="fake")(*args)
    gm.example_args = args  # type: ignore[assignment]
    return gm


@pytest.mark.parametrize(
    ("feeds_k", "writes", "pairs", "reason"),
    [
        (False, False, 1, None),
        # k depends on q's RoPE: never a pair (pairing by data flow), each fused alone.
        (True, False, 0, None),
        (False, True, 0, "cannot be moved (side effects)"),
    ],
    ids=["moved", "feeds-k", "side-effect"],
)
def test_early_users_of_the_first_rope_move_after_the_pair_only_when_that_is_safe(
    feeds_k: bool, writes: bool, pairs: int, reason: str | None
) -> None:
    gm = _traced_pair(feeds_k, writes)
    args = gm.example_args  # type: ignore[attr-defined]
    expected = gm(*args)
    manager = PassManager(("rotary",))
    manager(gm)
    report = manager.reports[-1]
    calls = [n for n in gm.graph.nodes if n.target is fused_op("rotary")]
    paired = [n for n in calls if n.args[0] is not n.args[1]]
    assert len(paired) == pairs, report.skipped
    if reason is not None:
        assert any(reason in s.reason for s in report.skipped), report.skipped
    if not pairs:
        assert len(calls) == 2  # each RoPE fused alone instead
    gm.graph.lint()
    gm.recompile()
    for e, g in zip(expected, gm(*args), strict=True):
        assert torch.equal(e, g)


def test_an_early_user_that_feeds_the_fused_ops_inputs_is_not_moved() -> None:
    """FusionRewrite itself: moving ``u`` after the fused op would put it after its own user."""
    from ascend_npugraph_ex.passes.fx_utils import FusionRewrite, aten
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    old = graph.call_function(aten.add.Tensor, (x, 1))
    early = graph.call_function(aten.mul.Tensor, (old, 2))
    feeds = graph.call_function(aten.add.Tensor, (early, y))
    graph.output((old, feeds))
    with FakeTensorMode() as mode:
        for node, val in ((x, torch.empty(3)), (y, torch.empty(3))):
            node.meta["val"] = mode.from_tensor(val)
        for node in (old, early, feeds):
            node.meta["val"] = torch.empty(3)
    rewrite = FusionRewrite(graph, "test")
    with rewrite.candidate(old):
        applied = rewrite.apply(aten.sub.Tensor, (x, feeds), [old], [old])
    assert not applied
    (skip,) = rewrite.skipped
    assert "feeds those inputs" in skip.reason
    graph.lint()
