"""The reference executor reproduces transformers from the adapter's output alone.

Every model runs :data:`conftest.SCHEDULE` (prefills, a chunked prefill, decodes and a late
arrival mixed in one batch, over a paged cache with shuffled blocks of 4 tokens, padded like a
vLLM graph batch) and every logit of every step is compared with transformers recomputing the
request's whole sequence from scratch.

Tolerance: ATOL = 1e-4 (absolute, float32) on logits of magnitude up to ~7. Measured maxima on
a 2-core CPU (torch 2.13, transformers 5.19): Llama 7.3e-6, Qwen2 5.3e-6, Qwen3 5.1e-6,
Qwen3-MoE 4.4e-6 to 6.3e-6 (all expert layouts), Qwen3-VL text 1.0e-5; the vLLM-layout twins
match their transformers model to the last bit. The smallest gap between the 2nd and 3rd
router probabilities in the MoE runs is 1e-3, so no top-k choice is a float32 coin toss. The
sensitivity tests below show that real mistakes move logits by 1e-2 or more.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import ascend_xlite_adapter as xa
import pytest
import torch
from conftest import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    hf_logits,
    make_requests,
    max_error_vs_hf,
    run_schedule,
    tiny_model,
    vllm_layout,
)

ATOL = 1e-4
SETTINGS = xa.AdapterSettings(block_size=BLOCK_SIZE, max_batch_size=8)

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (family, model overrides, vllm_layout kwargs or {"hf": True} for the transformers model)
    ("llama", {}, {"hf": True}),
    ("llama", {}, {}),
    ("qwen2", {}, {"hf": True}),
    ("qwen2", {}, {}),
    ("qwen3", {}, {"hf": True}),
    ("qwen3", {}, {}),
    ("qwen3_moe", {}, {"hf": True}),
    ("qwen3_moe", {}, {}),
    ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [0]}, {"hf": True}),
    ("qwen3_moe", {}, {"expert_layout": "modules"}),
    ("qwen3_moe", {}, {"transposed": True}),
    ("qwen3_vl", {}, {"hf": True}),
    ("qwen3_vl", {}, {}),
]


def _adapt(family: str, overrides: dict[str, Any], layout: dict[str, Any]) -> Any:
    model = tiny_model(family, **overrides)
    if layout.get("hf"):
        return model, xa.adapt_model(model, model.config, SETTINGS)
    settings = replace(SETTINGS, experts_weight_transpose=layout.get("transposed", False))
    twin = vllm_layout(model, **layout)
    return model, xa.adapt_model(twin, model.config, settings, architecture=type(model).__name__)


@pytest.mark.parametrize(
    ("family", "overrides", "layout"),
    CASES,
    ids=[f"{f}-{'hf' if lay.get('hf') else 'vllm'}-{i}" for i, (f, _, lay) in enumerate(CASES)],
)
def test_logits_equal_transformers_over_a_mixed_paged_schedule(
    family: str, overrides: dict[str, Any], layout: dict[str, Any]
) -> None:
    model, adapted = _adapt(family, overrides, layout)
    requests = make_requests()
    results, kv = run_schedule(adapted, requests, mrope=family == "qwen3_vl")
    error = max_error_vs_hf(model, results, make_requests())
    assert error < ATOL, f"max |logit error| {error:.3g} >= {ATOL}"
    # Block 0 belongs to no request: nothing may have been written there.
    for k_cache, v_cache in kv:
        assert not k_cache[0].any()
        assert not v_cache[0].any()


def test_kv_cache_holds_transformers_keys_and_values() -> None:
    model = tiny_model("qwen3")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    requests = make_requests()
    _, kv = run_schedule(adapted, requests)
    for req in requests:
        with torch.no_grad():
            cache = model(input_ids=torch.tensor([req.tokens]), use_cache=True).past_key_values
        pos = torch.arange(len(req.tokens))
        slots = torch.tensor(req.blocks)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        for layer, (k_cache, v_cache) in enumerate(kv):
            want_k = cache.layers[layer].keys[0].transpose(0, 1)  # [tokens, kv heads, head_dim]
            want_v = cache.layers[layer].values[0].transpose(0, 1)
            got_k = k_cache.view(-1, *k_cache.shape[2:])[slots]
            got_v = v_cache.view(-1, *v_cache.shape[2:])[slots]
            torch.testing.assert_close(got_k, want_k, atol=ATOL, rtol=0)
            torch.testing.assert_close(got_v, want_v, atol=ATOL, rtol=0)


def test_strided_cache_views_give_the_same_logits_and_write_through() -> None:
    # vLLM's CPU attention keeps each block's keys as [kv heads, head_dim, block] and values as
    # [kv heads, block, head_dim]; the CPU twin hands Xlite permuted views of those buffers.
    model = tiny_model("qwen3")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    cfg = adapted.config
    nb, bs, nkv, hd = NUM_BLOCKS, cfg.block_size, cfg.n_kv_heads, cfg.head_dim
    buffers = [
        (torch.zeros(nb, nkv, hd, bs), torch.zeros(nb, nkv, bs, hd)) for _ in range(cfg.n_layers)
    ]
    views = [(k.permute(0, 3, 1, 2), v.permute(0, 2, 1, 3)) for k, v in buffers]
    assert not views[0][0].is_contiguous()
    strided, kv_strided = run_schedule(adapted, make_requests(), kv=views)
    dense, kv_dense = run_schedule(adapted, make_requests())
    for got, want in zip(strided, dense, strict=True):
        assert torch.equal(got.logits, want.logits)
    for (k_buf, v_buf), (k_want, v_want) in zip(buffers, kv_dense, strict=True):
        assert k_buf.any(), "the writes must land in the underlying buffers"
        assert torch.equal(k_buf.permute(0, 3, 1, 2), k_want)
        assert torch.equal(v_buf.permute(0, 2, 1, 3), v_want)
    assert kv_strided[0][0].data_ptr() == buffers[0][0].data_ptr()


def test_forward_and_get_logits_with_indices() -> None:
    # One step, logits for each request's last token only (vLLM's logits_indices).
    model = tiny_model("qwen2")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    executor = xa.ReferenceExecutor(adapted.config, adapted.weights)
    kv = xa.allocate_kv_cache(adapted.config, NUM_BLOCKS)
    seqs = [[5, 9, 2, 7, 1], [3, 3, 8]]
    meta = xa.build_attn_meta(
        query_lens=[5, 3],
        seq_lens=[5, 3],
        block_tables=[[4, 2], [7]],
        positions=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
    )
    out = torch.empty(2, adapted.config.vocab_size)
    ids = torch.tensor(seqs[0] + seqs[1])
    freqs = xa.precompute_freqs_cis(adapted.config)
    executor.forward_and_get_logits(ids, meta, kv, freqs, torch.tensor([4, 7]), out)
    want = torch.stack([hf_logits(model, s)[-1] for s in seqs])
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)


def test_qwen3_vl_mrope_and_deepstack_equal_the_text_model() -> None:
    # Distinct t/h/w positions (as for image tokens) and deepstack features added after layer 0
    # at "visual" tokens: the executor's inputs-embeds path against transformers' text decoder.
    model = tiny_model("qwen3_vl")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    cfg = adapted.config
    executor = xa.ReferenceExecutor(cfg, adapted.weights)
    text = model.model.language_model
    n = 9
    gen = torch.Generator().manual_seed(3)
    embeds = torch.randn(n, cfg.hidden_size, generator=gen)
    positions = torch.stack([torch.arange(n), torch.arange(n) % 3 + 2, torch.arange(n) // 3 + 1])
    visual = torch.zeros(n, dtype=torch.bool)
    visual[2:6] = True
    features = torch.randn(int(visual.sum()), cfg.hidden_size, generator=gen)
    deepstack = torch.zeros(n, cfg.hidden_size)
    deepstack[visual] = features
    meta = xa.build_attn_meta(
        query_lens=[n], seq_lens=[n], block_tables=[[5, 1, 9]], positions=positions
    )
    out = torch.empty(n, cfg.hidden_size)
    kv = xa.allocate_kv_cache(cfg, NUM_BLOCKS)
    freqs = xa.precompute_freqs_cis(cfg)
    executor.forward_with_inputs_embeds(embeds, meta, kv, freqs, out, [deepstack])
    with torch.no_grad():
        want = text(
            inputs_embeds=embeds[None],
            position_ids=positions[:, None, :],
            visual_pos_masks=visual[None],
            deepstack_visual_embeds=[features],
            use_cache=False,
        ).last_hidden_state[0]
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    # Without the deepstack features the visual rows differ: the feature path is exercised.
    executor.forward_with_inputs_embeds(embeds, meta, xa.allocate_kv_cache(cfg, 32), freqs, out)
    assert (out - want).abs().max() > 1e-2


# -- the comparison can fail ------------------------------------------------------------------


def _worst(adapted: xa.AdaptedModel, model: Any, **kw: Any) -> float:
    return max_error_vs_hf(model, run_schedule(adapted, make_requests(), **kw)[0], make_requests())


@pytest.mark.parametrize(
    "change",
    [
        {"rope_theta": 20000.0},
        {"norm_eps": 1e-2},
        {"softmax_scale": 0.5},
    ],
)
def test_wrong_config_values_are_detected(change: dict[str, Any]) -> None:
    model = tiny_model("qwen3")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    broken = replace(adapted, config=replace(adapted.config, **change))
    assert _worst(broken, model) > 1e-2


def test_moe_routing_flag_is_consumed() -> None:
    model = tiny_model("qwen3_moe")  # norm_topk_prob=True
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    broken = replace(adapted, config=replace(adapted.config, norm_topk_prob=False))
    assert _worst(broken, model) > 1e-2


def test_a_corrupted_cache_block_changes_later_logits() -> None:
    model = tiny_model("llama")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    cfg = adapted.config
    executor = xa.ReferenceExecutor(cfg, adapted.weights)
    kv = xa.allocate_kv_cache(cfg, NUM_BLOCKS)
    freqs = xa.precompute_freqs_cis(cfg)
    tokens = [11, 40, 7, 99, 3, 64, 21]
    blocks = [6, 2]
    out = torch.empty(7, cfg.hidden_size)
    prefill = xa.build_attn_meta(
        query_lens=[6], seq_lens=[6], block_tables=[blocks], positions=torch.arange(6)
    )
    executor.forward(torch.tensor(tokens[:6]), prefill, kv, freqs, out)
    decode = xa.build_attn_meta(
        query_lens=[1], seq_lens=[7], block_tables=[blocks], positions=torch.tensor([6])
    )
    logits = torch.empty(1, cfg.vocab_size)
    want = hf_logits(model, tokens)[-1:]
    executor.forward(torch.tensor(tokens[6:]), decode, kv, freqs, out)
    executor.forward_get_logits(out, torch.tensor([0]), logits)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
    for k_cache, _ in kv:
        k_cache[6, 1].zero_()  # position 1 of the prompt
    executor.forward(torch.tensor(tokens[6:]), decode, kv, freqs, out)
    executor.forward_get_logits(out, torch.tensor([0]), logits)
    assert (logits - want).abs().max() > 1e-2


# -- refusals ---------------------------------------------------------------------------------


def _qwen3() -> tuple[xa.AdaptedModel, xa.ReferenceExecutor]:
    model = tiny_model("qwen3")
    adapted = xa.adapt_model(model, model.config, SETTINGS)
    return adapted, xa.ReferenceExecutor(adapted.config, adapted.weights)


@pytest.mark.parametrize(
    ("blocks", "seq_len", "message"),
    [
        ([[3]], 6, r"request 0: 6 tokens need 2 blocks of 4; its block table has 1"),
        ([[3, 99]], 6, r"block ids \[3, 99\] outside the cache's 32 blocks"),
    ],
)
def test_bad_block_tables_are_refused(blocks: list[list[int]], seq_len: int, message: str) -> None:
    adapted, executor = _qwen3()
    cfg = adapted.config
    meta = xa.build_attn_meta(
        query_lens=[seq_len], seq_lens=[seq_len], block_tables=blocks, positions=torch.arange(6)
    )
    kv = xa.allocate_kv_cache(cfg, NUM_BLOCKS)
    out = torch.empty(6, cfg.hidden_size)
    with pytest.raises(xa.AttnMetaError, match=message):
        executor.forward(torch.arange(6), meta, kv, xa.precompute_freqs_cis(cfg), out)


def test_two_requests_sharing_a_slot_are_refused() -> None:
    adapted, executor = _qwen3()
    cfg = adapted.config
    meta = xa.build_attn_meta(
        query_lens=[2, 2], seq_lens=[2, 2], block_tables=[[3], [3]], positions=torch.arange(4)
    )
    kv = xa.allocate_kv_cache(cfg, NUM_BLOCKS)
    with pytest.raises(xa.AttnMetaError, match="same KV-cache slot"):
        executor.forward(
            torch.arange(4), meta, kv, xa.precompute_freqs_cis(cfg), torch.empty(4, 64)
        )


def test_wrong_kv_cache_and_positions_are_refused() -> None:
    adapted, executor = _qwen3()
    cfg = adapted.config
    meta = xa.build_attn_meta(
        query_lens=[2], seq_lens=[2], block_tables=[[3]], positions=torch.tensor([0, 80])
    )
    freqs = xa.precompute_freqs_cis(cfg)
    out = torch.empty(2, cfg.hidden_size)
    bad = [(torch.zeros(8, 16, 2, 16), torch.zeros(8, 16, 2, 16))] * cfg.n_layers
    with pytest.raises(xa.AttnMetaError, match=r"expected \[num_blocks, 4, 2, 16\]"):
        executor.forward(torch.arange(2), meta, bad, freqs, out)
    with pytest.raises(ValueError, match=r"positions span \[0, 80\]"):
        executor.forward(torch.arange(2), meta, xa.allocate_kv_cache(cfg, 8), freqs, out)


def test_unsupported_configurations_are_refused() -> None:
    adapted, _ = _qwen3()
    for change, message in (
        ({"def_tp_size": 2}, r"def_tp_size = 2; the reference accepts 1"),
        ({"attn_type": xa.AttnType.AttnMLA}, r"attn_type"),
        ({"qk_norm": False}, r"qk_norm = False"),
    ):
        with pytest.raises(xa.UnsupportedModelError, match=message):
            xa.ReferenceExecutor(replace(adapted.config, **change), adapted.weights)
