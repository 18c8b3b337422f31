"""ACLGraph runtime benchmark: eager vs graph replay, capture cost, pool memory, wrapper overhead.

Run it through nox (``nox -s bench-aclgraph``), which pins CPU runs to one thread. Timings are
medians over repeated calls; speed-ups are ratios taken in the same run against eager.

Sections:

1. A Qwen3-0.6B-shaped decoder step (hidden 1024, 28 layers, 16/8 heads, head dim 128, MLP 3072,
   real KV cache) at batch 1, 8, 32: eager step, raw graph replay, the ``capture()`` callable
   (pad + copy + replay + cut-back + clone), capture seconds per size and pool bytes. On a CUDA
   GPU, raw ``torch.cuda.CUDAGraph`` replay of the same step is the floor.
2. The small decoder (hidden 64, 2 layers, batch 1), where launch overhead dominates.
3. Per-call overhead of the runtime on a trivial graph: ``capture()`` call and ``GraphWrapper``
   call, minus raw replay.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ascend_aclgraph as ag
import torch
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_us(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of one call, in microseconds (device work included)."""
    return interleaved_medians_us({"fn": fn}, device, reps, warmup)["fn"]


def interleaved_medians_us(
    fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 3
) -> dict[str, float]:
    """Median time per call of each function, timed round-robin.

    Taking one sample of each variant in turn spreads this machine's noise (other processes,
    frequency changes) evenly over the variants, so their ratio is fair even when the absolute
    times drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e6 for name, times in samples.items()}


def _eager(model: torch.nn.Module, *args: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(*args)

    return run


def bench_decoder(
    cfg: Qwen3Config, sizes: list[int], backend: ag.GraphBackend, reps: int
) -> list[dict[str, object]]:
    device = backend.device
    model = Qwen3Decoder(cfg).to(device)
    max_size = max(sizes)
    hidden = torch.randn(max_size, cfg.hidden_size, device=device)
    positions = torch.full((max_size,), 7, dtype=torch.long, device=device)
    step = ag.capture(
        model, (hidden, positions), batch_sizes=sizes, backend=backend, progress=False
    )
    rows = []
    for n in sizes:
        x = torch.randn(n, cfg.hidden_size, device=device)
        pos = torch.full((n,), 9, dtype=torch.long, device=device)
        times = interleaved_medians_us(
            {
                "eager": _eager(model, x, pos),
                "replay": step.graphs[n].replay,
                "call": functools.partial(step, x, pos),
            },
            device,
            reps,
        )
        eager, replay, call = times["eager"], times["replay"], times["call"]
        row: dict[str, object] = {
            "model": f"qwen3 h{cfg.hidden_size} L{cfg.num_layers}",
            "batch": n,
            "eager_us": eager,
            "replay_us": replay,
            "call_us": call,
            "speedup_replay": eager / replay,
            "speedup_call": eager / call,
            "capture_s": step.stats.capture_seconds_by_size[n],
            "pool_bytes": step.stats.pool_bytes,
        }
        if device.type == "cuda":
            row["raw_cuda_graph_us"] = _raw_cuda_graph_us(model, x, pos, reps)
            row["replay_vs_raw"] = replay / float(row["raw_cuda_graph_us"])  # type: ignore[arg-type]
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def _raw_cuda_graph_us(
    model: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor, reps: int
) -> float:
    """The floor: torch.cuda.CUDAGraph on the same step, no runtime around it."""
    static_x, static_pos = x.clone(), pos.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static_x, static_pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x, static_pos)
    return median_us(graph.replay, x.device, reps)


def bench_overhead(backend: ag.GraphBackend, reps: int) -> dict[str, float]:
    device = backend.device
    x = torch.randn(1, 16, device=device)
    step = ag.capture(lambda t: t + 1, (x,), batch_sizes=[1], backend=backend, progress=False)
    views = ag.capture(
        lambda t: t + 1, (x,), batch_sizes=[1], backend=backend, progress=False, clone_outputs=False
    )
    wrapper = ag.GraphWrapper(
        lambda t: t + 1, ag.GraphMode.FULL, backend=backend, options=ag.GraphOptions(num_warmups=0)
    )
    desc = ag.BatchDescriptor(1)
    with ag.graph_context(ag.GraphMode.FULL, desc):
        wrapper(x)

    def wrapped() -> None:
        with ag.graph_context(ag.GraphMode.FULL, desc):
            wrapper(x)

    times = interleaved_medians_us(
        {
            "raw_replay_us": step.graphs[1].replay,
            "capture_call_us": functools.partial(step, x),
            "capture_call_no_clone_us": functools.partial(views, x),
            "wrapper_call_us": wrapped,
        },
        device,
        reps,
    )
    replay = times["raw_replay_us"]
    times["capture_overhead_us"] = times["capture_call_us"] - replay
    times["capture_overhead_no_clone_us"] = times["capture_call_no_clone_us"] - replay
    times["wrapper_overhead_us"] = times["wrapper_call_us"] - replay
    return times


def _human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fmt_row(row: dict[str, object]) -> str:
    text = (
        f"{row['model']:<20} batch {row['batch']:>3} | eager {row['eager_us']:>11.1f} us | "
        f"replay {row['replay_us']:>11.1f} us ({row['speedup_replay']:.2f}x) | "
        f"capture() call {row['call_us']:>11.1f} us ({row['speedup_call']:.2f}x) | "
        f"capture {row['capture_s']:.2f} s | "
        f"pool {_human_bytes(int(row['pool_bytes']))}"  # type: ignore[call-overload]
    )
    if "raw_cuda_graph_us" in row:
        text += f" | raw CUDAGraph {row['raw_cuda_graph_us']:.1f} us ({row['replay_vs_raw']:.3f}x)"
    return text


def _plot(rows: list[dict[str, object]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nbatch {r['batch']}" for r in rows]
    replay = [float(r["speedup_replay"]) for r in rows]  # type: ignore[arg-type]
    call = [float(r["speedup_call"]) for r in rows]  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], replay, width=0.4, label="graph replay")
    ax.bar([i + 0.2 for i in xs], call, width=0.4, label="capture() call")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("speed-up over eager (x)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = out / "bench_aclgraph.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--backend", default="auto", help="auto, cpu, cuda or npu")
    parser.add_argument("--sizes", default="1,8,32", help="batch sizes of the Qwen3-0.6B shape")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the big model")
    parser.add_argument("--reps", type=int, default=0, help="timed calls per point (0: auto)")
    args = parser.parse_args(argv)
    backend = ag.get_backend(args.backend)
    if backend.name == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    big_reps = args.reps or (200 if backend.name != "cpu" else 9)
    small_reps = args.reps or (2000 if backend.name != "cpu" else 400)
    threads = torch.get_num_threads()
    header = (
        f"backend {backend.name} ({backend.device}), torch {torch.__version__}, "
        f"{threads} thread(s), medians"
    )
    print(header, flush=True)

    rows = bench_decoder(Qwen3Config.small(max_batch=16), [1], backend, small_reps)
    big = Qwen3Config.qwen3_0_6b(num_layers=args.layers, max_batch=max(sizes))
    rows += bench_decoder(big, sizes, backend, big_reps)
    overhead = bench_overhead(backend, small_reps * 2)
    print("per-call overhead on a trivial graph (x + 1, batch 1):", flush=True)
    for key, value in overhead.items():
        print(f"  {key:<30} {value:8.2f} us")
    plot = _plot(rows, args.out, header)
    results = {"header": header, "decoder": rows, "overhead": overhead}
    (args.out / "bench_aclgraph.json").write_text(json.dumps(results, indent=2))
    print(f"plot: {plot}\nresults: {args.out / 'bench_aclgraph.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
