"""npugraph_ex benchmark: fused vs unfused per op, fusion effect per layer, step time.

Prints a table and saves a plot under --out. CPU timings are medians over repeated runs, taken
on however many threads the caller allows (the nox session pins 1 thread and says so). The
per-op table also prints each op's copy floor: a dst.copy_(src) moving the bytes the op reads
and writes, the floor of a kernel that reads and writes memory once; then the op and that copy
again, each called from C++ through the dispatcher as a FULL graph's native replay calls them
(without Python's per-call cost, which dominates at decode sizes); then ATen's own a * b and
silu against a copy of their bytes: the arithmetic floor where that, not memory, bounds an op.
On a CUDA GPU it also measures fused add_rms_norm bandwidth against a device copy and the step
time against torch.compile(mode="reduce-overhead").
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ascend_npugraph_ex as nx
import torch


def qwen3(layers: int, hidden: int, device: str) -> torch.nn.Module:
    import transformers

    cfg = transformers.Qwen3Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(hidden // 64, 1),
        head_dim=32,
        intermediate_size=hidden * 2,
        vocab_size=1024,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval().to(device)


def median_us(fn: Callable[[], Any], iters: int, sync: Callable[[], None]) -> float:
    for _ in range(max(iters // 5, 3)):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def per_layer_counts(hidden: int, device: str) -> dict[str, float]:
    """Graph nodes and kernel launches per decoder layer, before and after fusion (2 layers - 1).

    A launch is an op node that is not a view/alias: one device kernel each (a fused op is one
    launch on npu/cuda; its CPU kernel runs a few aten ops internally).
    """
    out: dict[str, dict[int, float]] = {}
    ids = torch.randint(0, 1024, (4, 1), device=device)
    for layers in (1, 2):
        model = qwen3(layers, hidden, device)
        torch._dynamo.reset()
        backend = nx.make_backend(force_eager=True)
        fn = torch.compile(
            lambda i, m=model: m(i, use_cache=False).logits, backend=backend, dynamic=False
        )
        with torch.no_grad():
            fn(ids)
        rep = backend.reports[0]
        for key in ("nodes_before", "nodes_after", "launches_before", "launches_after"):
            out.setdefault(key, {})[layers] = getattr(rep, key)
    return {k: v[2] - v[1] for k, v in out.items()}


def step_times(layers: int, hidden: int, batch: int, iters: int, device: str) -> dict[str, float]:
    model = qwen3(layers, hidden, device)
    ids = torch.randint(0, 1024, (batch, 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(i: torch.Tensor) -> torch.Tensor:
        return model(i, use_cache=False).logits

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager": step}
    torch._dynamo.reset()
    variants["npugraph_ex (force_eager)"] = torch.compile(
        step, backend=nx.make_backend(force_eager=True), dynamic=False
    )
    variants["npugraph_ex + aclgraph"] = torch.compile(
        step, backend=nx.make_backend(capture_backend=device), dynamic=False
    )
    if device == "cuda":
        variants["torch.compile reduce-overhead"] = torch.compile(
            step, mode="reduce-overhead", dynamic=False
        )
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        ref = step(ids)
        for fn in variants.values():
            torch.testing.assert_close(fn(ids), ref, atol=1e-4, rtol=1e-4)
            for _ in range(10):
                fn(ids)
        # Round-robin over the variants so that machine noise hits them all alike.
        for _ in range(iters):
            for name, fn in variants.items():
                sync()
                t0 = time.perf_counter()
                fn(ids)
                sync()
                samples[name].append((time.perf_counter() - t0) * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def _timer() -> tuple[Callable[[], int], str]:
    """The clock of the per-op table, in ns, and its name.

    On one thread, the CPU time of the calling thread: on a shared machine, time this process
    spends descheduled by other load does not count (cache and memory contention still do).
    With more threads, wall time (the calling thread's CPU time would miss the workers').
    """
    if torch.get_num_threads() == 1:
        return time.thread_time_ns, "CPU time of the calling thread"
    return time.perf_counter_ns, "wall time"


def _round_robin(
    variants: dict[str, Callable[[], Any]], iters: int, clock: Callable[[], int]
) -> dict[str, float]:
    """Median microseconds per call of each variant.

    A sample times a block of calls of ~100 us, not one call: reading a clock is a system call
    on some VMs (0.6-2 us here), which would otherwise be a large, equal part of every decode-size
    sample. Blocks of the variants are interleaved round-robin so that noise hits them alike.
    """
    block: dict[str, int] = {}
    for name, fn in variants.items():
        for _ in range(max(iters // 10, 5)):
            fn()
        t0 = clock()
        for _ in range(5):
            fn()
        per_call_ns = max((clock() - t0) / 5, 1.0)
        block[name] = max(1, min(1000, round(100_000 / per_call_ns)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(iters):
        for name, fn in variants.items():
            n = block[name]
            t0 = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - t0) / n / 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def _copy_buffers(
    args: tuple[Any, ...], outputs: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, src) for ``dst.copy_(src)`` moving as many bytes as the op reads and writes (inputs
    and outputs once each): the time a kernel that reads and writes memory once cannot beat."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += list(outputs) if isinstance(outputs, tuple) else [outputs]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    numel = nbytes // 2 // torch.empty((), dtype=dtype).element_size()
    src = torch.randn(numel).to(dtype)
    return torch.empty_like(src), src


def _native_call(
    op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> Callable[[], Any] | None:
    """One call of ``op`` made from C++ through the dispatcher, its result dropped: how the cpu
    twin's native replay calls each op of a FULL graph, with no Python per call. None where
    ascend_aclgraph's replay extension is not built here."""
    from ascend_aclgraph.twin import native

    module = native.load()
    if module is None:
        return None
    replay = module.NativeReplay()
    replay.add_op(op._schema.name, op._schema.overload_name, args, kwargs or {}, [])
    run: Callable[[], Any] = replay.run
    return run


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, as tcmalloc or jemalloc do.

    With glibc's defaults, a multi-MB tensor freed next to other large frees is trimmed back to
    the OS, and the next allocation of that size faults every page in again: ~1-3 us a page on
    this VM, 0.5-1 ms per 2 MB prefill output, more than the kernel itself. How often that
    happens depends on what else allocated in between (in this table, on the unfused variant),
    so without this the prefill cells time glibc, not the kernels. Both variants benefit; the
    copy floor reuses its buffer anyway. False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB: glibc's largest mmap threshold (larger tensors are still mapped and unmapped).
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


