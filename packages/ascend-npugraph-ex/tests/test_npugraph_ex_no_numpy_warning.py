"""Importing the package prints no warning, in particular not torch's "Failed to initialize NumPy".

torch does not depend on numpy, yet ``import torch`` warns when numpy is missing, so this
package declares numpy itself (not only through ascend-aclgraph). ascend-aclgraph's
test_no_numpy_warning.py shows that hiding numpy does produce the warning.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
DIST = "ascend-npugraph-ex"


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


def test_numpy_is_a_declared_dependency() -> None:
    declared = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "numpy" in _unconditional_requirement_names(declared)


def test_numpy_is_in_the_installed_metadata() -> None:
    installed = importlib.metadata.requires(DIST) or []
    assert "numpy" in _unconditional_requirement_names(installed), (
        f"the installed {DIST} metadata does not require numpy: {installed}. If pyproject.toml "
        f"does, reinstall the package (pip install -e packages/{DIST})."
    )


def test_import_prints_no_warning() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import ascend_npugraph_ex"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NumPy" not in proc.stderr
    assert proc.stderr == ""
