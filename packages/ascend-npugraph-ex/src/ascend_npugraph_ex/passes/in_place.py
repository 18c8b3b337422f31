"""Turn functionalized custom-op mutations back into in-place calls, as inductor does.

AOTAutograd functionalizes the graph it hands a forward compiler: a call of a custom op that
writes one of its arguments (vLLM's ``unified_attention_with_output`` writes its ``output``,
``unified_kv_cache_update`` the KV cache) becomes an ``auto_functionalized`` higher-order op that
clones the argument, calls the op on the clone and returns it. Run as is, that costs a copy per
call; under a graph capture it is a higher-order op no device backend launches. Inductor undoes it
after its own passes: it re-inplaces every such call whose argument nobody reads afterwards and
decomposes the rest into an explicit clone plus the in-place call. npugraph_ex returns an FX graph
instead of inductor code, so it runs the same two inductor passes itself.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

__all__ = ["restore_in_place_ops"]

_FUNCTIONALIZED = ("auto_functionalized", "auto_functionalized_v2")


def _has_functionalized_calls(graph: fx.Graph) -> bool:
    return any(
        n.op == "call_function" and getattr(n.target, "__name__", "") in _FUNCTIONALIZED
        for n in graph.nodes
    )


def restore_in_place_ops(gm: fx.GraphModule) -> bool:
    """Re-inplace / decompose ``auto_functionalized`` calls of ``gm``; whether it had any."""
    if not _has_functionalized_calls(gm.graph):
        return False
    from torch._inductor.fx_passes import post_grad
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater

    reinplace_inplaceable_ops(FakeTensorUpdater(gm), gm.graph)
    decompose: Callable[[fx.Graph], None] = post_grad.decompose_auto_functionalized
    decompose(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return True