# Ops that read each input and write each output once: a copy of the same bytes is their floor.
_STREAMING = ("rms_norm", "add_rms_norm", "swiglu")


def op_table(
    tokens: int, iters: int, dtype: torch.dtype, decode: bool, clock: Callable[[], int]
) -> list[tuple[str, float, float, float, float, float]]:
    """(op, fused us, unfused us, copy floor us, fused us and copy us called from C++) per fused
    op on CPU: Qwen3-like hidden 1024,
    16 q / 8 kv heads of 128, intermediate 3072; ``tokens`` rows (batch x 1 at decode, one
    sequence at prefill)."""
    from ascend_npugraph_ex.ops import reference as ref

    torch.manual_seed(0)
    hidden, heads, kv, dim, inter = 1024, 16, 8, 128, 3072

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).to(dtype)

    x, res, w = r(tokens, hidden), r(tokens, hidden), r(hidden)
    gate, up = r(tokens, inter), r(tokens, inter)
    # Decode: [B, 1, H, D] -> [B, H, 1, D]; prefill: [1, S, H, D] -> [1, H, S, D] (HF layouts).
    b, s = (tokens, 1) if decode else (1, tokens)
    q, k = r(b, s, heads, dim).transpose(1, 2), r(b, s, kv, dim).transpose(1, 2)
    qn, kn = r(b, s, heads, dim), r(b, s, kv, dim)  # qk_norm_rope: before the transpose
    cos, sin = r(b, 1, s, dim), r(b, 1, s, dim)
    cos_t, sin_t = cos.transpose(1, 2), sin.transpose(1, 2)
    qw, kw = r(dim), r(dim)
    cases: dict[str, tuple[tuple[Any, ...], Callable[..., Any]]] = {
        "rms_norm": ((x, w, 1e-6), ref.rms_norm_ref),
        "add_rms_norm": ((x, res, w, 1e-6), ref.add_rms_norm_ref),
        "swiglu": ((gate, up), ref.swiglu_ref),
        "rotary": ((q, k, cos, sin), ref.rotary_ref),
        "qk_norm_rope": ((qn, kn, qw, kw, 1e-6, cos_t, sin_t), ref.qk_norm_rope_ref),
    }
    rows = []
    with torch.no_grad():
        for name, (args, unfused) in cases.items():
            op = nx.fused_op(name)  # the OpOverload, as an FX graph calls it
            dst, src = _copy_buffers(args, op(*args), dtype)
            variants: dict[str, Callable[[], Any]] = {
                "fused": lambda op=op, args=args: op(*args),
                "unfused": lambda unfused=unfused, args=args: unfused(*args),
                "copy": lambda dst=dst, src=src: dst.copy_(src),
            }
            fused_cpp = _native_call(op, args)
            copy_cpp = _native_call(torch.ops.aten.copy_.default, (dst, src))
            if fused_cpp is not None and copy_cpp is not None:
                variants["fused C++"], variants["copy C++"] = fused_cpp, copy_cpp
            t = _round_robin(variants, iters, clock)
            nan = float("nan")
            rows.append(
                (
                    name,
                    t["fused"],
                    t["unfused"],
                    t["copy"],
                    t.get("fused C++", nan),
                    t.get("copy C++", nan),
                )
            )
    return rows


