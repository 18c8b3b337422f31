"""Handing over to ``xlite._C``, against a stand-in module that accepts only the stub's names.

The stand-in's classes have ``__slots__`` made of the names in xlite_stub_names.py, so
assigning any attribute the real ``xlite._C`` does not have raises ``AttributeError``.
"""

from __future__ import annotations

import enum
from types import ModuleType
from typing import Any

import ascend_xlite_adapter as xa
import pytest
import torch
from conftest import tiny_model, vllm_layout
from xlite_stub_names import (
    ATTN_META_FIELDS,
    ATTN_TYPE_MEMBERS,
    MODEL_CONFIG_FIELDS,
    MODEL_WEIGHT_ATTRS,
    SCORING_FUNC_MEMBERS,
)


def fake_xlite(config_fields: tuple[str, ...] = MODEL_CONFIG_FIELDS) -> ModuleType:
    mod = ModuleType("xlite._C")
    attn_type = enum.Enum("AttnType", ATTN_TYPE_MEMBERS)  # type: ignore[misc]
    scoring = enum.Enum("ScoringFuncType", SCORING_FUNC_MEMBERS)  # type: ignore[misc]
    for member in (*attn_type, *scoring):
        setattr(mod, member.name, member)

    def init(self: Any, config: Any, rank: int = 0) -> None:
        self.init_args = (config, rank)

    mod.ModelConfig = type("ModelConfig", (), {"__slots__": config_fields})  # type: ignore[attr-defined]
    mod.AttnMeta = type("AttnMeta", (), {"__slots__": ATTN_META_FIELDS})  # type: ignore[attr-defined]
    mod.Model = type(  # type: ignore[attr-defined]
        "Model", (), {"__slots__": (*MODEL_WEIGHT_ATTRS, "init_args"), "init": init}
    )
    return mod


def test_config_fields_and_enums_map_by_name() -> None:
    model = tiny_model("qwen3_vl")
    cfg = xa.adapt_model(model, model.config).config
    mod = fake_xlite()
    native = xa.to_native_config(cfg, mod)
    for name in MODEL_CONFIG_FIELDS:
        value = getattr(native, name)
        ours = getattr(cfg, name)
        if isinstance(ours, enum.Enum):
            assert value is getattr(mod, ours.name)
        elif isinstance(ours, tuple):
            assert value == list(ours)
        else:
            assert value == ours
    assert native.mrope_section == [2, 3, 3]


def test_fields_an_older_xlite_lacks() -> None:
    cfg = xa.adapt_model(m := tiny_model("qwen3"), m.config).config
    older = fake_xlite(tuple(f for f in MODEL_CONFIG_FIELDS if f != "attn_output_gate"))
    assert not hasattr(xa.to_native_config(cfg, older), "attn_output_gate")  # default: skipped
    no_blocks = fake_xlite(tuple(f for f in MODEL_CONFIG_FIELDS if f != "max_num_batched_tokens"))
    with pytest.raises(xa.XliteAdapterError, match=r"no ModelConfig\.max_num_batched_tokens"):
        xa.to_native_config(cfg, no_blocks)


def test_attn_meta_becomes_host_lists() -> None:
    positions = torch.arange(5)
    meta = xa.build_attn_meta(
        query_lens=[1, 4], seq_lens=[9, 4], block_tables=[[2, 5, 0], [7]], positions=positions
    )
    native = xa.to_native_attn_meta(meta, fake_xlite())
    assert native.lens == [1, 4]
    assert native.cached_lens == [8, 0]
    assert native.is_prefills == [False, True]
    assert native.block_tables_cpu == [[2, 5, 0], [7]]
    assert native.positions is positions


def test_model_gets_the_models_tensors_and_is_initialized() -> None:
    hf = tiny_model("qwen3_moe")
    twin = vllm_layout(hf)
    adapted = xa.adapt_model(twin, hf.config, architecture="Qwen3MoeForCausalLM")
    native = xa.to_native_model(adapted.config, adapted.weights, fake_xlite(), rank=3)
    config, rank = native.init_args
    assert rank == 3
    assert config.n_routed_experts == 8
    layer = twin.model.layers[2]
    assert native.mha_qkv[2] is layer.self_attn.qkv_proj.weight
    assert native.re_up_gate[2 * 8 + 5].data_ptr() == layer.mlp.experts.w13_weight[5].data_ptr()
    assert native.head is twin.lm_head.weight


def test_transformers_layout_needs_allow_copy() -> None:
    hf = tiny_model("llama")
    adapted = xa.adapt_model(hf, hf.config)
    with pytest.raises(xa.WeightCopyRequiredError):
        xa.to_native_model(adapted.config, adapted.weights, fake_xlite())
    native = xa.to_native_model(adapted.config, adapted.weights, fake_xlite(), allow_copy=True)
    assert native.attn_out[0] is hf.model.layers[0].self_attn.o_proj.weight


def test_import_xlite_explains_what_is_missing() -> None:
    with pytest.raises(xa.XliteUnavailableError) as info:
        xa.import_xlite()
    assert 'pip install "ascend-xlite-adapter[xlite]"' in str(info.value)
    assert "Ascend NPU" in str(info.value)
    assert isinstance(info.value, ImportError)
