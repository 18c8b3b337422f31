"""The norm fusions under ``torch.compile(..., dynamic=True)``, where eps is not a constant.

Dynamo does not specialise Python floats there: each norm's ``eps`` attribute becomes a 0-d
float64 input, cast to float32 before the add. The fusions must fire as with static shapes, read
eps when the graph runs (never bake the value seen at compile time), and still refuse what is
not an RMSNorm.
"""

from __future__ import annotations

from typing import Any

import ascend_npugraph_ex as nx
import pytest
import torch
from conftest import tiny_model
from test_negative import hf_rms

LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _compile(fn: Any, *args: Any, dynamic: bool, **options: Any) -> tuple[Any, Any, Any]:
    """(eager output, compiled output, the one fusion report) of ``fn(*args)``."""
    torch._dynamo.reset()
    backend = nx.make_backend(force_eager=True, **options)
    compiled = torch.compile(fn, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        expected, got = fn(*args), compiled(*args)
    (report,) = backend.reports
    return expected, got, report


def _qk_eps_skips(report: nx.FusionReport) -> list[str]:
    return [s.reason for s in report.skipped if s.fusion == "qk_norm_rope"]


def _assert_same_fusions(static: nx.FusionReport, dynamic: nx.FusionReport) -> None:
    """Equal counts; qk_norm_rope excepted where q and k read eps from two run-time inputs.

    There the q and k norms stay two fused rms_norm ops (the rms_norm count is equal) and the
    RoPE stays a fused rotary: the fused qk_norm_rope takes one eps, and with floats passed as
    inputs nothing at compile time proves the two are equal.
    """
    assert static.total > 0
    others = [name for name in static.counts if name != "qk_norm_rope"]
    assert {n: dynamic.counts[n] for n in others} == {n: static.counts[n] for n in others}
    skipped_qk = _qk_eps_skips(dynamic)
    assert dynamic.counts["qk_norm_rope"] + len(skipped_qk) == static.counts["qk_norm_rope"]
    assert all("different run-time values" in r for r in skipped_qk)


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [("llama", torch.float32), ("qwen2", torch.bfloat16), ("qwen3", torch.float32)],
)
def test_hf_models_fuse_the_same_under_dynamic_shapes(arch: str, dtype: torch.dtype) -> None:
    model = tiny_model(arch, 2, dtype)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))

    def logits(i: torch.Tensor) -> torch.Tensor:
        return model(i, use_cache=False).logits

    _, _, static = _compile(logits, ids, dynamic=False)
    expected, got, dynamic = _compile(logits, ids, dynamic=True)
    torch.testing.assert_close(got, expected, atol=LOGIT_TOL[dtype], rtol=LOGIT_TOL[dtype])
    _assert_same_fusions(static, dynamic)
    assert dynamic.counts["add_rms_norm"] == 4  # 2 per layer; the first norm is a plain one


def test_qwen3_decoder_fuses_the_same_under_dynamic_shapes() -> None:
    testing = pytest.importorskip(
        "ascend_aclgraph.testing", reason="needs ascend-aclgraph with its testing module"
    )
    cfg = testing.Qwen3Config.small(num_layers=2, vocab_size=256)
    reports = {}
    for dynamic in (False, True):
        model = testing.Qwen3Decoder(cfg, seed=0).eval()
        reference = testing.Qwen3Decoder(cfg, seed=0).eval()
        torch._dynamo.reset()
        backend = nx.make_backend(force_eager=True)
        step = torch.compile(model, backend=backend, dynamic=dynamic)
        with torch.no_grad():
            for pos in range(3):  # decode steps over the KV cache
                tokens = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(pos))
                positions = torch.full((4,), pos, dtype=torch.int64)
                torch.testing.assert_close(
                    step(tokens, positions), reference(tokens, positions), atol=1e-5, rtol=1e-5
                )
        reports[dynamic] = backend.reports[0]
    _assert_same_fusions(reports[False], reports[True])
    assert reports[True].counts["rms_norm"] == 5  # first input norm + q/k norms of 2 layers


