"""The CPU twin platform: vLLM's CPU platform running the plugin's graph logic on the cpu twin.

Selected with ``VLLM_ASCEND_PLUGIN_DEVICE=cpu``. Everything about the device stays vLLM's CPU
platform (memory, threads, its attention kernel, its custom ops); the graph side is the NPU
platform's: the same config normalisation, wrapper, compiler, runner and per-replay attention
updates, with ascend_aclgraph's ``cpu`` backend, which keeps a device graph's contract (static
addresses, baked host values, refused host syncs). So a generation here proves the graph logic
the NPU runs, token for token against eager.

vLLM's CPU platform switches graph mode off in its ``check_and_update_config`` (it empties the
capture sizes and turns ``VLLM_COMPILE`` into ``DYNAMO_TRACE_ONCE``); this platform saves what
the user asked for before that runs and restores it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import ascend_aclgraph as ag
from vllm.platforms.cpu import CpuPlatform

from vllm_ascend_plugin.platforms.common import GraphPlatformMixin

__all__ = ["CpuTwinPlatform"]

_ATTENTION = "vllm_ascend_plugin.attention.cpu.AscendCPUAttentionBackend"
_WORKER = "vllm_ascend_plugin.worker.cpu_worker.CpuTwinWorker"


class CpuTwinPlatform(GraphPlatformMixin, CpuPlatform):
    """vLLM's ``CpuPlatform`` with the plugin's graph mode (see the module docstring)."""

    graph_backend: ClassVar[str] = "cpu"
    # AscendCPUAttentionMetadataBuilder's declaration (FULL graphs of uniform decode batches).
    # Selecting ``CPU_ATTN`` by name keeps vLLM's own CPU attention, which declares NEVER.
    attention_support: ClassVar[ag.AttentionSupport] = (
        ag.AttentionSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    graph_worker_cls: ClassVar[str] = _WORKER
    native_forwards_for_fusion: ClassVar[bool] = True
    # The adapter's reference executor stands in for Xlite (no xlite._C on a CPU).
    xlite_native: ClassVar[bool] = False

    @classmethod
    def xlite_executor(cls, adapted: Any, vllm_config: Any) -> Any:
        from ascend_xlite_adapter import ReferenceExecutor

        return ReferenceExecutor(adapted.config, adapted.weights)

    @classmethod
    def config_attention_support(cls, vllm_config: Any) -> ag.AttentionSupport:
        if _vllm_attention_selected(getattr(vllm_config, "attention_config", None)):
            # vLLM's own CPU attention, as the user asked for it by name: it declares NEVER.
            return ag.AttentionSupport.NEVER
        return cls.attention_support

    @classmethod
    def get_attn_backend_cls(
        cls, selected_backend: Any, attn_selector_config: Any, num_heads: int | None = None
    ) -> str:
        path = super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            return str(path)  # MLA on CPU: vLLM's backend, which declares its own graph support
        if _is_cpu_attn(selected_backend):
            # Selected by name (attention_config={"backend": "CPU_ATTN"}): vLLM's backend
            # exactly, without FULL-graph support. The graph mode narrows accordingly.
            return str(path)
        return _ATTENTION


def _is_cpu_attn(backend: Any) -> bool:
    return backend is not None and getattr(backend, "name", backend) == "CPU_ATTN"


def _vllm_attention_selected(attention_config: Any) -> bool:
    return attention_config is not None and _is_cpu_attn(getattr(attention_config, "backend", None))
