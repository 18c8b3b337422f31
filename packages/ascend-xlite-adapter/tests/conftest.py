"""Tiny random-weight transformers models built from local configs, vLLM-layout twins of them,
and a scheduler that drives the reference executor over a paged KV cache.

Nothing is downloaded. Models are float32 with ``initializer_range=0.2``: transformers' default
(0.02) gives near-constant logits, which would hide a wrong attention span or a stale cache.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import transformers
from ascend_xlite_adapter import (
    AdaptedModel,
    ReferenceExecutor,
    allocate_kv_cache,
    build_attn_meta,
    precompute_freqs_cis,
)
from torch import nn

VOCAB = 128
HIDDEN = 64
HEAD_DIM = 16
MAX_POS = 64

_COMMON: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": HEAD_DIM,
    "intermediate_size": 96,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POS,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-6,
}

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_vl")


def tiny_model(family: str, **overrides: Any) -> nn.Module:
    """A tiny HF model of ``family`` (see :data:`FAMILIES`), float32, eval mode, seeded."""
    kw = {**_COMMON, **overrides}
    if family == "llama":
        config: Any = transformers.LlamaConfig(**kw)
        cls: Any = transformers.LlamaForCausalLM
    elif family == "qwen2":
        kw.pop("head_dim")  # Qwen2 derives it: hidden / heads = 16
        config, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        config, cls = transformers.Qwen3Config(**kw), transformers.Qwen3ForCausalLM
    elif family == "qwen3_moe":
        moe = {
            "num_hidden_layers": 3,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "norm_topk_prob": True,
        }
        config = transformers.Qwen3MoeConfig(**{**kw, **moe, **overrides})
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "qwen3_vl":
        if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
            pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
        text = {
            **kw,
            # Three mRoPE sections summing to head_dim / 2 = 8 (the real model: 24, 20, 20).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e5,
                "mrope_section": [2, 3, 3],
            },
        }
        vision = {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": HIDDEN,
            "deepstack_visual_indexes": [0],
        }
        config = transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision, initializer_range=0.2
        )
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model: nn.Module = cls(config).eval().float()
    # transformers initializes norm weights to one and biases to zero, which would hide a
    # dropped bias or two norms swapped between slots: make every vector parameter random.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def hf_logits(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' logits for a whole sequence, recomputed from scratch (no cache)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    logits: torch.Tensor = out.logits[0]
    return logits


# -- vLLM-layout twins ------------------------------------------------------------------------


class _Holder(nn.Module):
    """A module holding named parameters (and plain attributes), like vLLM's layers do."""

    def __init__(self, **tensors: torch.Tensor | None) -> None:
        super().__init__()
        for name, t in tensors.items():
            if t is None:
                self.register_parameter(name, None)
            else:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))


def _cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
    present = [t for t in ts if t is not None]
    return torch.cat([t.detach() for t in present]) if present else None


def vllm_layout(
    hf: nn.Module, *, expert_layout: str = "w13", transposed: bool = False
) -> nn.Module:
    """A module tree with vLLM's names and fused tensors, holding ``hf``'s weights.

    vLLM's loader fuses q/k/v and gate/up while loading a checkpoint; here the fused tensors are
    built once from the HF model (a copy, like a load). The adapter must then take views of
    them. ``expert_layout``: ``"w13"`` (vLLM FusedMoE) or ``"modules"`` (transformers < 5: one
    MLP module per expert); ``transposed`` stores the fused experts ``[E, in, out]`` as
    vllm-ascend does after loading.
    """
    vl = hasattr(hf.model, "language_model")
    src = hf.model.language_model if vl else hf.model
    decoder = nn.Module()
    decoder.embed_tokens = _Holder(weight=src.embed_tokens.weight.detach().clone())
    decoder.norm = _Holder(weight=src.norm.weight.detach().clone())
    layers = nn.ModuleList()
    for layer in src.layers:
        a = layer.self_attn
        new = nn.Module()
        new.input_layernorm = _Holder(weight=layer.input_layernorm.weight.detach().clone())
        new.post_attention_layernorm = _Holder(
            weight=layer.post_attention_layernorm.weight.detach().clone()
        )
        attn = nn.Module()
        attn.qkv_proj = _Holder(
            weight=_cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
            bias=_cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
        )
        attn.o_proj = _Holder(weight=a.o_proj.weight.detach().clone())
        if hasattr(a, "q_norm"):
            attn.q_norm = _Holder(weight=a.q_norm.weight.detach().clone())
            attn.k_norm = _Holder(weight=a.k_norm.weight.detach().clone())
        new.self_attn = attn
        mlp = nn.Module()
        if hasattr(layer.mlp, "experts"):
            ex = layer.mlp.experts
            mlp.gate = _Holder(weight=layer.mlp.gate.weight.detach().clone())
            if expert_layout == "w13":
                w13, w2 = ex.gate_up_proj.detach(), ex.down_proj.detach()
                if transposed:
                    w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
                experts = _Holder(
                    w13_weight=w13.contiguous().clone(), w2_weight=w2.contiguous().clone()
                )
                experts.local_num_experts = w13.shape[0]
            else:
                experts = nn.ModuleList()
                inter = ex.down_proj.shape[-1]
                for e in range(ex.gate_up_proj.shape[0]):
                    one = nn.Module()
                    one.gate_proj = _Holder(weight=ex.gate_up_proj[e, :inter].detach().clone())
                    one.up_proj = _Holder(weight=ex.gate_up_proj[e, inter:].detach().clone())
                    one.down_proj = _Holder(weight=ex.down_proj[e].detach().clone())
                    experts.append(one)
            mlp.experts = experts
        else:
            mlp.gate_up_proj = _Holder(
                weight=_cat(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
            )
            mlp.down_proj = _Holder(weight=layer.mlp.down_proj.weight.detach().clone())
        new.mlp = mlp
        layers.append(new)
    decoder.layers = layers
    lm = nn.Module()
    lm.model = decoder
    lm.lm_head = _Holder(weight=hf.lm_head.weight.detach().clone())
    if not vl:
        return lm
    root = nn.Module()
    root.language_model = lm
    return root


# -- a tiny scheduler over a paged cache --------------------------------------------------------


@dataclass
class Request:
    """A request with its whole token sequence known up front (teacher forcing)."""

    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    cached: int = 0


# Steps of (request, new tokens). Step 0 mixes two full prefills with the first chunk of a
# chunked prefill; step 1 puts decodes before a prefill chunk; request 3 arrives in step 2
# while the others decode; the last steps are pure decodes with a shrinking batch.
SCHEDULE: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 7), (1, 6), (2, 3)),
    ((2, 1), (0, 1), (1, 4)),
    ((0, 1), (1, 1), (2, 1), (3, 5)),
    ((3, 1), (0, 1), (1, 1), (2, 1)),
    ((0, 1), (1, 1), (2, 1), (3, 1)),
    ((2, 1), (3, 1)),
)
BLOCK_SIZE = 4
NUM_BLOCKS = 32


