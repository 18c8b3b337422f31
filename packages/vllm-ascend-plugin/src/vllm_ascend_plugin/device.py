"""The one device-dependent choice of the graph logic: which ascend_aclgraph backend runs it.

Both platforms (the NPU one and the CPU twin) run the same wrapper, runner and update code; they
differ in the graph backend: ``npu`` (ACL graphs through torch_npu) or ``cpu`` (the semantic
twin). The active platform class names it in ``graph_backend``; everything else asks here.
"""

from __future__ import annotations

import functools

import ascend_aclgraph as ag

__all__ = ["graph_backend_name", "shared_graph_pool"]


def graph_backend_name() -> str:
    """The ascend_aclgraph backend of the active vLLM platform ("npu" or "cpu")."""
    from vllm.platforms import current_platform

    name = getattr(current_platform, "graph_backend", None)
    if name is None:
        raise RuntimeError(
            f"vLLM's platform is {type(current_platform).__name__}, not one of "
            "vllm_ascend_plugin's: ACLGraph wrappers run only under the plugin's NPU platform "
            "or its CPU twin platform (VLLM_ASCEND_PLUGIN_DEVICE=cpu)"
        )
    return str(name)


@functools.cache
def shared_graph_pool() -> ag.GraphPool:
    """The process's one graph memory pool, shared by every wrapper (vLLM's global pool).

    Graphs of every size and every piece allocate from it, so a replay's outputs may reuse the
    memory another graph's outputs had: what lets many captured sizes cost little memory.
    """
    return ag.get_backend(graph_backend_name()).new_pool()
