"""The mirrors use Xlite's names exactly (the stub's names are data in xlite_stub_names.py)."""

from __future__ import annotations

import inspect
from dataclasses import fields

import ascend_xlite_adapter as xa
import pytest
from conftest import tiny_model, vllm_layout
from xlite_stub_names import (
    ATTN_META_FIELDS,
    ATTN_TYPE_MEMBERS,
    MODEL_CONFIG_FIELDS,
    MODEL_FORWARD_PARAMS,
    MODEL_WEIGHT_ATTRS,
    SCORING_FUNC_MEMBERS,
)


def test_model_config_fields_are_the_stubs_in_order() -> None:
    assert tuple(f.name for f in fields(xa.XliteModelConfig)) == MODEL_CONFIG_FIELDS


def test_attn_meta_fields_are_the_stubs() -> None:
    assert tuple(f.name for f in fields(xa.XliteAttnMeta)) == ATTN_META_FIELDS


def test_enum_members_are_the_stubs() -> None:
    assert tuple(m.name for m in xa.AttnType) == ATTN_TYPE_MEMBERS
    assert tuple(m.name for m in xa.ScoringFuncType) == SCORING_FUNC_MEMBERS


def test_weight_slot_names_are_model_attributes() -> None:
    names = {f.name for f in fields(xa.LayerWeights)} | {"embed", "norm", "head"}
    assert names <= set(MODEL_WEIGHT_ATTRS), names - set(MODEL_WEIGHT_ATTRS)


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_to_slots_keys_are_model_attributes(family: str) -> None:
    model = tiny_model(family)
    adapted = xa.adapt_model(vllm_layout(model), model.config, architecture=type(model).__name__)
    keys = set(adapted.weights.to_slots())
    assert keys <= set(MODEL_WEIGHT_ATTRS), keys - set(MODEL_WEIGHT_ATTRS)
    expected = {"embed", "norm", "head", "attn_norm", "attn_out", "mha_qkv", "mlp_norm"}
    if family == "qwen2":
        expected |= {"mha_qkv_bias", "mlp_up_gate", "mlp_down"}
    else:
        expected |= {"mha_q_norm", "mha_k_norm", "gate", "re_up_gate", "re_down"}
    assert keys == expected


def test_executor_entry_points_follow_model_signatures() -> None:
    # Xlite's Model.forward(rt, input, attn_meta, kv_cache, freqs_cis, output, curr_stream): the
    # reference has no runtime handle and no stream, and keeps every other name and position.
    params = tuple(inspect.signature(xa.ReferenceExecutor.forward).parameters)[1:]
    assert params == tuple(p for p in MODEL_FORWARD_PARAMS if p not in ("rt", "curr_stream"))
