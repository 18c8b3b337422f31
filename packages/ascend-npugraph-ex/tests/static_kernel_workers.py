"""Worker processes for test_static_kernel_race.py (spawned: they import this module by name).

The builder is cheap and slow on purpose: it writes its package in two halves with a pause in
between, so that concurrent builders overlap, and it logs every build to ``builds.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ascend_npugraph_ex import static_kernel
from ascend_npugraph_ex.static_kernel import BuildEnvironment, StaticKernelCache
from torch import fx

ENVIRONMENT = BuildEnvironment(
    machine="x86_64",
    cpu_capability="AVX2",
    cpu_flags=("avx", "avx2", "fma"),
    compiler="/usr/bin/g++",
    compiler_version="g++ (Debian 12.2.0-14) 12.2.0",
)


class SlowBuilder:
    """Writes ``built by <pid>`` as the package, taking ``pause`` seconds in the middle."""

    def __init__(self, log: Path, pause: float) -> None:
        self.log = log
        self.pause = pause

    def build(self, gm: fx.GraphModule, example_inputs: Sequence[Any], package: Path) -> None:
        with self.log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        with package.open("wb") as f:
            f.write(b"built by ")
            f.flush()
            time.sleep(self.pause)
            f.write(str(os.getpid()).encode())

    def load(self, package: Path) -> Callable[..., Any]:
        content = package.read_text()
        if not content.startswith("built by ") or content == "built by ":
            raise AssertionError(f"loaded a half-written package: {content!r}")
        return lambda *args: content


def graph() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))


def build_or_load(build_dir: str, barrier: Any, result: str, pause: float, lock: bool) -> None:
    """One rank: wait for all, then load or build the same key; write what happened."""
    if not lock:
        # A filesystem without flock: only the rename-if-absent publish protects the entry.
        static_kernel._exclusive = lambda path: contextlib.nullcontext()  # type: ignore[assignment]
    cache = StaticKernelCache(
        build_dir,
        salt="race",
        environment=ENVIRONMENT,
        builder=SlowBuilder(Path(build_dir).parent / "builds.log", pause),
    )
    gm, inputs = graph(), [torch.ones(4)]
    barrier.wait()
    run = cache.load_or_build(gm, inputs)
    Path(result).write_text(
        json.dumps(
            {"built": cache.built, "loaded": cache.loaded, "output": run(), "pid": os.getpid()}
        )
    )
