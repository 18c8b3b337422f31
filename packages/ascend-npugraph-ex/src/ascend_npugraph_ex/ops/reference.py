"""Reference semantics of the fused ops, written as the unfused PyTorch code they replace.

These functions *define* what every device kernel must compute. They mirror Hugging Face
transformers' Llama / Qwen2 / Qwen3 modules op for op (float32 up-cast RMSNorm, ``rotate_half``
RoPE, ``silu(gate) * up``), so "fused == unfused" is a precise statement. Kernels for a device
that has no specialised implementation fall back to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ascend_npugraph_ex.ops.kernels import compose_qk_norm_rope

__all__ = [
    "add_rms_norm_ref",
    "qk_norm_rope_ref",
    "rms_norm_ref",
    "rotary_ref",
    "rotate_half",
    "swiglu_ref",
]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)``."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` then ``(rms_norm(s), s)``; ``s`` is the new residual."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the gated MLP activation of Llama / Qwen)."""
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., d/2:], x[..., :d/2])``, the "neox" half rotation used by HF RoPE."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply RoPE to ``q`` and ``k``: ``x * cos + rotate_half(x) * sin`` (cos/sin broadcast)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


qk_norm_rope_ref = compose_qk_norm_rope(rms_norm_ref, rotary_ref)
qk_norm_rope_ref.__doc__ = (
    "Per-head RMSNorm of ``q`` and ``k`` over the last dim, then RoPE (Qwen3 attention)."
)
