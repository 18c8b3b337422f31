"""SwiGLU fusion: ``mul(silu(gate), up)`` → ``npugraph_ex.swiglu(gate, up)``.

Covers HF's ``act_fn(gate_proj(x)) * up_proj(x)`` and vLLM's ``SiluAndMul`` (``silu(x[..., :d]) *
x[..., d:]``, where gate and up are slices of one tensor). Declined when ``silu``'s result is used
elsewhere, or when the multiply broadcasts or promotes.
"""

from __future__ import annotations

from torch import fx

from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.passes.fx_utils import (
    FusionRewrite,
    SkippedMatch,
    aten,
    fake_val,
    is_call,
    same_sizes,
)

__all__ = ["fuse_swiglu"]


def fuse_swiglu(graph: fx.Graph, skipped: list[SkippedMatch] | None = None) -> int:
    """Replace every ``silu(gate) * up`` with ``npugraph_ex.swiglu``; returns the count."""
    rewrite = FusionRewrite(graph, "swiglu", skipped)
    op = fused_op("swiglu")
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, aten.mul.Tensor) or node.kwargs:
            continue
        a, b = node.args[0], node.args[1]
        silu, up = (a, b) if is_call(a, aten.silu.default) else (b, a)
        if not is_call(silu, aten.silu.default) or not isinstance(up, fx.Node) or silu is up:
            continue
        with rewrite.candidate(node):
            if len(silu.users) != 1:
                rewrite.decline("silu(gate) is used outside the product")
                continue
            gate = silu.args[0]
            vg, vu, vo = fake_val(gate), fake_val(up), fake_val(node)
            if vg is None or vu is None or vo is None:
                rewrite.decline("missing fake tensor metadata")
                continue
            if not (same_sizes(vg.shape, vu.shape) and same_sizes(vg.shape, vo.shape)):
                rewrite.decline("the product broadcasts")
                continue
            if not vg.dtype == vu.dtype == vo.dtype:
                rewrite.decline("the product promotes the dtype")
                continue
            if rewrite.apply(op, (gate, up), [node], [node, silu]):
                count += 1
    return count