def make_requests(seed: int = 0) -> list[Request]:
    """Token sequences for :data:`SCHEDULE` and non-contiguous, shuffled KV blocks."""
    rng = random.Random(seed)
    totals = [0] * 4
    for step in SCHEDULE:
        for r, n in step:
            totals[r] += n
    pool = list(range(1, NUM_BLOCKS))  # block 0 stays unused: a wrong slot lands in zeros
    rng.shuffle(pool)
    requests = []
    for total in totals:
        need = math.ceil(total / BLOCK_SIZE)
        blocks, pool = pool[:need], pool[need:]
        requests.append(Request(tokens=[rng.randrange(VOCAB) for _ in range(total)], blocks=blocks))
    return requests


@dataclass
class StepResult:
    """Executor logits of one step, with the request and position of each row."""

    logits: torch.Tensor
    rows: list[tuple[int, int]]


def run_schedule(
    adapted: AdaptedModel,
    requests: list[Request],
    *,
    pad_tokens: int = 3,
    mrope: bool = False,
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[list[StepResult], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run :data:`SCHEDULE` through the reference executor; returns logits and the KV cache.

    Each step pads the batch with ``pad_tokens`` extra tokens and one empty request (vLLM's
    graph padding), which must change nothing. ``kv``: the caches to use (default: fresh
    contiguous ones).
    """
    cfg = adapted.config
    executor = ReferenceExecutor(cfg, adapted.weights)
    if kv is None:
        kv = allocate_kv_cache(cfg, NUM_BLOCKS)
    freqs = precompute_freqs_cis(cfg)
    results = []
    for step in SCHEDULE:
        ids, pos, qlens, seqlens, rows = [], [], [], [], []
        for r, n in step:
            req = requests[r]
            ids += req.tokens[req.cached : req.cached + n]
            pos += list(range(req.cached, req.cached + n))
            rows += [(r, p) for p in range(req.cached, req.cached + n)]
            qlens.append(n)
            seqlens.append(req.cached + n)
        width = max(len(requests[r].blocks) for r, _ in step)
        table = torch.zeros(len(step) + 1, width, dtype=torch.int32)
        for i, (r, _) in enumerate(step):
            table[i, : len(requests[r].blocks)] = torch.tensor(requests[r].blocks)
        positions = torch.tensor(pos + [0] * pad_tokens)
        if mrope:
            positions = positions.expand(3, -1)
        meta = build_attn_meta(
            query_lens=torch.tensor(qlens),
            seq_lens=torch.tensor([*seqlens, 0]),
            block_tables=table,
            positions=positions,
        )
        n_tok = len(ids)
        input_ids = torch.tensor(ids + [0] * pad_tokens)
        hidden = torch.full((n_tok + pad_tokens, cfg.hidden_size), float("nan"))
        executor.forward(input_ids, meta, kv, freqs, hidden)
        assert torch.isnan(hidden[n_tok:]).all(), "padding rows must be left untouched"
        logits = torch.empty(n_tok, cfg.vocab_size)
        executor.forward_get_logits(hidden, torch.arange(n_tok), logits)
        results.append(StepResult(logits=logits, rows=rows))
        for r, n in step:
            requests[r].cached += n
    return results, kv


def max_error_vs_hf(model: nn.Module, results: list[StepResult], requests: list[Request]) -> float:
    """Largest |executor - transformers| over every logit of every step."""
    expected = [hf_logits(model, req.tokens) for req in requests]
    worst = 0.0
    for step in results:
        want = torch.stack([expected[r][p] for r, p in step.rows])
        worst = max(worst, (step.logits - want).abs().max().item())
    return worst
