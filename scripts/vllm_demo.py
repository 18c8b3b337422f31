"""The README's main job: vLLM generation in eager and in each graph mode, side by side.

Builds the tiny local Qwen3 (scripts/build_tiny_model.py), then runs one offline ``vllm.LLM``
generation per mode on the plugin's CPU twin platform (each in its own process, through
scripts/vllm_generate.py) and prints one table: requested mode, effective mode and why, graphs
captured, capture and start-up seconds, TTFT, ms per output token, the fusions that ran, and
whether the greedy tokens equal eager's.

    python scripts/vllm_demo.py [--model-dir DIR] [--modes eager,PIECEWISE,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ["eager", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]


def _build_model(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location(
        "build_tiny_model", ROOT / "scripts" / "build_tiny_model.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    path: Path = module.build_tiny_model(out, preset="tiny", seed=0)
    return path


def _generate(model: Path, mode: str) -> dict[str, Any]:
    spec = {"model": str(model), "mode": mode, "capture_sizes": [1, 2, 4, 8]}
    env = {**os.environ, "VLLM_ASCEND_PLUGIN_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vllm_generate.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            return result
    raise SystemExit(f"vLLM failed in mode {mode}:\n{(proc.stdout + proc.stderr)[-5000:]}")


def _row(result: dict[str, Any], eager_tokens: list[list[int]]) -> list[str]:
    (report,) = result["reports"]
    why = "; ".join(r.split(": ", 1)[-1] for r in report["reasons"]) or "-"
    fusions = {}
    for entry in report["fusion_reports"]:
        for name, count in entry["counts"].items():
            fusions[name] = fusions.get(name, 0) + count
    fired = ", ".join(f"{k}={v}" for k, v in fusions.items() if v) or "-"
    fused_ops = sorted(set(report["fused_ops_in_full_graphs"].values()))
    return [
        result["mode"],
        report["effective"],
        why,
        f"{len(report['full_descriptors'])} / {len(report['piecewise_descriptors'])}",
        f"{report['capture_seconds']:.2f}",
        f"{result['startup_s']:.1f}",
        f"{result['ttft_ms']:.1f}",
        f"{result['tpot_ms']:.2f}",
        fired if not fused_ops else f"{fired} ({fused_ops[-1]} fused ops per FULL graph)",
        "yes" if result["tokens"] == eager_tokens else "NO",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".models" / "tiny-qwen3")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "eager" not in modes:
        modes.insert(0, "eager")
    model = _build_model(args.model_dir)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        print(f"[demo] starting vLLM in mode {mode} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[mode] = _generate(model, mode)
        print(f"[demo] {mode}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    eager_tokens = results["eager"]["tokens"]
    header = [
        "requested",
        "effective",
        "why",
        "graphs FULL / PIECEWISE",
        "capture s",
        "start-up s",
        "TTFT ms",
        "ms/token",
        "fusions",
        "tokens = eager",
    ]
    rows = [header] + [_row(results[m], eager_tokens) for m in modes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(
        "\nvllm-cpu 0.32.0 on the plugin's CPU twin platform, tiny random Qwen3 (float32), "
        "4 prompts x 12 greedy tokens; TTFT and ms/token: one request alone, median of 3."
    )
    ok = all(results[m]["tokens"] == eager_tokens for m in modes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
