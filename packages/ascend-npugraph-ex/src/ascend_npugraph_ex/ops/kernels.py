"""A device's kernel table: one callable per fused op, by op name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["compose_qk_norm_rope", "kernel_table"]

Kernel = Callable[..., Any]


def compose_qk_norm_rope(rms_norm: Kernel, rotary: Kernel) -> Kernel:
    """``qk_norm_rope`` from a device's own ``rms_norm`` and ``rotary``: per-head RMSNorm of q
    and k, then RoPE. No device library has one op for it (vllm-ascend's is a Triton-Ascend
    kernel), and four launches already replace the ~20 of the unfused graph."""

    def qk_norm_rope(
        q: torch.Tensor,
        k: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result: tuple[torch.Tensor, torch.Tensor] = rotary(
            rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin
        )
        return result

    qk_norm_rope.__doc__ = f"``qk_norm_rope`` as {rms_norm.__module__}'s rms_norm, then rotary."
    return qk_norm_rope


def kernel_table(
    *, rms_norm: Kernel, add_rms_norm: Kernel, swiglu: Kernel, rotary: Kernel
) -> dict[str, Kernel]:
    """The kernels of one device, keyed by the fused op's name."""
    return {
        "rms_norm": rms_norm,
        "add_rms_norm": add_rms_norm,
        "swiglu": swiglu,
        "rotary": rotary,
        "qk_norm_rope": compose_qk_norm_rope(rms_norm, rotary),
    }
