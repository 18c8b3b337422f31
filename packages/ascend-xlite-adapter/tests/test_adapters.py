"""Adapters: the Xlite config fields, and weight slots that share storage with the model."""

from __future__ import annotations

from typing import Any

import ascend_xlite_adapter as xa
import pytest
import torch
from conftest import HEAD_DIM, HIDDEN, MAX_POS, VOCAB, tiny_model, vllm_layout
from torch import nn

SETTINGS = xa.AdapterSettings(block_size=16, max_batch_size=8)


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def hf_decoder(model: nn.Module) -> Any:
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_vl"])
def test_common_config_fields(family: str) -> None:
    model = tiny_model(family)
    cfg = xa.adapt_model(model, model.config, SETTINGS).config
    assert cfg.attn_type is xa.AttnType.AttnMHA
    assert (cfg.vocab_size, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads) == (VOCAB, HIDDEN, 4, 2)
    assert cfg.head_dim == cfg.rope_head_dim == HEAD_DIM
    assert cfg.softmax_scale == HEAD_DIM**-0.5
    assert cfg.norm_eps == 1e-6
    assert cfg.rope_theta == (5e5 if family == "qwen3_vl" else 10000.0)
    assert (cfg.max_seq_len, cfg.max_batch_size, cfg.max_m, cfg.block_size) == (MAX_POS, 8, 8, 16)
    assert cfg.max_num_batched_tokens == 8
    assert (cfg.def_tp_size, cfg.moe_tp_size, cfg.moe_ep_size) == (1, 1, 1)
    assert cfg.qkv_bias is (family == "qwen2")
    assert cfg.qk_norm is (family in ("qwen3", "qwen3_moe", "qwen3_vl"))
    if family == "qwen3_moe":
        assert (cfg.n_layers, cfg.n_dense_layers, cfg.n_routed_experts) == (3, 0, 8)
        assert (cfg.n_act_experts, cfg.n_shared_experts, cfg.moe_intermediate_size) == (2, 0, 48)
        assert cfg.norm_topk_prob is True
        assert cfg.scoring_func is xa.ScoringFuncType.ScoringFuncSoftmax
    else:
        assert (cfg.n_layers, cfg.n_dense_layers, cfg.n_routed_experts) == (2, 2, 0)
        assert cfg.intermediate_size == 96
    if family == "qwen3_vl":
        assert cfg.mrope_section == (2, 3, 3)
        assert cfg.mrope_interleaved is True
        assert cfg.deepstack_num_level == 1
    else:
        assert (cfg.mrope_section, cfg.deepstack_num_level) == ((), 0)


def test_settings_for_vllm_follow_vllm_ascend() -> None:
    decode = xa.AdapterSettings.for_vllm(
        full_mode=False,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        block_size=128,
        tensor_parallel_size=2,
        data_parallel_size=2,
        enable_expert_parallel=True,
    )
    assert (decode.max_m, decode.max_batch_size, decode.max_seq_len) == (64, 64, 4096)
    assert (decode.moe_ep_size, decode.moe_tp_size, decode.tp_size) == (4, 1, 2)
    full = xa.AdapterSettings.for_vllm(
        full_mode=True,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        block_size=128,
        tensor_parallel_size=2,
    )
    assert (full.max_m, full.moe_tp_size, full.moe_ep_size) == (2048, 2, 1)
    with pytest.raises(ValueError, match=r"AdapterSettings.block_size = 0: expected an integer"):
        xa.AdapterSettings(block_size=0)


def test_moe_dense_prefix_layers_and_dp() -> None:
    model = tiny_model("qwen3_moe", mlp_only_layers=[0], norm_topk_prob=False)
    settings = xa.AdapterSettings(dp_size=2, moe_ep_size=2)
    adapted = xa.adapt_model(model, model.config, settings)
    cfg = adapted.config
    assert (cfg.n_dense_layers, cfg.norm_topk_prob, cfg.def_dp_size, cfg.moe_ep_size) == (
        1,
        False,
        2,
        2,
    )
    assert [lw.is_moe for lw in adapted.weights.layers] == [False, True, True]
    # Dense models ignore DP: every DP rank is a whole replica.
    dense = tiny_model("qwen3")
    assert xa.adapt_model(dense, dense.config, settings).config.def_dp_size == 1


