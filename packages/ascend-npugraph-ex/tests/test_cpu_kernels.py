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
    # The norm is the rms_norm kernel (see test_ops.py for how close that is to HF); the RoPE
    # after it is bitwise the unfused ops in the C++ kernel.
    q, k, cos, sin, qw, kw = _rope_inputs(dtype, *shape)
    q, k = q.contiguous(), k.contiguous()
    got = fused_op("qk_norm_rope")(q, k, qw, kw, 1e-6, cos, sin)
    norm = fused_op("rms_norm")
    want = ref.rotary_ref(norm(q, qw, 1e-6), norm(k, kw, 1e-6), cos, sin)
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


# ---- the row loops of rms_norm, add_rms_norm and swiglu ------------------------------------------

LOW = [torch.bfloat16, torch.float16]
# Row lengths around the vector steps (16/32/64 elements) and their tails, and a Qwen3 hidden.
ROW_SHAPES = [(1, 1), (3, 7), (5, 33), (2, 3, 100), (4, 1024), (2, 4099)]


def _ulp_steps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many representable values of got's dtype lie between got and want, per element."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    g = got.view(bits[got.dtype]).long()
    w = want.view(bits[want.dtype]).long()
    # Sign-magnitude to a monotonic integer line, so that adjacent values differ by one.
    sign = 1 << (got.element_size() * 8 - 1)
    g = torch.where(g < 0, -(g + sign), g)
    w = torch.where(w < 0, -(w + sign), w)
    return (g - w).abs()