class _Norm(torch.nn.Module):
    """HF's RMSNorm, with eps as a module attribute (a graph input under dynamic=True)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hf_rms(x, self.weight, self.variance_epsilon)


def test_eps_is_read_when_the_graph_runs_not_baked_at_compile_time() -> None:
    # A large input-independent eps change shows in every output element.
    norm = _Norm(1e-6).eval()
    x = torch.randn(4, 64) * 1e-2
    torch._dynamo.reset()
    backend = nx.make_backend(force_eager=True)
    compiled = torch.compile(norm, backend=backend, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), norm(x), atol=1e-5, rtol=1e-5)
        norm.variance_epsilon = 1.0  # an unspecialised float: no recompile, a new input value
        torch.testing.assert_close(compiled(x), norm(x), atol=1e-5, rtol=1e-5)
    assert len(backend.reports) == 1, "dynamo recompiled: eps was specialised after all"
    assert backend.reports[0].counts["rms_norm"] == 1


class _SharedEpsAttention(torch.nn.Module):
    """Qwen3-style q/k norms + RoPE whose two norms read one eps attribute (one graph input)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 4 * 16, bias=False)
        self.k_proj = torch.nn.Linear(64, 2 * 16, bias=False)
        self.q_weight = torch.nn.Parameter(torch.randn(16))
        self.k_weight = torch.nn.Parameter(torch.randn(16))
        self.eps = 1e-6

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ascend_npugraph_ex.ops.reference import rotate_half

        b, s, _ = x.shape
        q = hf_rms(self.q_proj(x).view(b, s, 4, 16), self.q_weight, self.eps).transpose(1, 2)
        k = hf_rms(self.k_proj(x).view(b, s, 2, 16), self.k_weight, self.eps).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_qk_norm_rope_fuses_when_q_and_k_share_one_run_time_eps() -> None:
    module = _SharedEpsAttention().eval()
    args = (torch.randn(2, 5, 64), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    expected, got, report = _compile(module, *args, dynamic=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    assert report.counts["qk_norm_rope"] == 1
    assert report.skipped == ()


def _var_plus(term: Any) -> Any:
    w = torch.randn(64)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + term(t)))

    return f


@pytest.mark.parametrize(
    ("term", "t", "reason"),
    [
        # A per-row tensor added to the variance: no eps.
        (lambda t: t, torch.rand(4, 1), "not eps"),
        # A 0-d eps rounded to bfloat16 first: the fused op would add a different value.
        (lambda t: t.to(torch.bfloat16), torch.tensor(1e-6, dtype=torch.float64), "bfloat16"),
        # An integer 0-d tensor: not a floating-point eps.
        (lambda t: t, torch.tensor(1), "not a floating-point eps"),
    ],
    ids=["per-row-tensor", "eps-rounded-to-bf16", "integer-tensor"],
)
def test_what_is_not_an_rms_norm_is_not_fused(term: Any, t: torch.Tensor, reason: str) -> None:
    x = torch.randn(4, 64)
    expected, got, report = _compile(_var_plus(term), x, t, dynamic=True)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert report.total == 0
    assert any(reason in s.reason for s in report.skipped if s.fusion == "rms_norm")


def test_positive_control_for_the_refusals_above() -> None:
    x = torch.randn(4, 64)
    t = torch.tensor(1e-6, dtype=torch.float64)
    expected, got, report = _compile(_var_plus(lambda t: t), x, t, dynamic=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert report.counts["rms_norm"] == 1


def test_symbolic_float_eps_from_item_is_fused() -> None:
    """A graph that kept ``.item()`` as a SymFloat (make_fx) passes it on to the fused op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + eps.item()))

    args = (torch.randn(4, 64), torch.randn(64), torch.tensor(1e-6, dtype=torch.float64))
    gm = make_fx(f, tracing_mode="symbolic")(*args)
    report = nx.PassManager()(gm)
    assert report.counts["rms_norm"] == 1
    torch.testing.assert_close(gm(*args), f(*args), atol=1e-6, rtol=1e-6)
    other = (args[0], args[1], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(gm(*other), f(*other), atol=1e-6, rtol=1e-6)
