"""SwiGLU fusion: ``mul(silu(gate), up)`` → ``npugraph_ex.swiglu(gate, up)``.

Covers HF's ``act_fn(gate_proj(x)) * up_proj(x)`` and vLLM's ``SiluAndMul`` (``silu(x[..., :d]) *
x[..., d:]``, where gate and up are slices of one tensor). Declined when ``silu``'s result is used
elsewhere, or when the multiply broadcasts or promotes.
"""

from __future__ import annotations

from torch import fx

from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.passes.fx_utils import FusionRewrite, aten, fake_val, is_call

__all__ = ["fuse_swiglu"]


def fuse_swiglu(graph: fx.Graph) -> int:
    """Replace every ``silu(gate) * up`` with ``npugraph_ex.swiglu``; returns the count."""
    rewrite = FusionRewrite(graph)
    op = fused_op("swiglu")
    count = 0
    for node in list(graph.nodes):
        if not is_call(node, aten.mul.Tensor) or node.kwargs:
            continue
        a, b = node.args[0], node.args[1]
        silu, up = (a, b) if is_call(a, aten.silu.default) else (b, a)
        if not is_call(silu, aten.silu.default) or not isinstance(up, fx.Node):
            continue
        assert isinstance(silu, fx.Node)
        if len(silu.users) != 1 or silu is up:
            continue
        gate = silu.args[0]
        vg, vu, vo = fake_val(gate), fake_val(up), fake_val(node)
        if vg is None or vu is None or vo is None:
            continue
        if not (vg.shape == vu.shape == vo.shape and vg.dtype == vu.dtype == vo.dtype):
            continue
        if rewrite.apply(op, (gate, up), [node], [node, silu]):
            count += 1
    return count