# -- weight sharing ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_vl"])
def test_transformers_slots_are_the_models_own_tensors(family: str) -> None:
    model = tiny_model(family)
    weights = xa.adapt_model(model, model.config, SETTINGS).weights
    dec = hf_decoder(model)
    assert ptr(weights.embed) == ptr(dec.embed_tokens.weight)
    assert ptr(weights.norm) == ptr(dec.norm.weight)
    assert ptr(weights.head) == ptr(model.lm_head.weight)
    for layer, lw in zip(dec.layers, weights.layers, strict=True):
        a = layer.self_attn
        assert [ptr(p) for p in lw.mha_qkv.parts] == [
            ptr(a.q_proj.weight),
            ptr(a.k_proj.weight),
            ptr(a.v_proj.weight),
        ]
        assert lw.mha_qkv.fused is None
        assert ptr(lw.attn_out) == ptr(a.o_proj.weight)
        assert ptr(lw.attn_norm) == ptr(layer.input_layernorm.weight)
        assert ptr(lw.mlp_norm) == ptr(layer.post_attention_layernorm.weight)
        if lw.mha_qkv_bias is not None:
            assert [ptr(b) for b in lw.mha_qkv_bias.parts] == [
                ptr(a.q_proj.bias),
                ptr(a.k_proj.bias),
                ptr(a.v_proj.bias),
            ]
        if lw.mha_q_norm is not None:
            assert lw.mha_k_norm is not None
            assert ptr(lw.mha_q_norm) == ptr(a.q_norm.weight)
            assert ptr(lw.mha_k_norm) == ptr(a.k_norm.weight)
        if lw.is_moe:
            ex = layer.mlp.experts
            assert lw.gate is not None
            assert ptr(lw.gate) == ptr(layer.mlp.gate.weight)
            # transformers >= 5 fuses the experts: each expert's slot is a view, no copy.
            for e, (up_gate, down) in enumerate(zip(lw.re_up_gate, lw.re_down, strict=True)):
                assert up_gate.fused is not None
                assert ptr(up_gate.fused) == ptr(ex.gate_up_proj)
                assert up_gate.fused.data_ptr() == ex.gate_up_proj[e].data_ptr()
                assert down.data_ptr() == ex.down_proj[e].data_ptr()
        else:
            assert lw.mlp_up_gate is not None
            assert lw.mlp_down is not None
            assert [ptr(p) for p in lw.mlp_up_gate.parts] == [
                ptr(layer.mlp.gate_proj.weight),
                ptr(layer.mlp.up_proj.weight),
            ]
            assert ptr(lw.mlp_down) == ptr(layer.mlp.down_proj.weight)
    params = {ptr(p) for p in model.parameters()}
    assert {ptr(t) for t in weights.tensors()} <= params


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe", "qwen3_vl"])
def test_vllm_slots_are_views_into_fused_weights(family: str) -> None:
    model = tiny_model(family)
    twin = vllm_layout(model)
    weights = xa.adapt_model(
        twin, model.config, SETTINGS, architecture=type(model).__name__
    ).weights
    dec = twin.language_model.model if family == "qwen3_vl" else twin.model
    head = twin.language_model.lm_head if family == "qwen3_vl" else twin.lm_head
    assert ptr(weights.head) == ptr(head.weight)
    q, kv = 4 * HEAD_DIM, 2 * HEAD_DIM
    for layer, lw in zip(dec.layers, weights.layers, strict=True):
        fused = layer.self_attn.qkv_proj.weight
        assert lw.mha_qkv.fused is fused
        offsets = [p.data_ptr() - fused.data_ptr() for p in lw.mha_qkv.parts]
        assert offsets == [0, q * HIDDEN * 4, (q + kv) * HIDDEN * 4]  # float32: 4 bytes
        assert all(ptr(p) == ptr(fused) for p in lw.mha_qkv.parts)
        if lw.mha_qkv_bias is not None:
            bias = layer.self_attn.qkv_proj.bias
            assert all(ptr(p) == ptr(bias) for p in lw.mha_qkv_bias.parts)
        if lw.is_moe:
            w13 = layer.mlp.experts.w13_weight
            for e, up_gate in enumerate(lw.re_up_gate):
                assert up_gate.fused is not None
                assert up_gate.fused.data_ptr() == w13[e].data_ptr()
                gate_part, up_part = up_gate.parts
                assert up_part.data_ptr() == w13[e, 48:].data_ptr()
                assert ptr(gate_part) == ptr(w13)
        else:
            assert lw.mlp_up_gate is not None
            gate_up = layer.mlp.gate_up_proj.weight
            assert lw.mlp_up_gate.fused is gate_up
            assert lw.mlp_up_gate.parts[1].data_ptr() == gate_up[96:].data_ptr()
    assert {ptr(t) for t in weights.tensors()} <= {ptr(p) for p in twin.parameters()}


def test_to_slots_hands_over_fused_tensors_without_copies() -> None:
    model = tiny_model("qwen3_moe")
    twin = vllm_layout(model)
    adapted = xa.adapt_model(twin, model.config, architecture="Qwen3MoeForCausalLM")
    slots = adapted.weights.to_slots()
    params = {ptr(p) for p in twin.parameters()}
    flat = [t for v in slots.values() for t in (v if isinstance(v, list) else [v])]
    assert {ptr(t) for t in flat} <= params
    assert len(slots["re_up_gate"]) == len(slots["re_down"]) == 3 * 8
    assert len(slots["gate"]) == 3


