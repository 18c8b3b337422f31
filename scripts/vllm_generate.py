"""One offline vLLM generation, run in its own process, reported as one JSON line.

The vLLM tests and the README's demo both run every graph mode through this script, so they
measure and compare the same way. Each run is a fresh process: vLLM keeps process-wide state
(its platform, compile caches, the engine), and a second ``LLM`` in one process is not how
anyone serves.

    python scripts/vllm_generate.py '{"model": DIR, "mode": "FULL_DECODE_ONLY"}'

The spec (a JSON object): ``model`` (a checkpoint directory), ``mode`` (a cudagraph_mode name,
or ``"eager"`` for ``enforce_eager=True``), and optionally ``prompts``, ``max_tokens``,
``capture_sizes``, ``max_num_seqs``, ``additional_config``, ``attention_backend``,
``dtype`` and the parallel settings ``tensor_parallel_size``, ``data_parallel_size`` and
``distributed_executor_backend`` (vLLM's engine arguments of those names), and
``kv_state_out``: a path where the KV-cache blocks the generation wrote are saved (per layer, the
ids of the blocks holding any non-zero value and their contents, ``torch.save``), so a test can
compare the state a graph mode writes with eager's. The last stdout line is
``RESULT {...}``: the greedy token ids per prompt, start-up seconds (``LLM()`` to ready), the
time to first token and ms per output token of a single-request run, and the worker's
``graph_report``. A failure to start prints ``ERROR {"type": ..., "message": ...}`` and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

DEFAULT_PROMPTS = [
    "def main():",
    "import os\nimport sys\n\nclass Config(object):\n    def __init__(self, path):",
    "hello",
    "for i in range(10):\n    total = total + i * i\nprint(total)",
]


def _engine_args(spec: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": spec["model"],
        "dtype": spec.get("dtype", "float32"),
        "max_model_len": spec.get("max_model_len", 256),
        "max_num_seqs": spec.get("max_num_seqs", 8),
        # The default fraction fails on these machines' NUMA report (DESIGN.md).
        "gpu_memory_utilization": 0.5,
        "seed": 0,
    }
    mode = spec["mode"]
    if mode == "eager":
        args["enforce_eager"] = True
    elif mode != "default":
        compilation: dict[str, Any] = {"cudagraph_mode": mode}
        if "capture_sizes" in spec:
            compilation["cudagraph_capture_sizes"] = spec["capture_sizes"]
        args["compilation_config"] = compilation
    if "additional_config" in spec:
        args["additional_config"] = spec["additional_config"]
    if "attention_backend" in spec:
        args["attention_config"] = {"backend": spec["attention_backend"]}
    for key in ("tensor_parallel_size", "data_parallel_size", "distributed_executor_backend"):
        if key in spec:
            args[key] = spec[key]
    return args


def written_kv_blocks(worker: Any) -> list[tuple[list[int], list[Any]]]:
    """Run in the worker (``collective_rpc``): per layer, the written blocks and their values.

    vLLM allocates KV caches zeroed, so a block with a non-zero value is one a step wrote. The
    values travel as nested lists (exact for float32).
    """
    out = []
    for cache in worker.model_runner.kv_caches:
        used = cache.flatten(1).ne(0).any(dim=1).nonzero().flatten()
        out.append((used.tolist(), cache[used].tolist()))
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if "kv_state_out" in spec:
        # collective_rpc with a function (written_kv_blocks) pickles it to the workers.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**_engine_args(spec))
    startup = time.perf_counter() - start

    prompts = spec.get("prompts", DEFAULT_PROMPTS)
    greedy = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 12))
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    # Counters of this batch alone, before the latency runs below add their own.
    reports = llm.collective_rpc("graph_report")
    if "kv_state_out" in spec:
        import torch

        torch.save(llm.collective_rpc(written_kv_blocks), spec["kv_state_out"])

    # Latency of one request alone: the first token (prefill) and the decode steps after it.
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True)
    if spec.get("latency", True):
        ttft = _median_seconds(lambda: llm.generate(prompts[1], one, use_tqdm=False))
        total = _median_seconds(lambda: llm.generate(prompts[1], many, use_tqdm=False))
    else:
        ttft = total = float("nan")
    return {
        "mode": spec["mode"],
        "tokens": tokens,
        "startup_s": startup,
        "ttft_ms": ttft * 1e3,
        "tpot_ms": (total - ttft) / 32 * 1e3,
        "reports": reports,
    }


def _median_seconds(fn: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> int:
    spec = json.loads(sys.argv[1])
    try:
        result = run(spec)
    except Exception as exc:  # reported to the parent, which decides what it means
        print("ERROR " + json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        return 1
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
