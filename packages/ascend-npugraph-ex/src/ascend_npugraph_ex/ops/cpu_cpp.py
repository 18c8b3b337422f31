"""Builds and loads the C++ CPU kernels (``csrc/fused_cpu.cpp``) on first use.

The source is compiled once per (source, torch version, compiler, flags) with the system C++
compiler, straight from the command line (no ninja or setuptools needed), into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), and loaded with ctypes. A
build takes ~20-30 s on two cores; later processes only load the cached library.

If ``ASCEND_NPUGRAPH_EX_NO_CPP=1`` is set, no compiler is found or the build fails, :func:`load`
warns once and returns False, and the Python composites of :mod:`.cpu` stay in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["ENV_DISABLE", "SOURCE", "build", "cache_dir", "load"]

log = logging.getLogger(__name__)

ENV_DISABLE = "ASCEND_NPUGRAPH_EX_NO_CPP"
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "fused_cpu.cpp"
# -ffp-contract=off: no FMA contraction, so RoPE rounds exactly where the unfused ops do.
_CFLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off")
_BUILD_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Where built libraries live: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torch_extensions"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _command(cxx: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    openmp: bool = torch.backends.openmp.is_available()  # type: ignore[no-untyped-call]
    parallel = ["-fopenmp"] if openmp else []
    return [
        cxx,
        *_CFLAGS,
        *parallel,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        str(SOURCE),
        "-o",
        str(out),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]


def _library_path(cxx: str) -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(repr((torch.__version__, sys.platform, cxx, _CFLAGS)).encode())
    return cache_dir() / f"ascend_npugraph_ex_cpu_{key.hexdigest()[:16]}" / "fused_cpu.so"


def build() -> Path:
    """The path of the built library, compiling it first unless cached. Raises on failure."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the C++ CPU kernels are built on Linux only, not {sys.platform}")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')})")
    path = _library_path(cxx)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("npugraph_ex: building the C++ CPU kernels into %s (once)", path)
    # Build beside the target, then rename: concurrent builders never see a partial file.
    fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        proc = subprocess.run(
            _command(cxx, tmp),
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"compiler exited with {proc.returncode}:\n{tail}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_loaded: bool | None = None


def load() -> bool:
    """Build (if needed) and register the C++ CPU kernels; False, with a warning, if unavailable.

    Needs :mod:`ascend_npugraph_ex.ops.library` imported (it defines the ops). The answer is
    computed once per process.
    """
    global _loaded
    if _loaded is None:
        _loaded = _try_load()
    return _loaded


def _try_load() -> bool:
    if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        log.info("npugraph_ex: %s is set: CPU fused ops use the Python composites", ENV_DISABLE)
        return False
    try:
        lib = ctypes.PyDLL(str(build()))
        if lib.npugraph_ex_register_cpu_kernels() != 0:
            raise RuntimeError("registering the kernels with the dispatcher failed")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        msg = (
            f"npugraph_ex: C++ CPU kernels unavailable ({e}); the CPU fused ops use the Python "
            f"composites (slower at decode sizes). Set {ENV_DISABLE}=1 to skip the build."
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return False
    return True
