"""A pure-PyTorch executor of what the adapter builds, with Xlite's ``Model`` call signatures.

:class:`ReferenceExecutor` takes exactly what Xlite's native ``Model`` would get (an
:class:`~ascend_xlite_adapter.config.XliteModelConfig`, the weight slots, an
:class:`~ascend_xlite_adapter.attn_meta.XliteAttnMeta`, the per-layer paged KV caches and the
RoPE table) and computes the forward pass of a batch that mixes prefills, prefill chunks and
decodes. It exists so that the mapping can be checked token for token against transformers on
any machine: if the executor reproduces the model from the slots and the metadata alone, the
slots and the metadata carry everything the model needs.

KV-cache layout (vllm-ascend's, which Xlite reads): one ``(key_cache, value_cache)`` pair per
layer, each ``[num_blocks, block_size, n_kv_heads, head_dim]``. Token ``p`` of request ``r``
lives in block ``block_tables_cpu[r][p // block_size]`` at offset ``p % block_size``. The
caches may be strided views (any strides): the executor indexes them by (block, offset) and
writes through the view, so it can share a cache that another attention kernel lays out
differently in memory, as the CPU twin platform does with vLLM's CPU attention.

It is a reference, not a fast path: one rank only (no tensor, data or expert parallelism), and
the per-request loops and MoE routing synchronize with the host, so it is not graph-capturable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ascend_xlite_adapter.attn_meta import XliteAttnMeta
from ascend_xlite_adapter.config import AttnType, ScoringFuncType, XliteModelConfig
from ascend_xlite_adapter.errors import AttnMetaError, UnsupportedModelError
from ascend_xlite_adapter.rope import apply_rope, rope_cos_sin
from ascend_xlite_adapter.weights import LayerWeights, XliteWeights

__all__ = ["ReferenceExecutor", "allocate_kv_cache", "rms_norm"]

KVCache = Sequence[Sequence[torch.Tensor]]


def allocate_kv_cache(
    config: XliteModelConfig,
    num_blocks: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed ``(key, value)`` caches per layer, each
    ``[num_blocks, block_size, n_kv_heads, head_dim]``."""
    shape = (num_blocks, config.block_size, config.n_kv_heads, config.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(config.n_layers)
    ]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class ReferenceExecutor:
    """Runs a model from its Xlite config and weight slots; see the module docstring.

    Raises:
        UnsupportedModelError: the configuration needs something the reference does not do
            (another attention family, parallelism, sigmoid routing, shared experts, partial
            RoPE) or the slots disagree with it.
    """

    def __init__(self, config: XliteModelConfig, weights: XliteWeights) -> None:
        self.config = config
        self.weights = weights
        _check_supported(config, weights)

    # -- Xlite's Model entry points ---------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        input: torch.Tensor,
        attn_meta: XliteAttnMeta,
        kv_cache: KVCache,
        freqs_cis: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """``Model.forward``: final-normed hidden states of the step's tokens into ``output``.

        ``input`` holds token ids and may be longer than ``attn_meta.num_tokens`` (vLLM pads the
        batch); rows of ``output`` past the real tokens are left untouched. New keys and values
        are written into ``kv_cache`` at the slots the block tables give. Parameter names
        follow the Xlite stub (``rt`` and ``curr_stream`` have no meaning here).
        """
        n = attn_meta.num_tokens
        if input.dim() != 1 or input.shape[0] < n:
            raise AttnMetaError(f"input: expected [>= {n}] token ids, got {tuple(input.shape)}")
        hidden = F.embedding(input[:n], self.weights.embed)
        self._run(hidden, attn_meta, kv_cache, freqs_cis, output, ())

    @torch.no_grad()
    def forward_with_inputs_embeds(
        self,
        input: torch.Tensor,
        attn_meta: XliteAttnMeta,
        kv_cache: KVCache,
        freqs_cis: torch.Tensor,
        output: torch.Tensor,
        deepstack_input: Sequence[torch.Tensor] = (),
    ) -> None:
        """``Model.forward_with_inputs_embeds``: start from embeddings (multimodal inputs).

        ``deepstack_input[i]`` (``[>= num_tokens, hidden]``, zero at text tokens) is added to
        the hidden states after layer ``i``, as Qwen3-VL's deepstack does.
        """
        n = attn_meta.num_tokens
        if input.dim() != 2 or input.shape[0] < n:
            raise AttnMetaError(f"input: expected [>= {n}, hidden] embeddings, got {input.shape}")
        if len(deepstack_input) > self.config.n_layers:
            raise AttnMetaError(
                f"deepstack_input has {len(deepstack_input)} levels for "
                f"{self.config.n_layers} layers"
            )
        self._run(input[:n], attn_meta, kv_cache, freqs_cis, output, deepstack_input)

    @torch.no_grad()
    def forward_get_logits(
        self, input: torch.Tensor, indices: torch.Tensor, output: torch.Tensor
    ) -> None:
        """``Model.forward_get_logits``: LM-head logits of the rows ``indices`` of ``input``
        (hidden states from :meth:`forward`).

        The head may be padded past ``vocab_size`` (vLLM pads the vocabulary); only the first
        ``vocab_size`` logits are written.
        """
        logits = F.linear(input.index_select(0, indices.long()), self.weights.head)
        output[: len(indices)].copy_(logits[:, : self.config.vocab_size])

    @torch.no_grad()
    def forward_and_get_logits(
        self,
        input: torch.Tensor,
        attn_meta: XliteAttnMeta,
        kv_cache: KVCache,
        freqs_cis: torch.Tensor,
        indices: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """``Model.forward_and_get_logits``: :meth:`forward`, then logits of rows ``indices``."""
        hidden = torch.empty(
            attn_meta.num_tokens,
            self.config.hidden_size,
            dtype=self.weights.embed.dtype,
            device=self.weights.embed.device,
        )
        self.forward(input, attn_meta, kv_cache, freqs_cis, hidden)
        self.forward_get_logits(hidden, indices, output)

    # -- the computation --------------------------------------------------------------------

    def _run(
        self,
        hidden: torch.Tensor,
        meta: XliteAttnMeta,
        kv_cache: KVCache,
        freqs_cis: torch.Tensor,
        output: torch.Tensor,
        deepstack: Sequence[torch.Tensor],
    ) -> None:
        cfg = self.config
        n = meta.num_tokens
        if output.dim() != 2 or output.shape[0] < n or output.shape[1] != cfg.hidden_size:
            raise AttnMetaError(
                f"output: expected [>= {n}, {cfg.hidden_size}], got {tuple(output.shape)}"
            )
        self._check_kv_cache(kv_cache)
        block_ids, slot_blocks, slot_offsets = self._slots(meta, kv_cache[0][0].shape[0])
        positions = meta.positions[..., :n]
        cos, sin = rope_cos_sin(freqs_cis, positions, cfg)
        for i, layer in enumerate(self.weights.layers):
            k_cache, v_cache = kv_cache[i][0], kv_cache[i][1]
            attn = self._attention(
                layer,
                hidden,
                cos,
                sin,
                meta,
                k_cache,
                v_cache,
                block_ids,
                slot_blocks,
                slot_offsets,
            )
            hidden = hidden + F.linear(attn, layer.attn_out)
            x = rms_norm(hidden, layer.mlp_norm, cfg.norm_eps)
            hidden = hidden + (self._moe(layer, x) if layer.is_moe else self._mlp(layer, x))
            if i < len(deepstack):
                hidden = hidden + deepstack[i][:n].to(hidden.dtype)
        output[:n].copy_(rms_norm(hidden, self.weights.norm, cfg.norm_eps))

    def _attention(
        self,
        layer: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: XliteAttnMeta,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_ids: list[torch.Tensor],
        slot_blocks: torch.Tensor,
        slot_offsets: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        n, nh, nkv, hd = hidden.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = rms_norm(hidden, layer.attn_norm, cfg.norm_eps)
        q, k, v = layer.mha_qkv.linear(x)
        if layer.mha_qkv_bias is not None:
            qb, kb, vb = layer.mha_qkv_bias.parts
            q, k, v = q + qb, k + kb, v + vb
        q, k, v = q.view(n, nh, hd), k.view(n, nkv, hd), v.view(n, nkv, hd)
        if layer.mha_q_norm is not None and layer.mha_k_norm is not None:
            q = rms_norm(q, layer.mha_q_norm, cfg.norm_eps)
            k = rms_norm(k, layer.mha_k_norm, cfg.norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Write this step's keys/values into their cache slots first: a prefill chunk's queries
        # attend to its own keys through the cache, like every earlier token's.
        # (block, offset) indexing writes through strided views as well as contiguous caches.
        k_cache[slot_blocks, slot_offsets] = k.to(k_cache.dtype)
        v_cache[slot_blocks, slot_offsets] = v.to(v_cache.dtype)

        out = torch.empty(n, nh * hd, dtype=hidden.dtype, device=hidden.device)
        bs = cfg.block_size
        start = 0
        for r, (q_len, cached) in enumerate(zip(meta.lens, meta.cached_lens, strict=True)):
            if q_len == 0:
                continue
            total = cached + q_len
            # Every cached and new token of the request, in position order.
            pos = torch.arange(total, device=hidden.device)
            blocks, offsets = block_ids[r][pos // bs], pos % bs
            keys = k_cache[blocks, offsets].to(q.dtype)
            values = v_cache[blocks, offsets].to(q.dtype)
            if nh != nkv:
                keys = keys.repeat_interleave(nh // nkv, dim=1)
                values = values.repeat_interleave(nh // nkv, dim=1)
            # Query j sits at position cached + j and sees keys 0 ..= cached + j.
            mask = pos[None, :] <= (cached + torch.arange(q_len, device=hidden.device))[:, None]
            o = F.scaled_dot_product_attention(
                q[start : start + q_len].transpose(0, 1),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=mask,
                scale=cfg.softmax_scale,
            )
            out[start : start + q_len] = o.transpose(0, 1).reshape(q_len, nh * hd)
            start += q_len
        return out

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        assert layer.mlp_up_gate is not None
        assert layer.mlp_down is not None
        gate, up = layer.mlp_up_gate.linear(x)
        return F.linear(F.silu(gate) * up, layer.mlp_down)

    def _moe(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        assert layer.gate is not None
        # Softmax over all experts in float32, then top-k, then (optionally) renormalize the
        # k weights to sum to one: Qwen3-MoE's router.
        probs = F.softmax(F.linear(x, layer.gate), dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, cfg.n_act_experts, dim=-1)
        if cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(x.dtype)
        out = torch.zeros_like(x)
        for e in torch.unique(top_i).tolist():
            tokens, which = torch.where(top_i == e)
            gate, up = layer.re_up_gate[e].linear(x[tokens])
            act = F.silu(gate) * up
            down = layer.re_down[e]
            y = act @ down if cfg.experts_weight_transpose else F.linear(act, down)
            out.index_add_(0, tokens, y * top_w[tokens, which, None])
        return out

    # -- metadata checks --------------------------------------------------------------------

    def _check_kv_cache(self, kv_cache: KVCache) -> None:
        cfg = self.config
        if len(kv_cache) != cfg.n_layers:
            raise AttnMetaError(
                f"kv_cache has {len(kv_cache)} layers; the model has {cfg.n_layers}"
            )
        for i, pair in enumerate(kv_cache):
            if len(pair) != 2:
                raise AttnMetaError(f"kv_cache[{i}]: expected (key_cache, value_cache)")
            for t in pair:
                if t.dim() != 4 or tuple(t.shape[1:]) != (
                    cfg.block_size,
                    cfg.n_kv_heads,
                    cfg.head_dim,
                ):
                    raise AttnMetaError(
                        f"kv_cache[{i}]: expected [num_blocks, {cfg.block_size}, "
                        f"{cfg.n_kv_heads}, {cfg.head_dim}], got {tuple(t.shape)}"
                    )

    def _slots(
        self, meta: XliteAttnMeta, num_blocks: int
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Each request's block ids, and the (block, offset) cache slot of every new token."""
        bs = self.config.block_size
        device = self.weights.embed.device
        block_ids: list[torch.Tensor] = []
        slots: list[int] = []
        for r, (q_len, cached) in enumerate(zip(meta.lens, meta.cached_lens, strict=True)):
            total = cached + q_len
            needed = math.ceil(total / bs)
            if r >= len(meta.block_tables_cpu):
                raise AttnMetaError(f"request {r} has no block-table row")
            row = meta.block_tables_cpu[r][:needed]
            if len(row) < needed:
                raise AttnMetaError(
                    f"request {r}: {total} tokens need {needed} blocks of {bs}; its block table "
                    f"has {len(row)}"
                )
            if any(not 0 <= b < num_blocks for b in row):
                raise AttnMetaError(
                    f"request {r}: block ids {list(row)} outside the cache's {num_blocks} blocks"
                )
            block_ids.append(torch.tensor(row, dtype=torch.long, device=device))
            slots.extend(row[p // bs] * bs + p % bs for p in range(cached, total))
        if len(set(slots)) != len(slots):
            raise AttnMetaError("two tokens of this step map to the same KV-cache slot")
        flat = torch.tensor(slots, dtype=torch.long, device=device)
        return block_ids, flat // bs, flat % bs


def _check_supported(config: XliteModelConfig, weights: XliteWeights) -> None:
    def refuse(field: str, value: object, accepted: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"ReferenceExecutor: {field} = {value!r}; the reference accepts {accepted}"
        )

    if config.attn_type is not AttnType.AttnMHA:
        raise refuse("attn_type", config.attn_type, "AttnMHA")
    for field in ("def_tp_size", "def_dp_size", "moe_tp_size", "moe_ep_size"):
        if getattr(config, field) != 1:
            raise refuse(field, getattr(config, field), "1 (it runs one rank)")
    if config.rope_head_dim != config.head_dim:
        raise refuse("rope_head_dim", config.rope_head_dim, f"head_dim = {config.head_dim}")
    if config.n_heads % config.n_kv_heads:
        raise refuse("n_heads", config.n_heads, f"a multiple of n_kv_heads = {config.n_kv_heads}")
    if config.is_moe:
        if config.scoring_func is not ScoringFuncType.ScoringFuncSoftmax:
            raise refuse("scoring_func", config.scoring_func, "ScoringFuncSoftmax")
        if config.n_shared_experts:
            raise refuse("n_shared_experts", config.n_shared_experts, "0")
    if len(weights.layers) != config.n_layers:
        raise refuse("n_layers", config.n_layers, f"{len(weights.layers)} (the weight slots)")
    for i, layer in enumerate(weights.layers):
        moe_expected = config.is_moe and i >= config.n_dense_layers
        if layer.is_moe != moe_expected:
            raise refuse(
                f"layers[{i}]", "MoE" if layer.is_moe else "dense", "n_dense_layers dense layers"
            )
        if (layer.mha_qkv_bias is not None) != config.qkv_bias:
            raise refuse("qkv_bias", config.qkv_bias, f"the slots of layers[{i}]")
        if (layer.mha_q_norm is not None) != config.qk_norm:
            raise refuse("qk_norm", config.qk_norm, f"the slots of layers[{i}]")
        if layer.is_moe and len(layer.re_up_gate) != config.n_routed_experts:
            raise refuse(
                "n_routed_experts", config.n_routed_experts, f"{len(layer.re_up_gate)} experts"
            )
