"""A normal run prints no warning: in particular not torch's "Failed to initialize NumPy".

torch does not depend on numpy, yet ``import torch`` warns on stderr when numpy is missing. This
package therefore declares numpy as a dependency. The tests check the declaration (in
pyproject.toml and in the installed metadata, which is what pip acts on), that hiding numpy
really produces the warning (so the other checks can see it), and that the import, the CLI and
the demo print nothing on stderr with ``-W default``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
DIST = "ascend-aclgraph"
WARNING = "Failed to initialize NumPy"

# Makes numpy unimportable in the child, as in a virtualenv holding only torch and this package.
_HIDE_NUMPY = """
import sys

class _NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoNumpy())
"""


def _unconditional_requirement_names(requirements: list[str]) -> set[str]:
    # Requirements behind a marker (`; extra == "test"`) are not installed by a plain install.
    names = set()
    for req in requirements:
        if ";" in req:
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip())
        assert match is not None, f"unparsable requirement {req!r}"
        names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # -W default: show every warning category once per location, DeprecationWarning included.
    return subprocess.run(
        [sys.executable, "-W", "default", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


def test_numpy_is_a_declared_dependency() -> None:
    declared = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "numpy" in _unconditional_requirement_names(declared)


def test_numpy_is_in_the_installed_metadata() -> None:
    installed = importlib.metadata.requires(DIST) or []
    assert "numpy" in _unconditional_requirement_names(installed), (
        f"the installed {DIST} metadata does not require numpy: {installed}. If pyproject.toml "
        f"does, reinstall the package (pip install -e packages/{DIST})."
    )


def test_without_numpy_torch_warns() -> None:
    # Proves the need for the dependency and that the stderr checks below can see the warning.
    proc = _run("-c", _HIDE_NUMPY + "import ascend_aclgraph\n")
    assert proc.returncode == 0, proc.stderr
    assert WARNING in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-c", "import ascend_aclgraph"], id="import"),
        pytest.param(["-m", "ascend_aclgraph.cli", "explain", "--json"], id="cli"),
        pytest.param(["-m", "ascend_aclgraph.demo", "--requests", "1", "--tokens", "2"], id="demo"),
    ],
)
def test_normal_run_prints_no_warning(args: list[str]) -> None:
    # The twin's native replay loop says once that it compiles, on a machine that never built
    # it: build it here first, so the subprocess sees the normal run (a cached load).
    from ascend_aclgraph.twin import native

    native.load()
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    assert WARNING not in proc.stderr
    assert proc.stderr == ""
