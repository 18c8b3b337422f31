"""FX fusion passes over aten-level inference graphs, and the pass manager that runs them."""

from __future__ import annotations

from ascend_npugraph_ex.passes.activation import fuse_swiglu
from ascend_npugraph_ex.passes.fx_utils import SkippedMatch
from ascend_npugraph_ex.passes.manager import FUSIONS, FusionReport, PassManager
from ascend_npugraph_ex.passes.norm import fuse_add_rms_norm, fuse_rms_norm
from ascend_npugraph_ex.passes.rope import fuse_qk_norm_rope, fuse_rotary

__all__ = [
    "FUSIONS",
    "FusionReport",
    "PassManager",
    "SkippedMatch",
    "fuse_add_rms_norm",
    "fuse_qk_norm_rope",
    "fuse_rms_norm",
    "fuse_rotary",
    "fuse_swiglu",
]
