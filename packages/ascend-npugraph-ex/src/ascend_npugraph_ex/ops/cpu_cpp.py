"""Builds and loads the C++ CPU kernels (``csrc/fused_cpu*.cpp``) on first use.

The sources are compiled once per (sources, torch version, compiler, flags, vector ISA) with the
system C++ compiler, straight from the command line (no ninja or setuptools needed), into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), and loaded with ctypes. A
build takes ~20-30 s on two cores; later processes only load the cached library.

The row loops (``fused_cpu_kernels.cpp``) are compiled for the vector ISA ATen dispatches its
own CPU kernels to on this machine (:func:`capability`: ``AVX512``, ``AVX2`` or ``DEFAULT``, which
follows ``ATEN_CPU_CAPABILITY``), with ATen's flags and ``CPU_CAPABILITY`` macros for it, so that
``at::vec::Vectorized`` has ATen's width. That is not ``-march=native``: the flags are ATen's
fixed ISA levels, and the level is part of the cache key, so a library is only loaded on CPUs
that ATen itself runs that level on. The rest of the extension uses baseline flags.

If ``ASCEND_NPUGRAPH_EX_NO_CPP=1`` is set, no compiler is found or the build fails, :func:`load`
warns once and returns False, and the Python composites of :mod:`.cpu` stay in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["ENV_DISABLE", "SOURCES", "build", "cache_dir", "capability", "load"]

log = logging.getLogger(__name__)

ENV_DISABLE = "ASCEND_NPUGRAPH_EX_NO_CPP"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The registration and tensor glue (baseline flags), and the row loops (the ISA flags below).
SOURCE = _CSRC / "fused_cpu.cpp"
KERNELS_SOURCE = _CSRC / "fused_cpu_kernels.cpp"
SOURCES = (SOURCE, KERNELS_SOURCE, _CSRC / "fused_cpu_kernels.h")
# -O3: the RoPE loop is plain C++ that GCC vectorizes at -O3 only (at -O2 it measured 3-4x
# slower in float32, 10-15x in bfloat16; the at::vec loops ran the same at both). No -march:
# the ISA flags below. -ffp-contract=off: no FMA contraction, so RoPE rounds exactly where the
# unfused ops do (the norms' explicit fmadd is unaffected).
_CFLAGS = ("-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off")
# ATen's own flags per CPU capability (its cmake/Codegen.cmake), x86-64 only; -mf16c for the
# half conversions of at::vec (every AVX2 CPU has F16C); GCC's default split of unaligned 256-bit
# loads and stores is slower on every AVX2 CPU, ATen turns it off too.
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"),
    "AVX2": (
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mno-avx256-split-unaligned-load",
        "-mno-avx256-split-unaligned-store",
    ),
    "DEFAULT": (),
}
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


def capability() -> str:
    """The vector ISA the row loops are built for: ATen's CPU capability, where we have its flags.

    ``AVX512`` or ``AVX2`` on x86-64 (as ``torch.backends.cpu.get_cpu_capability()`` reports,
    so ``ATEN_CPU_CAPABILITY`` lowers it), ``DEFAULT`` otherwise (on aarch64 that is NEON).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap: str = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def _commands(cxx: str, out: Path, objs: tuple[Path, Path]) -> list[list[str]]:
    """Two compile commands (they may run in parallel), then the link command."""
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    openmp: bool = torch.backends.openmp.is_available()  # type: ignore[no-untyped-call]
    parallel = ["-fopenmp"] if openmp else []
    common = [
        cxx,
        *_CFLAGS,
        *parallel,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        "-c",
    ]
    cap = capability()
    isa = [*_ISA_FLAGS[cap], f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    return [
        [*common, str(SOURCE), "-o", str(objs[0])],
        [*common, *isa, str(KERNELS_SOURCE), "-o", str(objs[1])],
        [
            cxx,
            "-shared",
            *parallel,
            *map(str, objs),
            "-o",
            str(out),
            f"-L{torch_lib}",
            "-lc10",
            "-ltorch_cpu",
            f"-Wl,-rpath,{torch_lib}",
        ],
    ]


def _library_path(cxx: str) -> Path:
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.read_bytes())
    cap = capability()
    key.update(repr((torch.__version__, sys.platform, cxx, _CFLAGS, cap, _ISA_FLAGS[cap])).encode())
    return cache_dir() / f"ascend_npugraph_ex_cpu_{key.hexdigest()[:16]}" / "fused_cpu.so"


def _run(commands: list[list[str]]) -> None:
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for cmd in commands
    ]
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            tail = "\n".join(err.strip().splitlines()[-20:])
            errors.append(f"compiler exited with {proc.returncode}:\n{tail}")
    if errors:
        raise RuntimeError("\n".join(errors))


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
    log.info("npugraph_ex: building the C++ CPU kernels (%s) into %s (once)", capability(), path)
    # Build in a private directory beside the target, then rename: concurrent builders never
    # see a partial file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        compile_main, compile_kernels, link = _commands(
            cxx, tmp / "fused_cpu.so", (tmp / "fused_cpu.o", tmp / "fused_cpu_kernels.o")
        )
        _run([compile_main, compile_kernels])  # the two translation units in parallel
        _run([link])
        os.replace(tmp / "fused_cpu.so", path)
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
