"""Static kernels: ahead-of-time compiled, fixed-shape versions of optimized graphs, cached on disk.

On an NPU this is npugraph_ex's ``static_kernel_compile`` (aclnn static-shape kernels). On CUDA
and CPU the equivalent is an AOTInductor package of the optimized aten graph for its exact input
shapes (``torch._inductor.aoti_compile_and_package``). Each package sits in
``<build_dir>/<key>/`` with a ``manifest.json`` that records the key and the package's SHA-256;
the key hashes the graph code, the input shapes/dtypes/strides, the pass-manager hash and the
torch version. An entry whose manifest is missing, foreign or does not match its package is
rebuilt with a warning, never loaded blindly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ascend_npugraph_ex.errors import StaticKernelCacheError

__all__ = ["MANIFEST", "START_MESSAGE", "StaticKernelCache", "default_build_dir"]

logger = logging.getLogger(__name__)

START_MESSAGE = "Starting static kernel compilation, the build directory is {path}"
MANIFEST = "manifest.json"
_FORMAT = 1
_PACKAGE = "kernel.pt2"


def default_build_dir() -> Path:
    """``$NPUGRAPH_EX_BUILD_DIR``, else ``~/.cache/ascend_npugraph_ex/static_kernels``."""
    env = os.environ.get("NPUGRAPH_EX_BUILD_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "ascend_npugraph_ex" / "static_kernels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _real_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """Concrete tensors shaped like (possibly fake) example inputs, for export."""
    out: list[Any] = []
    for t in example_inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        if any(not isinstance(s, int) for s in (*t.shape, *t.stride())):
            raise StaticKernelCacheError(
                "static_kernel needs static shapes, but this graph has symbolic sizes; compile "
                "with torch.compile(..., dynamic=False)"
            )
        real = torch.empty_strided(
            tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device
        )
        out.append(real.zero_() if real.is_floating_point() else real.fill_(0))
    return out


class StaticKernelCache:
    """Builds or loads AOT-compiled static-shape kernels for optimized graphs.

    Args:
        build_dir: the cache directory.
        salt: extra key material, e.g. the pass manager's ``uuid()``.
    """

    def __init__(self, build_dir: str | Path | None = None, salt: str = "") -> None:
        self.build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
        self.salt = salt
        self.built = 0
        self.loaded = 0

    def key(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str:
        """The cache key of ``gm`` specialised to ``example_inputs``."""
        h = hashlib.sha256()
        h.update(gm.code.encode())
        for t in example_inputs:
            if isinstance(t, torch.Tensor):
                h.update(f"{tuple(t.shape)}|{tuple(t.stride())}|{t.dtype}|{t.device.type}".encode())
            else:
                h.update(repr(t).encode())
        h.update(self.salt.encode())
        h.update(torch.__version__.encode())
        return h.hexdigest()[:32]

    def _valid(self, entry: Path, key: str) -> bool:
        manifest = entry / MANIFEST
        try:
            meta = json.loads(manifest.read_text())
            return bool(
                meta.get("format") == _FORMAT
                and meta.get("key") == key
                and meta.get("torch") == torch.__version__
                and meta.get("sha256") == _sha256(entry / _PACKAGE)
            )
        except (OSError, ValueError, AttributeError):
            return False

    def load_or_build(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any]
    ) -> Callable[..., Any]:
        """A callable running the static kernel of ``gm`` for these input shapes."""
        key = self.key(gm, example_inputs)
        entry = self.build_dir / key
        if entry.exists():
            if self._valid(entry, key):
                self.loaded += 1
                return self._load(entry)
            warnings.warn(
                f"npugraph_ex: static kernel cache entry {entry} is corrupt or was written for "
                "another graph/torch; rebuilding it",
                stacklevel=2,
            )
            shutil.rmtree(entry, ignore_errors=True)
        message = START_MESSAGE.format(path=self.build_dir)
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
        self._build(gm, example_inputs, entry, key)
        self.built += 1
        return self._load(entry)

    def _build(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], entry: Path, key: str
    ) -> None:
        self.build_dir.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp dir and rename: a crash never leaves a half-written entry.
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.build_dir))
        try:
            args = tuple(_real_inputs(example_inputs))
            with torch.no_grad():
                exported = torch.export.export(gm, args, strict=False)
                torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp / _PACKAGE))
            manifest = {
                "format": _FORMAT,
                "key": key,
                "torch": torch.__version__,
                "sha256": _sha256(tmp / _PACKAGE),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _load(self, entry: Path) -> Callable[..., Any]:
        runner = torch._inductor.aoti_load_package(str(entry / _PACKAGE))

        def run(*args: Any) -> Any:
            return runner(*args)

        return run
