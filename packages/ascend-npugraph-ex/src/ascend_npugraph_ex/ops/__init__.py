"""Fused custom ops (``torch.ops.npugraph_ex.*``) with a kernel per device."""

from __future__ import annotations

from ascend_npugraph_ex.ops.library import NAMESPACE, OPS, fused_op

__all__ = ["NAMESPACE", "OPS", "fused_op"]
