"""Shared fixtures: tiny random-weight HF models built from local configs, and a compile helper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ascend_npugraph_ex as nx
import pytest
import torch

torch.manual_seed(0)


def tiny_model(arch: str, layers: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM with random weights."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    config = config_cls(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=128,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(config).eval().to(dtype)


def compile_and_run(
    fn: Callable[..., Any], *args: Any, **options: Any
) -> tuple[Any, Any, list[nx.FusionReport]]:
    """(eager output, compiled output, fusion reports) of ``fn(*args)`` under npugraph_ex."""
    torch._dynamo.reset()
    backend = nx.make_backend(**{"force_eager": True, **options})
    compiled = torch.compile(fn, backend=backend, dynamic=False, fullgraph=False)
    with torch.no_grad():
        expected = fn(*args)
        got = compiled(*args)
    return expected, got, backend.reports


@pytest.fixture
def build_dir(tmp_path: Any) -> Any:
    return tmp_path / "static_kernels"
