"""The CPU kernels: C++ (csrc/fused_cpu.cpp) when it builds, else the Python composites."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ascend_npugraph_ex import fused_op
from ascend_npugraph_ex.ops import cpu, cpu_cpp, library
from ascend_npugraph_ex.ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16]
# The Python composite accumulates RoPE in place (one rounding less than the unfused ops in bf16).
COMPOSITE_TOL = {torch.float32: 1e-6, torch.bfloat16: 6.25e-2}

can_build = pytest.mark.skipif(
    cpu_cpp._compiler() is None or bool(os.environ.get(cpu_cpp.ENV_DISABLE)),
    reason="no C++ compiler, or the C++ kernels are disabled by the environment",
)


def _rope_inputs(
    dtype: torch.dtype, batch: int, seq: int, heads: int, kv: int, dim: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    # HF layout: q/k projected as [B, S, H, D] and transposed to [B, H, S, D]; cos/sin [B, 1, S, D].
    q = r(batch, seq, heads, dim).transpose(1, 2)
    k = r(batch, seq, kv, dim).transpose(1, 2)
    return q, k, r(batch, 1, seq, dim), r(batch, 1, seq, dim), r(dim), r(dim)


SHAPES = [(1, 1, 4, 2, 32), (8, 1, 16, 8, 128), (2, 33, 4, 2, 64)]


@can_build
def test_cpp_kernels_are_registered() -> None:
    q, k, cos, sin, _, _ = _rope_inputs(torch.float32, *SHAPES[0])
    fused_op("rotary")(q, k, cos, sin)
    assert library.cpu_kernels() == "cpp"
    for name in library.OPS:
        dump = torch._C._dispatch_dump(f"npugraph_ex::{name}")
        active = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        assert "fused_cpu.cpp" in active, (name, active)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rotary_is_bitwise_the_unfused_ops(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    q, k, cos, sin, _, _ = _rope_inputs(dtype, *shape)
    got, want = fused_op("rotary")(q, k, cos, sin), ref.rotary_ref(q, k, cos, sin)
    if library.cpu_kernels() == "cpp":
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    else:
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=COMPOSITE_TOL[dtype], rtol=COMPOSITE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_is_bitwise_norm_then_unfused_rope(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    # The norm is the rms_norm kernel (bitwise HF in float32 where aten::_fused_rms_norm is);
    # the RoPE after it is bitwise the unfused ops in the C++ kernel.
    q, k, cos, sin, qw, kw = _rope_inputs(dtype, *shape)
    q, k = q.contiguous(), k.contiguous()
    got = fused_op("qk_norm_rope")(q, k, qw, kw, 1e-6, cos, sin)
    want = ref.rotary_ref(cpu.rms_norm(q, qw, 1e-6), cpu.rms_norm(k, kw, 1e-6), cos, sin)
    tol = 0.0 if library.cpu_kernels() == "cpp" else COMPOSITE_TOL[dtype]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    full = ref.qk_norm_rope_ref(q, k, qw, kw, 1e-6, cos, sin)
    for g, w in zip(got, full, strict=True):
        torch.testing.assert_close(g, w, atol=COMPOSITE_TOL[dtype], rtol=COMPOSITE_TOL[dtype])


@pytest.mark.parametrize(
    "case",
    ["cos_2d", "cos_float32_on_bf16", "odd_head_dim", "strided_last_dim", "fp16", "float64"],
)
def test_rope_layouts_and_fallbacks(case: str) -> None:
    dtype = {"fp16": torch.float16, "float64": torch.float64}.get(case, torch.bfloat16)
    q, k, cos, sin, _, _ = _rope_inputs(dtype, 2, 5, 4, 2, 16)
    if case == "cos_2d":  # [S, D] tables broadcast over batch and heads
        cos, sin = cos[0, 0], sin[0, 0]
    elif case == "cos_float32_on_bf16":  # type promotion: the composite runs
        cos, sin = cos.float(), sin.float()
    elif case == "odd_head_dim":
        q, k, cos, sin = (t[..., :15] for t in (q, k, cos, sin))
    elif case == "strided_last_dim":
        q = torch.randn(2, 4, 5, 32, dtype=dtype)[..., ::2]
    got, want = fused_op("rotary")(q, k, cos, sin), ref.rotary_ref(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        torch.testing.assert_close(g, w, atol=6.25e-2, rtol=6.25e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", library.OPS)
def test_python_composites_match_reference(name: str, dtype: torch.dtype) -> None:
    """The fallback kernels, called directly (the process may be using the C++ ones)."""
    g = torch.Generator().manual_seed(1)
    x, res, w = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 7, 64), (3, 7, 64), (64,)))
    q, k, cos, sin, qw, kw = _rope_inputs(dtype, 2, 5, 4, 2, 16)
    args, want = {
        "rms_norm": ((x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6)),
        "add_rms_norm": ((x, res, w, 1e-6), ref.add_rms_norm_ref(x, res, w, 1e-6)),
        "swiglu": ((x, res), ref.swiglu_ref(x, res)),
        "rotary": ((q, k, cos, sin), ref.rotary_ref(q, k, cos, sin)),
        "qk_norm_rope": (
            (q, k, qw, kw, 1e-6, cos, sin),
            ref.qk_norm_rope_ref(q, k, qw, kw, 1e-6, cos, sin),
        ),
    }[name]
    got = cpu.KERNELS[name](*args)
    for gt, wt in zip(
        got if isinstance(got, tuple) else (got,),
        want if isinstance(want, tuple) else (want,),
        strict=True,
    ):
        torch.testing.assert_close(gt, wt, atol=COMPOSITE_TOL[dtype], rtol=COMPOSITE_TOL[dtype])


_CHILD = textwrap.dedent(
    """
    import warnings
    import torch
    from ascend_npugraph_ex import fused_op
    from ascend_npugraph_ex.ops import library, reference as ref
    q, k = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 3, 16)
    cos, sin = torch.randn(2, 1, 3, 16), torch.randn(2, 1, 3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fused_op("rotary")(q, k, cos, sin)
        fused_op("rms_norm")(q, torch.ones(16), 1e-6)
    for g, w in zip(got, ref.rotary_ref(q, k, cos, sin)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    print(library.cpu_kernels(), sum("C++ CPU kernels unavailable" in str(w.message)
                                     for w in caught))
    """
)


def _child(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_env_var_forces_the_python_composites() -> None:
    assert _child({cpu_cpp.ENV_DISABLE: "1"}) == "python 0"


def test_failed_build_warns_once_and_falls_back(tmp_path: Path) -> None:
    env = {"CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path), cpu_cpp.ENV_DISABLE: ""}
    assert _child(env) == "python 1"
