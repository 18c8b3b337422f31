"""Fused ops against their reference semantics (the unfused HF code), per device."""

from __future__ import annotations

import pytest
import torch
from ascend_npugraph_ex import fused_op
from ascend_npugraph_ex.ops import reference as ref

# Tolerances: float32 kernels may reorder one reduction (the C++ norms' sum of squares: a few ulp,
# see FP32_NORM_RTOL); bf16 may differ by one rounding step (the Python fallback's RoPE rounds
# once instead of three times; the C++ RoPE is bitwise, see test_cpu_kernels.py).
TOL = {torch.float32: 1e-6, torch.bfloat16: 6.25e-2}


def _inputs(dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return {
        "x": r(3, 7, 64), "res": r(3, 7, 64), "w": r(64),
        "q": r(3, 4, 7, 16), "k": r(3, 2, 7, 16), "cos": r(3, 1, 7, 16), "sin": r(3, 1, 7, 16),
        "qw": r(16), "kw": r(16),
    }  # fmt: skip


def _check(got: object, want: object, dtype: torch.dtype) -> None:
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    assert len(got_t) == len(want_t)
    for g, w in zip(got_t, want_t, strict=True):
        assert g.dtype == w.dtype
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=TOL[dtype], rtol=TOL[dtype])


def _cases(t: dict[str, torch.Tensor]) -> list[tuple[str, tuple[object, ...], object]]:
    return [
        ("rms_norm", (t["x"], t["w"], 1e-6), ref.rms_norm_ref(t["x"], t["w"], 1e-6)),
        (
            "add_rms_norm",
            (t["x"], t["res"], t["w"], 1e-5),
            ref.add_rms_norm_ref(t["x"], t["res"], t["w"], 1e-5),
        ),
        ("swiglu", (t["x"], t["res"]), ref.swiglu_ref(t["x"], t["res"])),
        (
            "rotary",
            (t["q"], t["k"], t["cos"], t["sin"]),
            ref.rotary_ref(t["q"], t["k"], t["cos"], t["sin"]),
        ),
        (
            "qk_norm_rope",
            (t["q"], t["k"], t["qw"], t["kw"], 1e-6, t["cos"], t["sin"]),
            ref.qk_norm_rope_ref(t["q"], t["k"], t["qw"], t["kw"], 1e-6, t["cos"], t["sin"]),
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "swiglu", "rotary", "qk_norm_rope"])
def test_cpu_kernel_matches_reference(name: str, dtype: torch.dtype) -> None:
    for case, args, want in _cases(_inputs(dtype)):
        if case == name:
            _check(fused_op(name)(*args), want, dtype)


# The C++ norms sum the squares of a row in their own order (vector lanes, then across them)
# where aten's mean uses a cascade, so in float32 rstd, and with it every output, may differ from
# the unfused ops by the rounding of that sum: <= 3.3 eps relative measured for rows of 8 to 16384
# elements at scales 1e-3 to 1e3. Every other step rounds as the unfused ops do. (The Python
# fallback is bitwise: it runs the same aten ops.)
FP32_NORM_RTOL = 8 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("h", [8, 100, 1024, 16384])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_float32_norms_are_within_a_few_ulp(h: int, scale: float) -> None:
    g = torch.Generator().manual_seed(h)
    x, res = (torch.randn(16, h, generator=g) * scale for _ in range(2))
    w = torch.randn(h, generator=g)
    got, want = fused_op("rms_norm")(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6)
    torch.testing.assert_close(got, want, atol=0.0, rtol=FP32_NORM_RTOL)
    y, s = fused_op("add_rms_norm")(x, res, w, 1e-6)
    y_ref, s_ref = ref.add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(s, s_ref)  # a single rounded add
    torch.testing.assert_close(y, y_ref, atol=0.0, rtol=FP32_NORM_RTOL)


def test_output_keeps_permuted_layout() -> None:
    # An SDPA output's layout follows q's; the rotary output must keep q's (permuted) strides.
    q = torch.randn(2, 7, 4, 16).transpose(1, 2)
    k = torch.randn(2, 7, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 7, 16), torch.randn(2, 1, 7, 16)
    qo, ko = fused_op("rotary")(q, k, cos, sin)
    assert qo.stride() == (q * cos).stride()
    assert ko.stride() == (k * cos).stride()


def test_fake_impl_matches_kernel_metadata() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = _inputs(torch.bfloat16)
    for name, args, _ in _cases(t):
        real = fused_op(name)(*args)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = fused_op(name)(*fake_args)
        for r, f in zip(
            real if isinstance(real, tuple) else (real,),
            fake if isinstance(fake, tuple) else (fake,),
            strict=True,
        ):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name


def test_fake_rejects_wrong_weight_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(RuntimeError, match="weight must have shape"):
        fused_op("rms_norm")(torch.empty(2, 64), torch.empty(1, 64), 1e-6)


def test_unknown_op_name() -> None:
    with pytest.raises(KeyError, match="known: rms_norm"):
        fused_op("layer_norm")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_kernels_match_reference(dtype: torch.dtype) -> None:
    pytest.importorskip("triton", reason="the CUDA kernels need triton (pip install triton)")
    for name, args, want in _cases(_inputs(dtype, "cuda")):
        _check(fused_op(name)(*args), want, dtype)


def test_npu_kernels_call_torch_npu_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NPU kernels, run against a stand-in torch_npu implementing the documented schemas."""
    import sys
    import types

    fake = types.ModuleType("torch_npu")
    calls: list[str] = []

    def npu_rms_norm(
        x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
    ) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append("npu_rms_norm")
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
        return gamma * (xf * rstd).to(x.dtype), rstd

    def npu_add_rms_norm(
        x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append("npu_add_rms_norm")
        s = x1 + x2
        y, rstd = npu_rms_norm(s, gamma, epsilon)
        return y, rstd, s

    def npu_swiglu(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        calls.append("npu_swiglu")
        a, b = x.chunk(2, dim=dim)
        return torch.nn.functional.silu(a) * b

    def npu_rotary_mul(
        x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"
    ) -> torch.Tensor:
        calls.append("npu_rotary_mul")
        return x * r1 + ref.rotate_half(x) * r2

    for f in (npu_rms_norm, npu_add_rms_norm, npu_swiglu, npu_rotary_mul):
        setattr(fake, f.__name__, f)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    from ascend_npugraph_ex.ops import npu

    t = _inputs(torch.float32)
    for name, args, want in _cases(t):
        _check(npu.KERNELS[name](*args), want, torch.float32)
    merged = torch.randn(3, 7, 128)
    gate, up = merged[..., :64], merged[..., 64:]
    _check(npu.swiglu(gate, up), ref.swiglu_ref(gate, up), torch.float32)
    assert {"npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_rotary_mul"} <= set(calls)
