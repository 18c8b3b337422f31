"""Static-kernel cache entries under concurrent builders, and what the cache key covers.

Tensor-parallel ranks compile the same graph for the same shapes at the same time, into one
build directory. Renaming a finished build onto an entry another rank had just published failed
with ENOTEMPTY and crashed that rank. The builder here is cheap (see static_kernel_workers.py);
test_static_kernel.py builds real AOTInductor packages through the same publish path.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from ascend_npugraph_ex.static_kernel import START_MESSAGE, BuildEnvironment, StaticKernelCache
from static_kernel_workers import ENVIRONMENT, SlowBuilder, build_or_load, graph

RANKS = 3


def _race(tmp_path: Path, *, lock: bool, pause: float = 1.0) -> tuple[list[dict], list[str]]:
    build_dir = tmp_path / "static_kernels"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RANKS)
    results = [tmp_path / f"rank{i}.json" for i in range(RANKS)]
    procs = [
        ctx.Process(target=build_or_load, args=(str(build_dir), barrier, str(r), pause, lock))
        for r in results
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * RANKS, "a rank crashed (see its stderr above)"
    builds = (tmp_path / "builds.log").read_text().split()
    return [json.loads(r.read_text()) for r in results], builds


def _check_entry(build_dir: Path, outputs: set[str]) -> None:
    """One valid entry, whose package is the one every rank loaded."""
    cache = StaticKernelCache(build_dir, salt="race", environment=ENVIRONMENT)
    key = cache.key(graph(), [torch.ones(4)])
    entries = [p.name for p in build_dir.iterdir() if not p.name.startswith(".")]
    assert entries == [key]
    assert cache._valid(build_dir / key, key)
    assert outputs == {(build_dir / key / "kernel.pt2").read_text()}
    # No temp or discarded directories are left behind (the lock file may stay).
    assert {p.name for p in build_dir.iterdir()} - {f".{key}.lock"} == {key}


def test_concurrent_ranks_build_once_and_all_load_the_entry(tmp_path: Path) -> None:
    results, builds = _race(tmp_path, lock=True)
    assert len(builds) == 1, "the lock should let exactly one rank build"
    assert sorted(r["built"] for r in results) == [0] * (RANKS - 1) + [1]
    assert sorted(r["loaded"] for r in results) == [0] + [1] * (RANKS - 1)
    _check_entry(tmp_path / "static_kernels", {r["output"] for r in results})


def test_concurrent_ranks_without_a_lock_reuse_the_first_published_entry(tmp_path: Path) -> None:
    """No flock (some network filesystems): every rank builds, one entry wins, none crashes."""
    results, builds = _race(tmp_path, lock=False)
    assert len(builds) == RANKS
    assert all(r["built"] == 1 for r in results)
    _check_entry(tmp_path / "static_kernels", {r["output"] for r in results})


def test_stale_entry_is_discarded_and_rebuilt(tmp_path: Path) -> None:
    cache = StaticKernelCache(
        tmp_path, environment=ENVIRONMENT, builder=SlowBuilder(tmp_path / "log", 0)
    )
    key = cache.key(graph(), [torch.ones(4)])
    (tmp_path / key).mkdir()
    (tmp_path / key / "kernel.pt2").write_text("built by an older torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = cache.load_or_build(graph(), [torch.ones(4)])
    messages = [str(w.message) for w in caught]
    assert any("corrupt or was written for another" in m for m in messages)
    assert START_MESSAGE.format(path=tmp_path) in messages
    assert run().startswith("built by ")
    assert run() != "built by an older torch"
    assert cache.built == 1
    assert cache._valid(tmp_path / key, key)


@pytest.mark.parametrize(
    "change",
    [
        {"cpu_capability": "AVX512"},
        {"cpu_flags": ("avx", "avx2", "avx512f", "fma")},
        {"machine": "aarch64"},
        {"compiler": "/usr/bin/clang++"},
        {"compiler_version": "g++ (Debian 13.1.0-1) 13.1.0"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_key_covers_cpu_isa_and_compiler(change: dict, tmp_path: Path) -> None:
    gm, inputs = graph(), [torch.ones(4)]
    base = StaticKernelCache(tmp_path, environment=ENVIRONMENT).key(gm, inputs)
    other_env = dataclasses.replace(ENVIRONMENT, **change)
    assert StaticKernelCache(tmp_path, environment=other_env).key(gm, inputs) != base
    assert StaticKernelCache(tmp_path, environment=ENVIRONMENT).key(gm, inputs) == base


def test_detected_environment_names_this_cpu_and_inductors_compiler() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH: nothing for the key to name")
    env = BuildEnvironment.detect()
    assert env.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert Path(env.compiler).is_file()
    assert env.compiler_version  # e.g. "g++ (Debian 12.2.0-14) 12.2.0"
    assert env is BuildEnvironment.detect()  # detected once per process
