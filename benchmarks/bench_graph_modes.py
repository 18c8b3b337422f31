"""Graph modes on a Qwen3-shaped decoder: eager vs FULL vs PIECEWISE vs FULL_AND_PIECEWISE.

Runs ``torch.compile(model, backend=aclgraph)`` per mode on the cpu twin (or ``--backend``),
for uniform decode batches (one token per request) and mixed prefill+decode batches, and
reports the median step time, the number of captured graphs and the capture time. Timings are
taken on one thread (the CI machines have two noisy cores): compare them with each other, not
with a device.

    python benchmarks/bench_graph_modes.py --out bench-results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import ascend_aclgraph as ag
import torch
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder

MODES = ["eager", "FULL", "PIECEWISE", "FULL_AND_PIECEWISE"]
SIZES = [1, 2, 4, 8, 16]


def _batch(cfg: Qwen3Config, n: int, uniform: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, cfg.hidden_size, generator=gen)
    if uniform:  # n requests, one token each, deep into their sequences
        return x, torch.full((n,), 40), torch.arange(n)
    prefill = n // 2  # request 0 prefills `prefill` tokens; the rest decode one token each
    positions = torch.tensor(list(range(prefill)) + [40] * (n - prefill))
    seq_ids = torch.tensor([0] * prefill + list(range(1, n - prefill + 1)))
    return x, positions, seq_ids


def run(cfg_name: str, cfg: Qwen3Config, n: int, iters: int, backend: str) -> list[dict[str, Any]]:
    """All modes built side by side, then timed round-robin (one step of each in turn), so the
    machine's noise spreads evenly over the modes and their ratios stay fair."""
    torch._dynamo.reset()
    variants: dict[str, tuple[Any, Any]] = {}
    for mode in MODES:
        model = Qwen3Decoder(cfg)  # same seed: identical weights in every variant
        if mode == "eager":
            variants[mode] = (model, None)
            continue
        compiler = ag.make_compile_backend(mode=mode, batch_sizes=SIZES, backend=backend)
        variants[mode] = (torch.compile(model, backend=compiler, dynamic=True), compiler)
    rows = []
    for uniform in (True, False):
        args = _batch(cfg, n, uniform)
        first_s: dict[str, float] = {}
        samples: dict[str, list[float]] = {mode: [] for mode in MODES}
        with torch.no_grad(), ag.batch_hint(uniform_decode=uniform):
            for mode, (fn, _) in variants.items():
                start = time.perf_counter()
                for _ in range(3):  # compile (first time), warm-up, capture
                    fn(*args)
                first_s[mode] = time.perf_counter() - start
            for _ in range(iters):
                for mode, (fn, _) in variants.items():
                    start = time.perf_counter()
                    fn(*args)
                    samples[mode].append(time.perf_counter() - start)
        for mode, (_, compiler) in variants.items():
            stats = compiler.stats if compiler else None
            rows.append(
                {
                    "model": cfg_name,
                    "batch": "uniform decode" if uniform else "mixed",
                    "mode": mode,
                    "median_ms": statistics.median(samples[mode]) * 1e3,
                    "graphs": stats.captures if stats else 0,
                    "capture_s": stats.capture_seconds if stats else 0.0,
                    "first_calls_s": first_s[mode],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--tokens", type=int, default=6, help="tokens per step (padded to 8)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Three compiled variants of one module class live side by side here.
    torch._dynamo.config.recompile_limit = 64
    configs = {
        "small (h64, 2 layers)": Qwen3Config.small(),
        "mid (h256, 6 layers)": Qwen3Config.small(
            hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=768
        ),
    }
    rows: list[dict[str, Any]] = []
    for name, cfg in configs.items():
        rows += run(name, cfg, args.tokens, args.iters, args.backend)
    print(
        f"aclgraph graph modes, backend={args.backend}, {args.tokens} tokens/step (padded to "
        f"the next of {SIZES}), torch threads=1, median of {args.iters} steps"
    )
    header = f"{'model':<24}{'batch':<16}{'mode':<20}{'ms/step':>9}{'vs eager':>10}"
    header += f"{'graphs':>8}{'capture s':>11}"
    print(header)
    print("-" * len(header))
    eager = {(r["model"], r["batch"]): r["median_ms"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        speedup = eager[(r["model"], r["batch"])] / r["median_ms"]
        print(
            f"{r['model']:<24}{r['batch']:<16}{r['mode']:<20}{r['median_ms']:>9.3f}"
            f"{speedup:>9.2f}x{r['graphs']:>8}{r['capture_s']:>11.3f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (install the 'bench' extra)")
        return
    groups = sorted({(r["model"], r["batch"]) for r in rows})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [
            next(
                r["median_ms"] for r in rows if (r["model"], r["batch"]) == g and r["mode"] == mode
            )
            for g in groups
        ]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=mode)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{b}" for m, b in groups], fontsize=8)
    ax.set_ylabel("median ms / step (1 thread)")
    ax.set_title(f"Graph modes on the Qwen3-shaped decoder ({args.backend} backend)")
    ax.legend()
    fig.tight_layout()
    path = args.out / "graph_modes.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
