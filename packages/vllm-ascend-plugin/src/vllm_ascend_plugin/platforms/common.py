"""What both platforms answer the same way: graph mode on, our wrapper, compiler and pool."""

from __future__ import annotations

from typing import Any, ClassVar

import ascend_aclgraph as ag

__all__ = ["GraphPlatformMixin"]

_WRAPPER = "vllm_ascend_plugin.graph_wrapper.ACLGraphWrapper"
_COMPILER = "vllm_ascend_plugin.compiler.AscendCompiler"


class GraphPlatformMixin:
    """Graph-mode hooks of vLLM's ``Platform`` (put it before the vLLM platform base class).

    Subclasses set :attr:`graph_backend` (the ascend_aclgraph backend) and
    :attr:`attention_support` (what their attention backend's metadata builder declares; the
    config-time mode resolution uses it before any backend is built).
    """

    graph_backend: ClassVar[str]
    attention_support: ClassVar[ag.AttentionSupport]

    @classmethod
    def support_static_graph_mode(cls) -> bool:
        return True

    @classmethod
    def get_static_graph_wrapper_cls(cls) -> str:
        return _WRAPPER

    @classmethod
    def get_compile_backend(cls) -> str:
        return _COMPILER

    def get_global_graph_pool(self) -> Any:
        from vllm_ascend_plugin.device import shared_graph_pool

        return shared_graph_pool()
