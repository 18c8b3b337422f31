"""Cross-package tests: the whole stack, one graph mode and one backend at a time.

``--backend`` picks the device backend (cpu, cuda, npu); one that cannot run here is skipped
with the reason, never silently.
"""

from __future__ import annotations

import pytest
from ascend_aclgraph import available_backends, get_backend
from ascend_aclgraph.backends import BACKEND_NAMES, GraphBackend
from ascend_aclgraph.errors import BackendUnavailableError


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", default="cpu", help=f"one of {', '.join(BACKEND_NAMES)}")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> GraphBackend:
    name = request.config.getoption("--backend")
    if name not in BACKEND_NAMES:
        raise pytest.UsageError(
            f"--backend must be one of {', '.join(BACKEND_NAMES)}, not {name!r}"
        )
    if name not in available_backends():
        try:
            get_backend(name)
        except BackendUnavailableError as exc:
            pytest.skip(f"{name} backend unavailable here: {exc}")
    return get_backend(name)
