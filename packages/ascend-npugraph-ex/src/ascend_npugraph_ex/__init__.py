"""ascend_npugraph_ex: FX fusion compiler (torch.compile backend ``npugraph_ex``) for Ascend NPUs.

    compiled = torch.compile(model, backend="npugraph_ex", options={"force_eager": True})

Fusions (add+RMSNorm, RMSNorm, SwiGLU, RoPE, q/k-norm+RoPE) replace the patterns Hugging Face and
vLLM model code traces to with ``torch.ops.npugraph_ex.*`` ops that have a kernel per device.
"""

from __future__ import annotations

from ascend_npugraph_ex.backend import compile_graph, make_backend, npugraph_ex_backend
from ascend_npugraph_ex.errors import (
    NpugraphExError,
    NpugraphExOptionsError,
    StaticKernelCacheError,
)
from ascend_npugraph_ex.ops import OPS, fused_op
from ascend_npugraph_ex.options import NpugraphExOptions
from ascend_npugraph_ex.passes import FUSIONS, FusionReport, PassManager
from ascend_npugraph_ex.static_kernel import START_MESSAGE, StaticKernelCache

__all__ = [
    "FUSIONS",
    "OPS",
    "START_MESSAGE",
    "FusionReport",
    "NpugraphExError",
    "NpugraphExOptions",
    "NpugraphExOptionsError",
    "PassManager",
    "StaticKernelCache",
    "StaticKernelCacheError",
    "compile_graph",
    "fused_op",
    "make_backend",
    "npugraph_ex_backend",
]
