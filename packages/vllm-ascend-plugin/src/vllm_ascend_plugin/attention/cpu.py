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

    # The XliteGraph hooks (vllm_ascend_plugin.xlite_graph): Xlite-layout views of the caches,
    # and Xlite's metadata from this backend's.
    @staticmethod
    def xlite_kv_caches(layers: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return xlite_kv_caches(layers)

    @staticmethod
    def xlite_step(metadata: CPUAttentionMetadata, positions: torch.Tensor) -> tuple[bool, Any]:
        return xlite_step(metadata, positions)


# -- XliteGraph on the CPU twin -------------------------------------------------------------------
#
# With ``xlite_graph_config.enabled`` the reference executor (Xlite's stand-in here) and vLLM's
# CPU attention share one KV cache: prefills written by vLLM's kernel are read by Xlite's decode
# steps and the other way round. Xlite reads ``[num_blocks, block_size, kv_heads, head_dim]``
# caches; vLLM's CPU kernel stores each block's keys as ``[kv_heads, head_dim, block_size]`` and
# its values as ``[kv_heads, block_size, head_dim]`` (one ``[kv_heads, block_size, 2 *
# head_dim]`` buffer per block). The Xlite views below are strided views of the same memory;
# the probe proves the layout on this machine's kernel before anything is served.

_probed_layouts: set[tuple[str, torch.dtype, int, int, int]] = set()


def _xlite_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks, num_kv_heads, block_size, two_head_dim = kv_cache.shape
    head_dim = two_head_dim // 2
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
    keys = halves[:, :, 0].view(num_blocks, num_kv_heads, head_dim, block_size)
    values = halves[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_dim)
    return keys.permute(0, 3, 1, 2), values.permute(0, 2, 1, 3)


def _probe_layout(isa: str, dtype: torch.dtype, kv_heads: int, block: int, head_dim: int) -> None:
    """Write known keys/values with vLLM's own cache kernel and read them back through the views.

    Raises:
        RuntimeError: this machine's kernel (its ISA) stores blocks in another layout.
    """
    key = (isa, dtype, kv_heads, block, head_dim)
    if key in _probed_layouts:
        return
    cache = torch.zeros(2, kv_heads, block, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(2, kv_heads, block * 2, -1).chunk(2, dim=2)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(block, kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(block, kv_heads, head_dim, generator=generator).to(dtype)
    slots = torch.arange(block, 2 * block)  # every offset of block 1
    torch.ops._C.cpu_attn_reshape_and_cache(
        keys, values, key_cache, value_cache, slots, isa, 1.0, 1.0, "auto"
    )
    xlite_keys, xlite_values = _xlite_views(cache)
    if not (torch.equal(xlite_keys[1], keys) and torch.equal(xlite_values[1], values)):
        raise RuntimeError(
            f"xlite_graph_config on the CPU twin: vLLM's CPU attention kernel for ISA {isa!r} "
            f"({dtype}, block_size {block}, head_dim {head_dim}) stores KV blocks in a layout the "
            "Xlite stand-in does not read (it reads the 'vec' and 'vec16' layouts: keys "
            "[heads, head_dim, block], values [heads, block, head_dim]); use another dtype or "
            "block_size, or run without xlite_graph_config"
        )
    _probed_layouts.add(key)


def xlite_kv_caches(layers: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Xlite-layout ``(keys, values)`` views of the attention layers' caches, in model order.

    Raises:
        RuntimeError: a layer's cache is quantized or laid out differently (see the probe).
    """
    caches = []
    for layer in layers:
        kv_cache = layer.kv_cache
        if layer.kv_cache_dtype != "auto":
            raise RuntimeError(
                f"xlite_graph_config on the CPU twin: kv_cache_dtype {layer.kv_cache_dtype!r} is "
                "not supported; accepted: 'auto' (the model dtype)"
            )
        _, kv_heads, block, two_head_dim = kv_cache.shape
        _probe_layout(layer.isa, kv_cache.dtype, kv_heads, block, two_head_dim // 2)
        caches.append(_xlite_views(kv_cache))
    return caches


def xlite_step(metadata: CPUAttentionMetadata, positions: torch.Tensor) -> tuple[bool, Any]:
    """``(is_decode, attn_meta)``: whether the step is a pure decode batch, and Xlite's metadata.

    A decode batch has one new token per request (vLLM's uniform decode; padded requests have
    none). The metadata's requests are vLLM's, padded ones included: they have zero tokens.
    """
    from ascend_xlite_adapter import build_attn_meta, query_lens_from_start_loc

    meta = build_attn_meta(
        query_lens=query_lens_from_start_loc(metadata.query_start_loc),
        seq_lens=metadata.seq_lens,
        block_tables=metadata.block_table,
        positions=positions,
    )
    return metadata.max_query_len == 1, meta
