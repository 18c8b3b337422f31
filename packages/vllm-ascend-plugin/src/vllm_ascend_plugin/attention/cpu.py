"""vLLM's CPU attention, made capturable in FULL graphs on the CPU twin platform.

vLLM's ``CPUAttentionMetadataBuilder`` declares ``AttentionCGSupport.NEVER``, and rightly so for
a graph that bakes its arguments: each step it computes a fresh ``scheduler_metadata`` tensor
(the kernel's work partition over the sequence lengths, whose size changes with them), and the
kernel reads it on the host side. This backend keeps vLLM's builder and kernel and changes two
things, as vllm-ascend does for the NPU's attention:

- the kernel call is captured as an updatable task (:func:`ascend_aclgraph.updatable`), with
  ``scheduler_metadata`` declared host-side data; before every FULL replay the plugin rewrites
  the task with the step's metadata (:mod:`vllm_ascend_plugin.graph_params`);
- the builder declares ``UNIFORM_SINGLE_TOKEN_DECODE``. Everything else the kernel reads is
  padded by vLLM's runner into persistent buffers of fixed shape for a uniform decode batch
  (``query_start_loc``, ``seq_lens`` and the block table have ``num_reqs`` = padded tokens rows,
  padded requests have length 0, padded slots are -1); a mixed batch has as many rows as it has
  requests, so the captured shapes would not fit it. Speculative decode (uniform batches with
  more than one token per request) is not proven here, so it is not claimed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import ascend_aclgraph as ag
import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_ascend_plugin import graph_params

__all__ = [
    "AscendCPUAttentionBackend",
    "AscendCPUAttentionBackendImpl",
    "AscendCPUAttentionMetadataBuilder",
]

_KERNEL_NAME = "cpu_attention_with_kv_cache"


def _kernel() -> Any:
    # The C++ op vLLM's CPU attention launches; loaded with vllm._C by vLLM's import.
    return getattr(torch.ops._C, _KERNEL_NAME).default


_host_arguments_declared = False


def _declare_host_arguments() -> None:
    global _host_arguments_declared
    if not _host_arguments_declared:
        ag.declare_host_tensor_arguments(_kernel(), "scheduler_metadata")
        _host_arguments_declared = True


class AscendCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )


class AscendCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            attn_metadata is None
            or self.attn_type != AttentionType.DECODER
            or output_scale is not None
            or output_block_scale is not None
        ):
            # Warm-up, encoder attention, quantized outputs: vLLM's own path, never in a FULL
            # graph of a decoder.
            result: torch.Tensor = super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
            )
            return result
        _declare_host_arguments()
        sinks: torch.Tensor | None = getattr(self, "sinks", None)
        if sinks is not None and sinks.dtype not in (torch.bfloat16, torch.float32):
            sinks = sinks.to(torch.float32)  # as vLLM's forward does, once
            setattr(self, "sinks", sinks)  # noqa: B010 (vLLM's attribute, untyped to mypy)
        num_tokens = attn_metadata.num_actual_tokens
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view(
            (num_blocks, num_kv_heads, block_size * 2, -1)
        ).chunk(2, dim=2)
        # vLLM's ops.cpu_attention_with_kv_cache, argument for argument, as one task.
        ag.updatable(
            _kernel(),
            query[:num_tokens],
            key_cache,
            value_cache,
            output[:num_tokens],
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            self.scale,
            attn_metadata.causal,
            self.alibi_slopes,
            self.sliding_window,
            attn_metadata.block_table,
            self.logits_soft_cap,
            attn_metadata.scheduler_metadata,
            sinks,
            attn_metadata.dynamic_causal,
            layer._k_scale_float,
            layer._v_scale_float,
            self.kv_cache_dtype,
        )
        layer_name = layer.layer_name
        graph_params.register_task(lambda context: _step_params(context, layer_name))
        return output


def _step_params(context: Any, layer_name: str) -> dict[str, Any]:
    metadata = context.attn_metadata
    if isinstance(metadata, list):  # micro-batches: not captured in FULL graphs on CPU
        raise RuntimeError("FULL graph replay with micro-batched attention metadata")
    return {"scheduler_metadata": metadata[layer_name].scheduler_metadata}


class AscendCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        # vLLM looks backends up by name in places (logs, kv-cache layout checks); ours is vLLM's
        # CPU attention with capture support, so it keeps the name.
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[AscendCPUAttentionBackendImpl]:
        return AscendCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[AscendCPUAttentionMetadataBuilder]:
        return AscendCPUAttentionMetadataBuilder
