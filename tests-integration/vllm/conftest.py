"""Fixtures of the vLLM tests: the tiny local Qwen3, built once per session by the repo's script."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location(
        "build_tiny_model", ROOT / "scripts" / "build_tiny_model.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    # A cache directory the nox session keeps between runs, else a per-session temp dir.
    base = os.environ.get("ASCEND_TINY_MODEL_DIR")
    out = Path(base) if base else tmp_path_factory.mktemp("models") / "tiny-qwen3"
    path: Path = module.build_tiny_model(out, preset="tiny", seed=0)
    return path
