"""Patterns that must not fuse are left alone, and the results stay equal to eager."""

from __future__ import annotations

import torch
from ascend_npugraph_ex.ops.reference import rotate_half
from conftest import compile_and_run


def hf_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(var + eps)).to(dtype)


def test_positive_control_fuses() -> None:
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    exp, got, reps = compile_and_run(lambda a, b: hf_rms(a + b, w, 1e-6), x, r)
    assert reps[0].counts["add_rms_norm"] == 1
    torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)


def test_weight_shape_mismatch_not_fused() -> None:
    x, w = torch.randn(4, 64), torch.randn(4, 64)  # a per-row "weight": not an RMSNorm weight
    exp, got, reps = compile_and_run(lambda a: hf_rms(a, w, 1e-6), x)
    assert reps[0].total == 0
    torch.testing.assert_close(got, exp, atol=0, rtol=0)


def test_residual_sum_used_elsewhere_is_fused_correctly() -> None:
    # The new residual (the sum) is meant to be reused: the op returns it as its second output.
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = a + b
        return hf_rms(s, w, 1e-6), s * 2

    exp, got, reps = compile_and_run(f, x, r)
    assert reps[0].counts["add_rms_norm"] == 1
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_residual_float32_copy_used_elsewhere_not_fused() -> None:
    # The float32 residual inside the norm escapes: fusing would have to recompute it.
    x, r, w = (
        torch.randn(4, 64).bfloat16(),
        torch.randn(4, 64).bfloat16(),
        torch.randn(64).bfloat16(),
    )

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (a + b).to(torch.float32)
        var = s.pow(2).mean(-1, keepdim=True)
        return w * (s * torch.rsqrt(var + 1e-6)).to(torch.bfloat16), s.sum(-1)

    exp, got, reps = compile_and_run(f, x, r)
    assert reps[0].counts["add_rms_norm"] == 0
    assert reps[0].counts["rms_norm"] == 0
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_dtype_change_between_add_and_norm_not_fused_as_add_norm() -> None:
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64).half()
    exp, got, reps = compile_and_run(lambda a, b: hf_rms((a + b).half(), w, 1e-6), x, r)
    assert reps[0].counts["add_rms_norm"] == 0
    assert reps[0].counts["rms_norm"] == 1  # the norm alone is still a valid fp16 RMSNorm
    torch.testing.assert_close(got, exp, atol=1e-3, rtol=1e-3)


def test_norm_downcast_to_other_dtype_not_fused() -> None:
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(64).half()

    def f(a: torch.Tensor) -> torch.Tensor:
        h = a.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        return w * (h * torch.rsqrt(var + 1e-6)).to(torch.float16)  # bf16 in, fp16 out

    exp, got, reps = compile_and_run(f, x)
    assert reps[0].total == 0
    torch.testing.assert_close(got, exp, atol=0, rtol=0)


def _attn_qk(eps_q: float, eps_k: float):  # type: ignore[no-untyped-def]
    qw, kw = torch.randn(16), torch.randn(16)

    def f(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qn = hf_rms(q, qw, eps_q).transpose(1, 2)
        kn = hf_rms(k, kw, eps_k).transpose(1, 2)
        return qn * cos + rotate_half(qn) * sin, kn * cos + rotate_half(kn) * sin

    return f


def _qk_inputs() -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(2, 5, 4, 16),
        torch.randn(2, 5, 2, 16),
        torch.randn(2, 1, 5, 16),
        torch.randn(2, 1, 5, 16),
    )


def test_qk_norm_rope_same_eps_fuses() -> None:
    exp, got, reps = compile_and_run(_attn_qk(1e-6, 1e-6), *_qk_inputs())
    assert reps[0].counts["qk_norm_rope"] == 1
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
        assert g.stride() == e.stride()


def test_qk_norm_rope_different_eps_not_fused() -> None:
    exp, got, reps = compile_and_run(_attn_qk(1e-6, 1e-5), *_qk_inputs())
    counts = reps[0].counts
    assert counts["qk_norm_rope"] == 0
    assert counts["rms_norm"] == 2
    assert counts["rotary"] == 1
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_rope_with_mismatched_cos_dtype_not_fused() -> None:
    q, k = torch.randn(2, 4, 5, 16).bfloat16(), torch.randn(2, 2, 5, 16).bfloat16()
    cos32, sin32 = torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16)

    def f(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q * cos32 + rotate_half(q) * sin32, k * cos32 + rotate_half(k) * sin32

    exp, got, reps = compile_and_run(f, q, k)
    assert reps[0].counts["rotary"] == 0
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