def assert_same_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Low precision: got rounds where the unfused ops round. rstd comes from a float32 sum in
    another order (a few ulp, see test_ops.py), so where x * rstd lands within those ulp of a
    rounding boundary one element may round the other way: allow one step in <= 0.1% of the
    elements. A kernel that skipped or added a rounding step differs in a large fraction."""
    assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
    steps = _ulp_steps(got, want)
    assert int(steps.max()) <= 1, f"differs by {int(steps.max())} steps"
    assert int((steps > 0).sum()) <= max(1, got.numel() // 1000), int((steps > 0).sum())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_low_precision_norms_round_like_the_unfused_ops(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(2)
    x, res = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(shape[-1], generator=g).to(dtype)
    assert_same_rounding(fused_op("rms_norm")(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6))
    y, s = fused_op("add_rms_norm")(x, res, w, 1e-6)
    y_ref, s_ref = ref.add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(s, s_ref)
    assert_same_rounding(y, y_ref)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_swiglu_is_bitwise_silu_times_up(dtype: torch.dtype) -> None:
    # Every finite value of the 16-bit dtype (every bfloat16 one in float32) as the gate, cut to
    # a multiple of 64: aten's silu takes its vectorized path throughout (its scalar tail uses
    # another exp than its vector body).
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    gate = bits.view(torch.bfloat16 if dtype == torch.float32 else dtype).to(dtype)
    gate = gate[torch.isfinite(gate)]
    gate = gate[: (gate.numel() // 64) * 64]
    up = torch.randn(gate.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = fused_op("swiglu")(gate.view(-1, 64), up.view(-1, 64))
    assert torch.equal(got, ref.swiglu_ref(gate, up).view(-1, 64))
    for shape in ROW_SHAPES:  # tails: the scalar std::exp of aten against a vector exp here
        g, u = torch.randn(*shape).to(dtype), torch.randn(*shape).to(dtype)
        steps = _ulp_steps(fused_op("swiglu")(g, u), ref.swiglu_ref(g, u))
        assert int(steps.max()) <= 1


def _layout_case(case: str, dtype: torch.dtype) -> tuple[str, tuple[object, ...]]:
    h = 96
    g = torch.Generator().manual_seed(4)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    w = r(h)
    if case == "permuted":  # HF's q/k heads: [B, S, H, D] transposed to [B, H, S, D]
        return "rms_norm", (r(2, 5, 4, h).transpose(1, 2), w, 1e-6)
    if case == "row_slice":  # one half of a merged projection: rows of stride 2h
        return "rms_norm", (r(6, 2 * h)[:, h:], w, 1e-6)
    if case == "qkv_heads":  # heads of q inside a fused qkv row: two levels of strides
        return "rms_norm", (r(3, 7, 6 * h)[..., : 4 * h].view(3, 7, 4, h), w, 1e-6)
    if case == "expanded":  # one row broadcast to many (stride 0)
        return "rms_norm", (r(1, h).expand(5, h), w, 1e-6)
    if case == "strided_last_dim":  # not unit-stride rows: the composite runs
        return "rms_norm", (r(4, 2 * h)[:, ::2], w, 1e-6)
    if case == "strided_weight":
        return "rms_norm", (r(4, h), r(2 * h)[::2], 1e-6)
    if case == "many_dims":  # 9 leading dims that do not merge: more than the loop indexes
        x = r(*([2] * 9), 2 * h)[..., :h]
        return "rms_norm", (x, w, 1e-6)
    if case == "add_permuted_residual":
        x = r(2, 5, 4, h).transpose(1, 2)
        return "add_rms_norm", (x, r(2, 4, 5, h), w, 1e-6)
    if case == "add_broadcast_residual":  # aten broadcasts it: the composite runs
        return "add_rms_norm", (r(4, h), r(1, h).expand(4, h), w, 1e-6)
    if case == "merged_gate_up":  # vLLM's merged gate/up projection, split without a copy
        merged = r(6, 2 * h)
        return "swiglu", (merged[:, :h], merged[:, h:])
    if case == "broadcast_up":
        return "swiglu", (r(6, h), r(1, h))
    if case == "rope_cos_broadcasts_q":  # cos/sin batch 2, q batch 1: the output is larger
        q, k, cos, sin = r(1, 4, 5, 16), r(1, 2, 5, 16), r(2, 1, 5, 16), r(2, 1, 5, 16)
        return "rotary", (q, k, cos, sin)
    if case == "qk_norm_rope_permuted":  # q/k [B, S, H, D] as a transposed [B, H, S, D]
        q, k = r(2, 4, 5, 16).transpose(1, 2), r(2, 2, 5, 16).transpose(1, 2)
        return "qk_norm_rope", (q, k, r(16), r(16), 1e-6, r(2, 5, 1, 16), r(2, 5, 1, 16))
    if case == "qk_norm_rope_wide_head":  # past the one-pass loop's row buffer: norm, then RoPE
        q, k, cos, sin = r(1, 2, 3, 1026), r(1, 2, 1, 1026), r(1, 1, 1, 1026), r(1, 1, 1, 1026)
        return "qk_norm_rope", (q, k, r(1026), r(1026), 1e-6, cos, sin)
    if case == "empty_rows":
        return "add_rms_norm", (r(0, h), r(0, h), w, 1e-6)
    if case == "empty_row":
        return "rms_norm", (r(4, 0), r(0), 1e-6)
    raise AssertionError(case)


LAYOUTS = [
    "permuted",
    "row_slice",
    "qkv_heads",
    "expanded",
    "strided_last_dim",
    "strided_weight",
    "many_dims",
    "add_permuted_residual",
    "add_broadcast_residual",
    "merged_gate_up",
    "broadcast_up",
    "rope_cos_broadcasts_q",
    "qk_norm_rope_permuted",
    "qk_norm_rope_wide_head",
    "empty_rows",
    "empty_row",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYOUTS)
def test_row_loops_cover_layouts(case: str, dtype: torch.dtype) -> None:
    name, args = _layout_case(case, dtype)
    got, want = fused_op(name)(*args), getattr(ref, f"{name}_ref")(*args)
    # RoPE after a norm may cancel (x1 cos - x2 sin): the norm's few ulp become more there.
    rope = name in ("rotary", "qk_norm_rope")
    tol = {
        torch.float32: 1e-5 if rope else 8 * torch.finfo(torch.float32).eps,
        torch.bfloat16: COMPOSITE_TOL[torch.bfloat16] if rope else 1e-2,
    }[dtype]
    for g, w in zip(
        got if isinstance(got, tuple) else (got,),
        want if isinstance(want, tuple) else (want,),
        strict=True,
    ):
        # The layout the fake promises: that of the main input, as the unfused aten ops give.
        assert (g.shape, g.dtype, g.stride()) == (w.shape, w.dtype, w.stride()), case
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, "bf16_x_fp32_weight"])
def test_norm_dtypes_without_a_loop_run_the_unfused_ops(dtype: object) -> None:
    x = torch.randn(3, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    if dtype == "bf16_x_fp32_weight":  # the output promotes to float32, as the unfused code's
        x, w = x.bfloat16(), w.float()
    got, want = fused_op("rms_norm")(x, w, 1e-6), ref.rms_norm_ref(x, w, 1e-6)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_threads_split_rows_without_changing_results() -> None:
    # Each row is computed by one thread, whole: any split gives the same bits.
    x, res = torch.randn(512, 1024), torch.randn(512, 1024)
    w = torch.randn(1024)
    gate, up = torch.randn(256, 3072), torch.randn(256, 3072)

    def run() -> list[torch.Tensor]:
        return [
            fused_op("rms_norm")(x, w, 1e-6),
            *fused_op("add_rms_norm")(x, res, w, 1e-6),
            fused_op("swiglu")(gate, up),
        ]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


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
