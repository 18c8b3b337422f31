# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (Triton kernels are untyped by nature: their arguments are pointers and constexprs.)
"""CUDA kernels of the fused ops, written in Triton (``pip install ascend-npugraph-ex[cuda]``).

Each kernel reads every input once and writes every output once: add+RMSNorm keeps the row in
registers between the sum, the statistics and the scaling, which is what makes it bandwidth-bound
(the benchmark compares it against a device copy). Triton is imported on first use; without it,
or for layouts the kernels do not cover, the reference composite runs instead.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from ascend_npugraph_ex.ops.kernels import kernel_table
from ascend_npugraph_ex.ops.reference import rms_norm_ref, rotary_ref, swiglu_ref

__all__ = ["KERNELS", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        warnings.warn(
            "npugraph_ex: triton is not installed; CUDA fused ops run the unfused reference "
            "(pip install 'ascend-npugraph-ex[cuda]')",
            stacklevel=3,
        )
        return False
    return True


@functools.cache
def _triton_kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(
        X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            # Round the sum to the input dtype first: it *is* the new residual.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + row * stride_s + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        normed = (xf * rstd).to(X.dtype.element_ty)  # HF rounds before the weight multiply
        w = tl.load(W + cols, mask=mask, other=0.0)
        y = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(G, U, O, n, BLOCK: tl.constexpr):  # noqa: E741
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0)
        act = (g / (1.0 + tl.exp(-g))).to(O.dtype.element_ty)
        tl.store(
            O + offs, (act.to(tl.float32) * u.to(tl.float32)).to(O.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _rope_kernel(
        X, C, Sn, O, d1, d2, sx0, sx1, sx2, sc0, sc1, sc2, HALF: tl.constexpr, BLOCK: tl.constexpr,  # noqa: E741
    ):  # fmt: skip
        # One program per (i0, i1, i2) row of a 4-D [d0, d1, d2, D] tensor; cos/sin strides are
        # those of cos/sin expanded to x's shape (0 on broadcast dims). O is contiguous.
        row = tl.program_id(0)
        i2 = row % d2
        i1 = (row // d2) % d1
        i0 = row // (d1 * d2)
        xo = i0 * sx0 + i1 * sx1 + i2 * sx2
        co = i0 * sc0 + i1 * sc1 + i2 * sc2
        cols = tl.arange(0, BLOCK)
        mask = cols < HALF
        x1 = tl.load(X + xo + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + xo + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(C + co + cols, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(C + co + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(Sn + co + cols, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(Sn + co + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        out = O + row * (2 * HALF)
        tl.store(out + cols, (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=mask)
        tl.store(out + HALF + cols, (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=mask)

    return {"add_rms_norm": _add_rms_norm_kernel, "swiglu": _swiglu_kernel, "rope": _rope_kernel}


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as a 2-D [rows, hidden] view with unit last stride, or None if that needs a copy."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if not triton_available() or weight.dtype != x.dtype:
        return None
    if residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape):
        return None
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    if x2 is None or r2 is None or not weight.is_contiguous():
        return None
    import triton

    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    block = triton.next_power_of_2(n_cols)
    y2, s2 = y.view(-1, n_cols), s.view(-1, n_cols)
    _triton_kernels()["add_rms_norm"][(n_rows,)](
        x2, r2, weight, y2, s2, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        n_cols, eps, HAS_RES=residual is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )  # fmt: skip
    return y, (s if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CUDA ``npugraph_ex.rms_norm`` (Triton)."""
    res = _norm(x, None, weight, eps)
    return rms_norm_ref(x, weight, eps) if res is None else res[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA ``npugraph_ex.add_rms_norm`` (Triton, one read and one write of each tensor)."""
    res = _norm(x, residual, weight, eps)
    if res is None or res[1] is None:
        s = x + residual
        return rms_norm_ref(s, weight, eps), s
    return res[0], res[1]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """CUDA ``npugraph_ex.swiglu`` (Triton, elementwise)."""
    if (
        not triton_available()
        or gate.shape != up.shape
        or gate.dtype != up.dtype
        or not (gate.is_contiguous() and up.is_contiguous())
    ):
        return swiglu_ref(gate, up)
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _triton_kernels()["swiglu"][((n + block - 1) // block,)](gate, up, out, n, BLOCK=block)
    return out


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    if x.dim() != 4 or x.stride(-1) != 1 or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return None
    try:
        c = cos.expand(x.shape)
        s = sin.expand(x.shape)
    except RuntimeError:
        return None
    if c.stride() != s.stride() or c.stride(-1) != 1 or x.shape[-1] % 2:
        return None
    import triton

    d0, d1, d2, d = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = d // 2
    _triton_kernels()["rope"][(d0 * d1 * d2,)](
        x, c, s, out, d1, d2, x.stride(0), x.stride(1), x.stride(2),
        c.stride(0), c.stride(1), c.stride(2), HALF=half, BLOCK=triton.next_power_of_2(half),
    )  # fmt: skip
    return out


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA ``npugraph_ex.rotary`` (Triton, one program per head row)."""
    if triton_available():
        qo, ko = _rope_one(q, cos, sin), _rope_one(k, cos, sin)
        if qo is not None and ko is not None:
            return qo, ko
    return rotary_ref(q, k, cos, sin)


KERNELS = kernel_table(rms_norm=rms_norm, add_rms_norm=add_rms_norm, swiglu=swiglu, rotary=rotary)
