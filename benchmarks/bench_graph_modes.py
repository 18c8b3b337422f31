"""Graph modes on a Qwen3-shaped decoder: eager vs FULL vs PIECEWISE vs FULL_AND_PIECEWISE.

Runs ``torch.compile(model, backend=aclgraph)`` per mode on the cpu twin (or ``--backend``),
for uniform decode batches (one token per request) and mixed prefill+decode batches, next to
``ascend_aclgraph.capture`` of the same model and FULL through :class:`GuardFreeModule` (compiled
once, then dispatched without dynamo's guards), FULL with PyTorch's own per-call savings
(specialized floats, then module guards off too) and dynamo's frame with a backend that does
nothing (what dynamo alone costs per call). It reports the median step time, the number of
captured graphs and the capture time; then the per-call overhead of each runner on a trivial
graph (raw replay as the floor) and the twin's replay cost per recorded op. Timings are taken on
one thread (the CI machines have two noisy cores), all variants round-robin in one run: compare
them with each other, not with a device.

    python benchmarks/bench_graph_modes.py --out bench-results
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path
from typing import Any

import ascend_aclgraph as ag
import torch
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder

MODES = [
    "eager",
    "capture()",
    "FULL guard-free",
    "FULL",
    "FULL, floats specialized",
    "FULL, + module guards off",
    "dynamo frame alone",
    "PIECEWISE",
    "FULL_AND_PIECEWISE",
]
# FULL through plain torch.compile with PyTorch's own per-call savings, each a documented
# PyTorch setting (docs/graph-modes.md): dynamo specializes Python floats (an RMSNorm's eps)
# instead of passing them as 0-d tensors, which the graphs bake in anyway; then also
# guard_filter_fn drops the guards on module attributes (unsafe if the model's attributes
# change). The settings are applied only while these variants compile.
SPECIALIZED_FLOATS = ("FULL, floats specialized", "FULL, + module guards off")
# Not a way to run the model: dynamo's frame with a backend that does nothing, i.e. what dynamo
# costs per call before any backend runs.
DIAGNOSTIC = ("dynamo frame alone",)
PAD = dict(Qwen3Decoder.PAD_VALUES)

# CPU time of this process: on a shared 2-core machine the wall clock also counts the time other
# processes held the core, which no variant is responsible for. One thread, so CPU time is the
# time the step took on its core.
_clock = time.process_time
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


def _no_op(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A backend that runs nothing: each call returns the same empty placeholder outputs."""
    output = next(node for node in gm.graph.nodes if node.op == "output")
    placeholders = [torch.empty(0) for _ in output.args[0]]
    return lambda *args: placeholders