def test_to_slots_refuses_to_fuse_separate_tensors_unless_asked() -> None:
    model = tiny_model("qwen2")
    weights = xa.adapt_model(model, model.config).weights
    with pytest.raises(xa.WeightCopyRequiredError, match=r"layers\[0\].mha_qkv: the model keeps 3"):
        weights.to_slots()
    slots = weights.to_slots(allow_copy=True)
    a = model.model.layers[1].self_attn
    qkv = slots["mha_qkv"]
    assert isinstance(qkv, list)
    assert torch.equal(qkv[1], torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))


def test_in_place_updates_reach_the_slots() -> None:
    model = tiny_model("qwen3")
    weights = xa.adapt_model(model, model.config).weights
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(0)
    assert not weights.layers[0].mha_qkv.parts[1].any()


@pytest.mark.parametrize(("layout", "transposed"), [("w13", True), ("modules", False)])
def test_other_expert_layouts(layout: str, transposed: bool) -> None:
    model = tiny_model("qwen3_moe")
    twin = vllm_layout(model, expert_layout=layout, transposed=transposed)
    settings = xa.AdapterSettings(experts_weight_transpose=transposed)
    adapted = xa.adapt_model(twin, model.config, settings, architecture="Qwen3MoeForCausalLM")
    assert adapted.config.experts_weight_transpose is transposed
    lw = adapted.weights.layers[0]
    assert len(lw.re_up_gate) == 8
    if layout == "modules":
        expert = twin.model.layers[0].mlp.experts[5]
        assert ptr(lw.re_up_gate[5].parts[1]) == ptr(expert.up_proj.weight)
    else:
        w13 = twin.model.layers[0].mlp.experts.w13_weight
        assert tuple(lw.re_up_gate[5].parts[0].shape) == (48, HIDDEN)  # [out, in] views
        assert lw.re_up_gate[5].fused is not None
        assert lw.re_up_gate[5].fused.data_ptr() == w13[5].data_ptr()


def test_expert_layout_mismatch_names_the_setting() -> None:
    model = tiny_model("qwen3_moe")
    twin = vllm_layout(model, transposed=True)
    with pytest.raises(xa.UnsupportedModelError, match="experts_weight_transpose"):
        xa.adapt_model(twin, model.config, architecture="Qwen3MoeForCausalLM")


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("llama", {"attention_bias": True}, r"attention_bias \(o_proj.bias\) = True"),
        ("llama", {"mlp_bias": True}, r"mlp_bias = True"),
        ("llama", {"hidden_act": "gelu"}, r"hidden_act = 'gelu'.*accepted: 'silu'"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            r"rope_type = 'linear'.*accepted: 'default'",
        ),
        ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}, r"use_sliding_window"),
        (
            "qwen3_moe",
            {"mlp_only_layers": [1]},
            r"mlp_only_layers / decoder_sparse_step = \(\[1\], 1\).*before the first MoE",
        ),
    ],
)
def test_unsupported_model_features(family: str, overrides: dict[str, Any], message: str) -> None:
    model = tiny_model(family, **overrides)
    with pytest.raises(xa.UnsupportedModelError, match=message):
        xa.adapt_model(model, model.config)


def test_bad_mrope_section_is_refused() -> None:
    model = tiny_model("qwen3_vl")
    model.config.text_config.rope_parameters = {"rope_theta": 1e4, "mrope_section": [4, 4, 4]}
    with pytest.raises(xa.UnsupportedModelError, match="summing to head_dim / 2 = 8"):
        xa.adapt_model(model, model.config)


def test_missing_decoder_and_weights() -> None:
    model = tiny_model("qwen3")
    with pytest.raises(xa.MissingWeightError, match="no text decoder found"):
        xa.adapt_model(nn.Linear(2, 2), model.config, architecture="Qwen3ForCausalLM")
    del model.model.layers[1].self_attn.v_proj
    with pytest.raises(xa.MissingWeightError, match=r"layers\[1\]: v_proj.weight missing"):
        xa.adapt_model(model, model.config)


def test_released_vllm_weights_are_explained() -> None:
    # vLLM's CPU platform frees `.weight` of linear layers after repacking them.
    model = tiny_model("qwen3")
    twin = vllm_layout(model)
    twin.model.layers[1].self_attn.qkv_proj.weight = nn.Parameter(torch.empty(0))
    with pytest.raises(xa.MissingWeightError, match=r"layers\[1\]: qkv_proj.weight is empty"):
        xa.adapt_model(twin, model.config, architecture="Qwen3ForCausalLM")
