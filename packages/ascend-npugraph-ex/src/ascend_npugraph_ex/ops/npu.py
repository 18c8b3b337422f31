"""Ascend NPU kernels of the fused ops (dispatch key ``PrivateUse1``), backed by torch_npu.

torch_npu is imported inside each kernel: it only exists on Ascend hosts, and importing it
elsewhere breaks ``import torch``. Schemas used (op-plugin ``op_plugin_functions.yaml``):

- ``npu_rms_norm(self, gamma, epsilon=1e-6) -> (y, rstd)``
- ``npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6) -> (y, rstd, x)`` with ``x = x1 + x2``
- ``npu_swiglu(self, dim=-1) -> Tensor``: ``silu(first half) * second half`` along ``dim``
- ``npu_rotary_mul(self, r1, r2, rotary_mode='half') -> Tensor``: ``x * r1 + rotate_half(x) * r2``

The NPU kernels take gamma in the input dtype; a differently typed weight (an fp32 weight on a
bf16 model) falls back to the reference composite so results keep the HF type promotion.
"""

from __future__ import annotations

from typing import Any

import torch

from ascend_npugraph_ex.ops.kernels import kernel_table
from ascend_npugraph_ex.ops.reference import rms_norm_ref

__all__ = ["KERNELS"]


def _torch_npu() -> Any:
    import torch_npu

    return torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """NPU ``npugraph_ex.rms_norm`` via ``torch_npu.npu_rms_norm``."""
    if weight.dtype != x.dtype:
        return rms_norm_ref(x, weight, eps)
    y: torch.Tensor = _torch_npu().npu_rms_norm(x, weight, eps)[0]
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """NPU ``npugraph_ex.add_rms_norm`` via ``torch_npu.npu_add_rms_norm`` (functional)."""
    if not (x.dtype == residual.dtype == weight.dtype):
        s = x + residual
        return rms_norm_ref(s, weight, eps), s
    y, _rstd, s = _torch_npu().npu_add_rms_norm(x, residual, weight, eps)
    return y, s


def _adjacent_halves(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """The ``[..., 2d]`` tensor whose halves are ``gate`` and ``up``, if they are such views."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.stride() != up.stride():
        return None
    d = gate.shape[-1]
    if gate.stride(-1) != 1 or up.storage_offset() != gate.storage_offset() + d:
        return None
    if gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr():
        return None
    shape = (*gate.shape[:-1], 2 * d)
    return gate.as_strided(shape, gate.stride(), gate.storage_offset())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """NPU ``npugraph_ex.swiglu`` via ``torch_npu.npu_swiglu``.

    vLLM's merged ``gate_up_proj`` output is passed as two adjacent views, which are re-joined
    without a copy; separate tensors (HF's two projections) are concatenated first.
    """
    merged = _adjacent_halves(gate, up)
    if merged is None:
        if gate.shape != up.shape or gate.dtype != up.dtype:
            return torch.nn.functional.silu(gate) * up
        merged = torch.cat((gate, up), dim=-1)
    out: torch.Tensor = _torch_npu().npu_swiglu(merged, dim=-1)
    return out


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NPU ``npugraph_ex.rotary`` via ``torch_npu.npu_rotary_mul`` (functional, broadcasts cos/sin).

    ``npu_apply_rotary_pos_emb`` would do q and k in one launch but works in place and wants the
    BSND layout; the functional op keeps this kernel free of clones and layout changes.
    """
    tnpu = _torch_npu()
    return (
        tnpu.npu_rotary_mul(q, cos.to(q.dtype), sin.to(q.dtype)),
        tnpu.npu_rotary_mul(k, cos.to(k.dtype), sin.to(k.dtype)),
    )


KERNELS = kernel_table(rms_norm=rms_norm, add_rms_norm=add_rms_norm, swiglu=swiglu, rotary=rotary)
