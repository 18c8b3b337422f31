"""Backend selection for the conformance suite.

``--backend=all`` (default) runs every backend test on each backend that can run here: cpu
always, cuda on a CUDA GPU, npu where torch_npu sees an NPU. ``--backend=cuda`` (say) asks for
one explicitly; if it cannot run, its tests are skipped with the reason, never silently.
"""

from __future__ import annotations

import pytest
import torch
from ascend_aclgraph import available_backends, get_backend
from ascend_aclgraph.backends import BACKEND_NAMES, GraphBackend
from ascend_aclgraph.errors import BackendUnavailableError


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        default="all",
        help="comma list of graph backends to test (npu, cuda, cpu), or 'all' (default)",
    )


def _requested(config: pytest.Config) -> list[str]:
    value = config.getoption("--backend")
    if value == "all":
        return list(BACKEND_NAMES)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in BACKEND_NAMES]
    if bad:
        raise pytest.UsageError(
            f"--backend: unknown {bad}; accepted: all, {', '.join(BACKEND_NAMES)}"
        )
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _requested(metafunc.config), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> GraphBackend:
    name = request.param
    if name not in available_backends():
        try:
            get_backend(name)
        except BackendUnavailableError as exc:
            pytest.skip(f"{name} backend unavailable here: {exc}")
    return get_backend(name)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
