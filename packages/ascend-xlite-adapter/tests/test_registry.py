"""Architecture name -> adapter, and the error for everything else."""

from __future__ import annotations

from types import SimpleNamespace

import ascend_xlite_adapter as xa
import pytest
from conftest import tiny_model
from torch import nn

SUPPORTED = {
    "LlamaForCausalLM": xa.DenseAdapter,
    "Qwen2ForCausalLM": xa.DenseAdapter,
    "Qwen3ForCausalLM": xa.DenseAdapter,
    "Qwen3MoeForCausalLM": xa.Qwen3MoeAdapter,
    "Qwen3VLForConditionalGeneration": xa.Qwen3VLAdapter,
}


def test_supported_architectures() -> None:
    assert xa.supported_architectures() == tuple(sorted(SUPPORTED))
    for name, cls in SUPPORTED.items():
        assert xa.get_adapter_class(name) is cls


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(xa.UnsupportedArchitectureError) as info:
        xa.get_adapter_class("DeepseekV3ForCausalLM")
    msg = str(info.value)
    assert "'DeepseekV3ForCausalLM' has no Xlite adapter" in msg
    for name in SUPPORTED:
        assert name in msg
    assert info.value.supported == tuple(sorted(SUPPORTED))
    assert isinstance(info.value, ValueError)


def test_adapt_model_refuses_an_unsupported_model() -> None:
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"])
    with pytest.raises(xa.UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        xa.adapt_model(nn.Linear(2, 2), config)


def test_architecture_comes_from_the_config_else_the_class_name() -> None:
    model = tiny_model("qwen3")
    model.config.architectures = None
    assert xa.model_architecture(model, model.config) == "Qwen3ForCausalLM"
    model.config.architectures = ["Qwen3ForCausalLM"]
    assert xa.model_architecture(nn.Linear(1, 1), model.config) == "Qwen3ForCausalLM"
    assert xa.adapt_model(model, model.config).architecture == "Qwen3ForCausalLM"


def test_register_adapter_refuses_conflicts_and_empty_lists() -> None:
    class Empty(xa.XliteAdapter):
        pass

    class Clash(xa.DenseAdapter):
        architectures = ("Qwen3ForCausalLM",)

    with pytest.raises(ValueError, match="architectures is empty"):
        xa.register_adapter(Empty)
    with pytest.raises(ValueError, match="already mapped by DenseAdapter"):
        xa.register_adapter(Clash)
    assert xa.get_adapter_class("Qwen3ForCausalLM") is xa.DenseAdapter