def print_op_table(
    decode_tokens: int, prefill_tokens: int, iters: int, malloc_defaults: bool = False
) -> None:
    from ascend_npugraph_ex.ops import cpu_cpp
    from ascend_npugraph_ex.ops.library import cpu_kernels

    x = torch.randn(1, 8)
    nx.fused_op("rms_norm")(x, torch.ones(8), 1e-6)  # picks (and if needed builds) the kernels
    kernels = cpu_kernels()
    if kernels == "cpp":
        kernels = f"cpp kernels, {cpu_cpp.capability()} loops"
    clock, clock_name = _timer()
    kept = False if malloc_defaults else keep_freed_memory()
    print(
        f"\nFused op vs the unfused aten ops, cpu ({kernels}), hidden 1024, 16/8 heads x 128, "
        f"median us per call ({clock_name}; decode {iters} samples, prefill "
        f"{max(iters // 20, 20)}). copy: dst.copy_(src) of the bytes the op reads and writes; "
        "* marks the ops that read and write memory once, whose floor that copy is. "
        "C++: the op and the copy called from C++ through the dispatcher, as a FULL graph's "
        "native replay calls them (no Python per call; n/a where that extension is not built). "
        + (
            "glibc malloc keeps freed memory (see keep_freed_memory; --malloc-defaults not to):"
            if kept
            else "Allocator defaults:"
        )
    )
    print(
        f"  {'op':14}{'size':>16}{'dtype':>10}{'fused':>10}{'unfused':>10}{'speedup':>9}"
        f"{'copy':>9}{'vs copy':>9}{'C++ op':>9}{'C++ copy':>10}{'vs copy':>9}"
    )
    for label, tokens, n, decode in (
        (f"decode {decode_tokens}x1", decode_tokens, iters, True),
        (f"prefill {prefill_tokens}", prefill_tokens, max(iters // 20, 20), False),
    ):
        for dtype in (torch.float32, torch.bfloat16):
            for name, fused, unfused, copy, fused_cpp, copy_cpp in op_table(
                tokens, n, dtype, decode, clock
            ):
                dt = str(dtype).removeprefix("torch.")
                mark = "*" if name in _STREAMING else " "
                print(
                    f"  {name + mark:14}{label:>16}{dt:>10}{fused:10.1f}{unfused:10.1f}"
                    f"{unfused / fused:8.2f}x{copy:9.1f}{fused / copy:8.2f}x"
                    f"{fused_cpp:9.1f}{copy_cpp:10.1f}{fused_cpp / copy_cpp:8.2f}x"
                )
    # What a call costs before any data moves: at decode sizes most of the gap to the copy.
    small, w8, dst = torch.randn(8), torch.ones(8), torch.empty(8)
    op = nx.fused_op("rms_norm")
    t = _round_robin(
        {"op": lambda: op(small, w8, 1e-6), "copy": lambda: dst.copy_(small)}, iters, clock
    )
    print(
        f"  call floor (8 elements): fused op {t['op']:.1f} us, Tensor.copy_ {t['copy']:.1f} us "
        "(a custom op called from Python parses its schema and allocates its output)"
    )
    # What arithmetic costs ATen itself, against a copy of the bytes it moves: one bf16 multiply
    # rounds once (the bf16 norms round twice per element, as the unfused ops do), silu is one
    # exp per element (swiglu's, the same SLEEF exp, so that fused equals unfused bitwise). Where
    # these are well above 1x, arithmetic, not memory, is the floor of the fused op too.
    native = _native_call(torch.ops.aten.copy_.default, (torch.zeros(1), torch.zeros(1)))
    how = "called from C++" if native is not None else "called from Python"
    print(f"  ATen's own ops into a preallocated output, {how}, against a copy of their bytes:")
    for label, tokens, n in (
        (f"decode {decode_tokens}x1", decode_tokens, iters),
        (f"prefill {prefill_tokens}", prefill_tokens, max(iters // 20, 20)),
    ):
        for name, width in (("a * b", 1024), ("silu(a)", 3072)):
            for dtype in (torch.float32, torch.bfloat16):
                op_us, copy = _aten_op_vs_copy(name, tokens, width, dtype, n, clock)
                print(
                    f"    {name:8} {label:>12} x {width:<5}{str(dtype)[6:]:>9}: {op_us:7.1f} us, "
                    f"{op_us / copy:.2f}x the copy"
                )


def _aten_op_vs_copy(
    name: str, tokens: int, width: int, dtype: torch.dtype, iters: int, clock: Callable[[], int]
) -> tuple[float, float]:
    """Median us of ATen's ``a * b`` or ``silu(a)`` into a preallocated output, and of a copy of
    the bytes it reads and writes; both called from C++ where the replay extension is built."""
    a, b = torch.randn(tokens, width).to(dtype), torch.randn(tokens, width).to(dtype)
    out = torch.empty_like(a)
    aten = torch.ops.aten
    op, inputs = (aten.mul.out, (a, b)) if name == "a * b" else (aten.silu.out, (a,))
    dst, src = _copy_buffers(inputs, out, dtype)
    run = _native_call(op, inputs, {"out": out}) or functools.partial(op, *inputs, out=out)
    copy = _native_call(aten.copy_.default, (dst, src)) or functools.partial(dst.copy_, src)
    t = _round_robin({"op": run, "copy": copy}, iters, clock)
    return t["op"], t["copy"]


def cuda_bandwidth(rows: int, hidden: int) -> dict[str, float]:
    """Fused add_rms_norm effective bandwidth as a fraction of a device copy's."""
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    op = nx.fused_op("add_rms_norm")
    sync = torch.cuda.synchronize
    t_op = median_us(lambda: op(x, r, w, 1e-6), 200, sync)
    dst = torch.empty_like(x)
    t_copy = median_us(lambda: dst.copy_(x), 200, sync)
    nbytes = x.numel() * x.element_size()
    bw_op = 4 * nbytes / t_op / 1e3  # read x, r; write y, s  (GB/s)
    bw_copy = 2 * nbytes / t_copy / 1e3
    return {"add_rms_norm GB/s": bw_op, "copy GB/s": bw_copy, "fraction": bw_op / bw_copy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--op-iters", type=int, default=2000, help="reps per op at decode size")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the prefill op table")
    p.add_argument("--ops-only", action="store_true", help="only the per-op table")
    p.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds alone (prefill outputs may page-fault each call)",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    print(
        f"npugraph_ex benchmark - torch {torch.__version__}, CPU threads: {threads}; "
        "times are medians"
    )
    print_op_table(args.batch, args.prefill, args.op_iters, args.malloc_defaults)
    if args.ops_only:
        return

    counts = per_layer_counts(args.hidden, "cpu")
    print("\nPer Qwen3 decoder layer (2-layer minus 1-layer graph, cpu):")
    print(f"  {'':24}{'before':>10}{'after':>10}")
    for label, key in (("FX call nodes", "nodes"), ("kernel launches", "launches")):
        before, after = counts[f"{key}_before"], counts[f"{key}_after"]
        print(f"  {label:24}{before:>10.0f}{after:>10.0f}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    all_times: dict[str, dict[str, float]] = {}
    for device in devices:
        times = step_times(args.layers, args.hidden, args.batch, args.iters, device)
        all_times[device] = times
        print(
            f"\nSingle-token step, {device}: Qwen3 {args.layers} layers, hidden {args.hidden}, "
            f"batch {args.batch} x 1 token, no KV cache (median of {args.iters}):"
        )
        base = times["eager"]
        for name, us in times.items():
            print(f"  {name:34}{us:10.1f} us   {base / us:5.2f}x vs eager")
    if torch.cuda.is_available():
        bw = cuda_bandwidth(4096, 4096)
        print(
            f"\nCUDA add_rms_norm: {bw['add_rms_norm GB/s']:.0f} GB/s vs copy "
            f"{bw['copy GB/s']:.0f} GB/s = {bw['fraction']:.0%} (target >= 80%)"
        )
    else:
        print(
            "\nCUDA bandwidth and reduce-overhead comparison: skipped (no CUDA GPU on this machine)"
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 1 + len(all_times), figsize=(5 * (1 + len(all_times)), 4))
    ax = axes[0]
    keys = ["nodes_before", "nodes_after", "launches_before", "launches_after"]
    ax.bar([k.replace("_", "\n") for k in keys], [counts[k] for k in keys])
    ax.set_title("per Qwen3 decoder layer")
    for ax, (device, times) in zip(axes[1:], all_times.items(), strict=True):
        ax.barh(list(times), list(times.values()))
        ax.set_xlabel("median step time (us)")
        ax.set_title(f"{device} ({threads} thread(s))" if device == "cpu" else device)
    fig.tight_layout()
    path = args.out / "npugraph_ex.png"
    fig.savefig(path, dpi=120)
    print(f"\nplot saved to {path}")


if __name__ == "__main__":
    main()
