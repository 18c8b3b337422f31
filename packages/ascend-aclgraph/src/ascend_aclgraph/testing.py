"""A Qwen3-shaped decoder with a real KV cache, for tests, benchmarks and the demo.

Written the way Hugging Face transformers writes Qwen3 (float32 up-cast RMSNorm, q/k norms,
rotate_half RoPE, SiLU-gated MLP, residual adds) so that fusion passes meet the same patterns
as in real models. Weights are random; nothing is downloaded.

``forward(tokens, positions)`` is one decode step: request ``b`` of the batch owns row ``b`` of
the KV cache, writes its new key/value at ``positions[b]`` and attends to positions
``<= positions[b]``. ``forward(tokens, positions, seq_ids)`` takes a flat batch of tokens that
mixes requests, as vLLM's flattened batches do: token ``t`` belongs to the request owning KV row
``seq_ids[t]``, writes there at ``positions[t]`` and attends causally to positions
``<= positions[t]`` of that row. So one batch can hold several prefill chunks and single-token
decodes side by side. Everything is device-side tensor work with no host sync, so the step can
be captured as one graph.

Padding, as vLLM does it: a negative position means "no token here". Such a token writes its
K/V to a padding sink (one slot past ``max_seq`` in every cache row, never read) instead of a real
slot, the way vLLM's kernels skip slot -1, so padded rows of a graph never overwrite a request's
cache. Pad batched inputs with :attr:`Qwen3Decoder.PAD_VALUES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Qwen3Config", "Qwen3Decoder", "rotate_half"]


@dataclass(frozen=True)
class Qwen3Config:
    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    # None: the step takes and returns hidden states (no embedding, no LM head).
    vocab_size: int | None = None
    max_batch: int = 32
    max_seq: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @classmethod
    def qwen3_0_6b(cls, **overrides: object) -> Qwen3Config:
        """Qwen3-0.6B's decoder shape (hidden 1024, 28 layers, 16/8 heads, head dim 128)."""
        return replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def small(cls, **overrides: object) -> Qwen3Config:
        """hidden 64, 2 layers, 4/2 heads, head dim 32, MLP 128: fast enough for every test."""
        base = cls(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=128,
            max_batch=16,
            max_seq=64,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


class Qwen3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Qwen3Attention(nn.Module):
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = Qwen3RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(d, cfg.rms_norm_eps)
        # One slot past max_seq per row is the padding sink (module docstring).
        cache_shape = (cfg.max_batch, cfg.num_kv_heads, cfg.max_seq + 1, d)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(b, cfg.num_heads, cfg.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, cfg.num_kv_heads, cfg.head_dim))
        v = self.v_proj(x).view(b, cfg.num_kv_heads, cfg.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rows = torch.arange(b, device=x.device) if seq_ids is None else seq_ids
        # Padding tokens (negative positions) write the sink slot, never a real one.
        slots = torch.where(positions >= 0, positions, cfg.max_seq)
        # Every token's K/V lands in the cache before attention, so tokens of one request in
        # this batch see each other; the mask below keeps it causal.
        self.k_cache[rows, :, slots] = k
        self.v_cache[rows, :, slots] = v
        if seq_ids is None:
            keys = self.k_cache[:b, :, : cfg.max_seq]
            values = self.v_cache[:b, :, : cfg.max_seq]
        else:
            # Gather each token's own row: [tokens, kv_heads, max_seq, head_dim].
            keys = self.k_cache[seq_ids, :, : cfg.max_seq]
            values = self.v_cache[seq_ids, :, : cfg.max_seq]
        # A padding token attends to slot 0 only, so that its softmax stays finite.
        visible = (
            torch.arange(cfg.max_seq, device=x.device)[None, :] <= positions.clamp(min=0)[:, None]
        )
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=visible[:, None, None, :], enable_gqa=True
        )
        return cast(torch.Tensor, self.o_proj(out.reshape(b, cfg.num_heads * cfg.head_dim)))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden
        hidden = self.input_layernorm(hidden)
        hidden = self.self_attn(hidden, positions, cos, sin, seq_ids)
        hidden = residual + hidden
        residual = hidden
        hidden = self.post_attention_layernorm(hidden)
        hidden = self.mlp(hidden)
        return residual + hidden


class Qwen3Decoder(nn.Module):
    """A decode step of a Qwen3-shaped model over a per-row KV cache (module docstring)."""

    inv_freq: torch.Tensor

    #: Pad values of the step's batched inputs (pass as ``capture(..., pad_value=...)``): padded
    #: positions are -1, so padded tokens write the padding sink; padded seq_ids use the last
    #: cache row, whose sink slot they write.
    PAD_VALUES: ClassVar[Mapping[str, int]] = MappingProxyType(
        {"tokens": 0, "positions": -1, "seq_ids": -1}
    )

    def __init__(self, cfg: Qwen3Config, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.embed_tokens = (
                nn.Embedding(cfg.vocab_size, cfg.hidden_size) if cfg.vocab_size else None
            )
            self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_layers))
            self.norm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = (
                nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if cfg.vocab_size else None
            )
            for p in self.parameters():
                # Small random weights keep activations in range across many layers.
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.normal_(p, 1.0, 0.05)
        finally:
            torch.random.set_rng_state(generator_state)
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.requires_grad_(False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step over a flat batch of ``T`` tokens.

        ``tokens``: [T] ids (with a vocab) or [T, hidden]; ``positions``: [T] int64;
        ``seq_ids``: [T] int64 KV-cache rows, or ``None`` for one token per request with
        request ``t`` on row ``t`` (the plain decode step).
        """
        hidden: torch.Tensor = (
            self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        )
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()[:, None, :].to(hidden.dtype)
        sin = emb.sin()[:, None, :].to(hidden.dtype)
        for layer in self.decoder_layers():
            hidden = layer(hidden, positions, cos, sin, seq_ids)
        hidden = self.norm(hidden)
        return cast(torch.Tensor, self.lm_head(hidden)) if self.lm_head is not None else hidden

    def decoder_layers(self) -> list[Qwen3DecoderLayer]:
        return [cast(Qwen3DecoderLayer, layer) for layer in self.layers]

    def reset_cache(self) -> None:
        for layer in self.decoder_layers():
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    def cache_state(self) -> list[torch.Tensor]:
        """Clones of every KV cache's real slots (to compare eager and graph runs).

        The padding sink is left out: it is scratch that only padding writes, never read.
        """
        return [cache[:, :, : self.cfg.max_seq].clone() for cache in self._caches()]

    def load_cache_state(self, state: list[torch.Tensor]) -> None:
        for dst, src in zip(self._caches(), state, strict=True):
            dst[:, :, : self.cfg.max_seq].copy_(src)

    def _caches(self) -> list[torch.Tensor]:
        caches = []
        for layer in self.decoder_layers():
            caches += [layer.self_attn.k_cache, layer.self_attn.v_cache]
        return caches
