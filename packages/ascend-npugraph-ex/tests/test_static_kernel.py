"""Static kernels: AOT compile per static shape, cached on disk, validated before loading."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import ascend_npugraph_ex as nx
import pytest
import torch

W = torch.randn(64)


def _block(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    s = x + r
    h = s.pow(2).mean(-1, keepdim=True)
    y = W * (s * torch.rsqrt(h + 1e-6))
    return torch.nn.functional.silu(y) * s


def _run(build_dir: Path, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    torch._dynamo.reset()
    backend = nx.make_backend(force_eager=True, static_kernel=True, build_dir=str(build_dir))
    fn = torch.compile(_block, backend=backend, dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = fn(x, r)
    return out, [str(w.message) for w in caught]


def test_static_kernel_compiles_once_then_reuses_and_rebuilds_corrupt(
    build_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x, r = torch.randn(4, 64), torch.randn(4, 64)
    expected = _block(x, r)
    start = nx.START_MESSAGE.format(path=build_dir)

    with caplog.at_level(logging.WARNING, logger="ascend_npugraph_ex"):
        out, msgs = _run(build_dir, x, r)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert start in msgs
    assert start in caplog.text
    entries = [p for p in build_dir.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert (entries[0] / "manifest.json").is_file()

    # Second compile of the same graph and shapes: loaded silently.
    out, msgs = _run(build_dir, x, r)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not any("static kernel" in m for m in msgs)

    # A foreign manifest (another key) is never loaded: it is rebuilt with a warning.
    manifest = entries[0] / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["key"] = "0" * 32
    manifest.write_text(json.dumps(meta))
    out, msgs = _run(build_dir, x, r)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert any("corrupt or was written for another" in m for m in msgs)
    assert start in msgs
    assert json.loads(manifest.read_text())["key"] != "0" * 32


def test_corrupt_package_detected_by_checksum(tmp_path: Path) -> None:
    cache = nx.StaticKernelCache(tmp_path)
    entry = tmp_path / "k"
    entry.mkdir()
    (entry / "kernel.pt2").write_bytes(b"not a package")
    (entry / "manifest.json").write_text(
        json.dumps({"format": 1, "key": "k", "torch": torch.__version__, "sha256": "0" * 64})
    )
    assert not cache._valid(entry, "k")
    (entry / "manifest.json").write_text("{not json")
    assert not cache._valid(entry, "k")