def run(cfg_name: str, cfg: Qwen3Config, n: int, iters: int, backend: str) -> list[dict[str, Any]]:
    """All modes built side by side, then timed round-robin (one step of each in turn), so the
    machine's noise spreads evenly over the modes and their ratios stay fair."""
    rows = []
    for uniform in (True, False):
        torch._dynamo.reset()
        args = _batch(cfg, n, uniform)
        variants: dict[str, tuple[Any, Any]] = {}
        for mode in MODES:
            model = Qwen3Decoder(cfg)  # same seed: identical weights in every variant
            if mode == "eager":
                variants[mode] = (model, None)
            elif mode == "capture()":
                sample = tuple(a.new_zeros((max(SIZES), *a.shape[1:])) for a in args)
                step = ag.capture(model, sample, batch_sizes=SIZES, backend=backend, pad_value=PAD)
                variants[mode] = (step, step)
            elif mode == "FULL guard-free":
                guard_free = ag.GuardFreeModule(
                    model, mode="FULL", batch_sizes=SIZES, backend=backend, pad_value=PAD
                )
                variants[mode] = (guard_free, guard_free.compiler)
            elif mode == "dynamo frame alone":
                variants[mode] = (torch.compile(model, backend=_no_op, dynamic=True), None)
            else:
                compiler = ag.make_compile_backend(  # "FULL, ..." rows are FULL
                    mode=mode.split(",")[0], batch_sizes=SIZES, backend=backend, pad_value=PAD
                )
                options = (
                    {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                    if mode == "FULL, + module guards off"
                    else None
                )
                compiled = torch.compile(model, backend=compiler, dynamic=True, options=options)
                variants[mode] = (compiled, compiler)
        first_s: dict[str, float] = {}
        samples: dict[str, list[float]] = {mode: [] for mode in MODES}
        with torch.no_grad(), ag.batch_hint(uniform_decode=uniform):
            for mode, (fn, _) in variants.items():
                start = _clock()
                # One batch shape per run: these calls make every compile the variant makes.
                with torch._dynamo.config.patch(specialize_float=mode in SPECIALIZED_FLOATS):
                    for _ in range(3):  # compile (first time), warm-up, capture
                        fn(*args)
                first_s[mode] = _clock() - start
            for _ in range(iters):
                for mode, (fn, _) in variants.items():
                    start = _clock()
                    fn(*args)
                    samples[mode].append(_clock() - start)
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


def _median_us(fns: dict[str, Any], iters: int) -> dict[str, float]:
    """Median µs per call of each function, timed round-robin in blocks of 20 calls."""
    for fn in fns.values():
        for _ in range(50):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(iters // 20, 5)):
        for name, fn in fns.items():
            start = _clock()
            for _ in range(20):
                fn()
            samples[name].append((_clock() - start) / 20 * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


class _Scale(torch.nn.Module):
    """A trivial graph (one multiply): what is left is the runners' own cost per call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def overhead(iters: int, backend: str) -> None:
    """Per-call cost of each way in, over raw replay of the same graph (batch 3 padded to 4)."""
    torch._dynamo.reset()
    x = torch.randn(3, 8)
    model = _Scale()
    step = ag.capture(model, (torch.zeros(4, 8),), batch_sizes=[4], backend=backend)
    raw = step.graphs[4].replay
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=[4], num_warmups=0, backend=backend)
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    guard_free = ag.GuardFreeModule(
        _Scale(), mode="FULL", batch_sizes=[4], num_warmups=0, backend=backend
    )
    with torch.no_grad():
        compiled(x)
        compiled(x)
        guard_free(x)
        runner = compiler.runners[-1]
        graph_args = (runner.inputs.static[0], 3, x) if len(runner.inputs.specs) == 3 else None
        fns: dict[str, Any] = {
            "raw replay": raw,
            "capture() call": lambda: step(x),
            "GuardFreeModule call": lambda: guard_free(x),
            "torch.compile call": lambda: compiled(x),
            "eager": lambda: model(x),
        }
        if graph_args is not None and runner.inputs.specs[1].role == "size":
            fns["compile runner alone"] = lambda: runner(*graph_args)
        times = _median_us(fns, iters)
    floor = times["raw replay"]
    print("per-call cost on a trivial graph (x * w, batch 3 padded to 4), 1 thread, median µs")
    print(f"{'way in':<24}{'µs/call':>9}{'over raw replay':>17}")
    for name, us in times.items():
        extra = f"{us - floor:>16.1f}" if name != "eager" else f"{'':>16}"
        print(f"{name:<24}{us:>9.1f}{extra}")


# More small decoders for the replay cost: its per-op overhead matters most where kernels are
# short (hidden 64-128), and one shape alone would hide how it scales with the work per op.
REPLAY_COST_SHAPES = {
    "h96, 3 layers": Qwen3Config.small(
        hidden_size=96, num_layers=3, head_dim=24, intermediate_size=192
    ),
    "h128, 2 layers": Qwen3Config.small(hidden_size=128, intermediate_size=256),
}


def replay_cost(configs: dict[str, Qwen3Config], backend: str) -> None:
    """The twin's replay: µs per replayed op, and raw replay against eager on the same batch.

    Both replays of each graph: the generated Python function and the native loop (what
    ``graph.replay`` runs where it could be built; see ascend_aclgraph.twin.native). The
    shapes are ``configs`` and :data:`REPLAY_COST_SHAPES`.
    """
    if backend != "cpu":
        return
    print("cpu twin replay cost (decode step, batch 4, 1 thread, median)")
    header = f"{'model':<24}{'ops':>5}{'eager µs':>10}{'python µs':>11}{'µs/op':>7}"
    header += f"{'native µs':>11}{'µs/op':>7}{'native vs eager':>17}"
    print(header)
    for name, cfg in {**configs, **REPLAY_COST_SHAPES}.items():
        model = Qwen3Decoder(cfg)
        x, positions, _ = _batch(cfg, 4, True)
        step = ag.capture(model, (x, positions), batch_sizes=[4], backend=backend, pad_value=PAD)
        program = step.graphs[4].native.program
        ops = program.num_replayed
        with torch.no_grad():
            eager_step = functools.partial(model, x, positions)
            times = _median_us(
                {"eager": eager_step, "python": program.python_replay, "native": program.replay},
                400,
            )
        native = "" if program.replay is not program.python_replay else "  (unavailable: python)"
        print(
            f"{name:<24}{ops:>5}{times['eager']:>10.1f}{times['python']:>11.1f}"
            f"{times['python'] / ops:>7.2f}{times['native']:>11.1f}{times['native'] / ops:>7.2f}"
            f"{times['eager'] / times['native']:>16.2f}x{native}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--tokens",
        type=lambda v: [int(t) for t in v.split(",")],
        default=[4, 6],
        help="tokens per step, comma separated (4: an exact capture size; 6: padded to 8)",
    )
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
        for tokens in args.tokens:
            for row in run(name, cfg, tokens, args.iters, args.backend):
                row["batch"] = f"{row['batch']} x{tokens}"
                rows.append(row)
    print(
        f"aclgraph graph modes, backend={args.backend}, tokens/step {args.tokens} (padded to "
        f"the next of {SIZES}), torch threads=1, median of {args.iters} steps, round-robin"
    )
    header = f"{'model':<24}{'batch':<20}{'mode':<27}{'ms/step':>9}{'vs eager':>10}"
    header += f"{'graphs':>8}{'capture s':>11}"
    print(header)
    print("-" * len(header))
    eager = {(r["model"], r["batch"]): r["median_ms"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        speedup = eager[(r["model"], r["batch"])] / r["median_ms"]
        print(
            f"{r['model']:<24}{r['batch']:<20}{r['mode']:<27}{r['median_ms']:>9.3f}"
            f"{speedup:>9.2f}x{r['graphs']:>8}{r['capture_s']:>11.3f}"
        )
    print(
        "FULL, floats specialized: torch._dynamo.config.specialize_float=True; + module guards "
        "off: also guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe; dynamo "
        "frame alone: the same frame with a backend that runs nothing (not a way to run the "
        "model: what dynamo costs per call)"
    )
    print()
    overhead(args.iters * 20, args.backend)
    print()
    replay_cost(configs, args.backend)
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
    modes = [mode for mode in MODES if mode not in DIAGNOSTIC]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
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
