"""Python CPU kernels of the fused ops: the fallback of the C++ ones (csrc/fused_cpu.cpp).

They run when the C++ kernels cannot be built or ``ASCEND_NPUGRAPH_EX_NO_CPP=1`` is set (see
:mod:`.cpu_cpp`). The C++ ones are single-pass loops; these compose aten ops.

Same results as :mod:`ascend_npugraph_ex.ops.reference` (bitwise for the norms and swiglu, within
one rounding step in bf16/fp16 for RoPE), with fewer temporaries: ``aten._fused_rms_norm`` takes
the norm in one call (on CPU it is itself a composite of the same aten ops), ``swiglu`` multiplies
in place, and RoPE writes straight into one preallocated output and accumulates the rotated half
in place. Outputs keep the layout of the main input, as the fake implementations promise.
"""

from __future__ import annotations

import torch

from ascend_npugraph_ex.ops.kernels import kernel_table
from ascend_npugraph_ex.ops.reference import rms_norm_ref

__all__ = ["KERNELS"]

_aten = torch.ops.aten
_HAS_FUSED_RMS = hasattr(_aten, "_fused_rms_norm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CPU ``npugraph_ex.rms_norm``."""
    if not _HAS_FUSED_RMS or not x.is_contiguous():
        # Permuted inputs (Qwen3's transposed q/k heads): the composite keeps x's layout in
        # the output, as the unfused ops do, without a copy to contiguous and back.
        return rms_norm_ref(x, weight, eps)
    hidden = [x.shape[-1]]
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        fused: torch.Tensor = _aten._fused_rms_norm.default(x, hidden, weight, eps)[0]
        return fused
    # Low precision: normalise in float32, round to the input dtype, *then* scale by the weight,
    # exactly where the HF module rounds (a single fused scale would round once less).
    normed: torch.Tensor = _aten._fused_rms_norm.default(x.to(torch.float32), hidden, None, eps)[0]
    normed = normed.to(x.dtype)
    if torch.promote_types(normed.dtype, weight.dtype) == normed.dtype:
        return normed.mul_(weight)
    return weight * normed


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU ``npugraph_ex.add_rms_norm``: returns ``(rms_norm(x + residual), x + residual)``."""
    s = torch.add(x, residual)
    return rms_norm(s, weight, eps), s


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """CPU ``npugraph_ex.swiglu``: ``silu(gate) * up`` with one output buffer."""
    if gate.dtype == up.dtype and gate.shape == up.shape:
        # The usual case, checked first: torch.broadcast_shapes costs more than the whole op at
        # decode sizes (~15 us).
        return torch.nn.functional.silu(gate).mul_(up)
    dtype = torch.promote_types(gate.dtype, up.dtype)
    shape = torch.broadcast_shapes(gate.shape, up.shape)  # type: ignore[no-untyped-call]
    if dtype != gate.dtype or shape != gate.shape:
        return torch.nn.functional.silu(gate) * up
    out = torch.nn.functional.silu(gate)
    return out.mul_(up)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x * cos, then accumulate rotate_half(x) * sin into it in place: one product buffer less
    # than the unfused graph. (Writing the two halves separately with sliced addcmul_ was
    # measured 3x slower at decode sizes: per-op overhead dominates there, not bandwidth.)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out = x * cos  # TensorIterator keeps x's layout, as the unfused op does
    if out.dtype != torch.promote_types(out.dtype, sin.dtype):
        return out + rotated * sin
    return out.addcmul_(rotated, sin)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU ``npugraph_ex.rotary``."""
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


KERNELS = kernel_table(rms_norm=rms_norm, add_rms_norm=add_rms_norm, swiglu=swiglu, rotary=rotary)
