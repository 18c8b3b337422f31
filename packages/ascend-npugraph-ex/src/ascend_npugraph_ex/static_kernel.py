"""Static kernels: ahead-of-time compiled, fixed-shape versions of optimized graphs, cached on disk.

On an NPU this is npugraph_ex's ``static_kernel_compile`` (aclnn static-shape kernels). On CUDA
and CPU the equivalent is an AOTInductor package of the optimized aten graph for its exact input
shapes (``torch._inductor.aoti_compile_and_package``). Each package sits in
``<build_dir>/<key>/`` with a ``manifest.json`` that records the key, the build environment and
the package's SHA-256.

The key covers everything the compiled code depends on: the graph code; each input's shape,
strides, dtype and device type; the salt (the pass manager's hash); the torch version; the
:class:`BuildEnvironment` (machine, ATen's CPU capability, the ISA extensions code generation may
use, the C++ compiler inductor invokes and its version); and for CUDA inputs the GPU's name and
compute capability. A package built on a machine with AVX-512, or by another compiler, is
therefore never loaded where it could fault or differ.

Entries are published atomically and safely across processes (tensor-parallel ranks compile the
same graphs at the same time): a build runs under an exclusive lock on ``<build_dir>/.<key>.lock``
(``fcntl.flock``), into a private temp dir that is renamed to ``<key>`` only when complete. A
process that finds the entry valid loads it without building; one that waited for the lock
re-checks and loads the winner's entry. Where no lock is available (a filesystem without
``flock``), the rename still only succeeds if no entry exists, and a valid entry that appeared
meanwhile is reused. An entry whose manifest is missing, foreign or does not match its package
is rebuilt with a warning, never loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import fx

from ascend_npugraph_ex.errors import StaticKernelCacheError

__all__ = [
    "MANIFEST",
    "START_MESSAGE",
    "AotInductorBuilder",
    "BuildEnvironment",
    "PackageBuilder",
    "StaticKernelCache",
    "default_build_dir",
]

logger = logging.getLogger(__name__)

START_MESSAGE = "Starting static kernel compilation, the build directory is {path}"
MANIFEST = "manifest.json"
_FORMAT = 2  # 2: the key covers the build environment; the manifest records it
_PACKAGE = "kernel.pt2"

# ISA extensions that compiled CPU code may use (x86 /proc/cpuinfo "flags", aarch64 "Features").
# Only these enter the key: hypervisor and power-management flags differ between machines that
# run the same code.
_ISA_FLAGS = frozenset(
    {
        "sse4_1",
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512cd",
        "avx512bw",
        "avx512dq",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "avx512vbmi",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "amx_fp16",
        "asimd",
        "asimdhp",
        "fphp",
        "sve",
        "sve2",
        "bf16",
        "i8mm",
    }
)


def default_build_dir() -> Path:
    """``$NPUGRAPH_EX_BUILD_DIR``, else ``~/.cache/ascend_npugraph_ex/static_kernels``."""
    env = os.environ.get("NPUGRAPH_EX_BUILD_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "ascend_npugraph_ex" / "static_kernels"


@dataclass(frozen=True)
class BuildEnvironment:
    """What a compiled CPU static kernel depends on besides its graph (module docstring).

    Attributes:
        machine: ``platform.machine()``.
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()`` (ATen's kernel ISA level,
            which also honours ``ATEN_CPU_CAPABILITY``).
        cpu_flags: the ISA extensions of this CPU that generated code may use (sorted).
        compiler: the C++ compiler inductor invokes (resolved path), "" if none is found.
        compiler_version: the first line of ``<compiler> --version``.
    """

    machine: str
    cpu_capability: str
    cpu_flags: tuple[str, ...]
    compiler: str
    compiler_version: str

    @classmethod
    def detect(cls) -> BuildEnvironment:
        """This machine's environment (computed once per process)."""
        return _detect_environment()

    def fingerprint(self) -> str:
        """A stable string of every field, for cache keys."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _cpu_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()  # not Linux: machine and cpu_capability still key the ISA level
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return tuple(sorted(_ISA_FLAGS.intersection(value.split())))
    return ()


def _compiler() -> tuple[str, str]:
    """(resolved path, version line) of the C++ compiler inductor would use."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        name = get_cpp_compiler()
    except Exception:  # no compiler: the build fails later with inductor's own message
        return "", ""
    path = shutil.which(name) or name
    path = os.path.realpath(path)
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return path, next(iter(out.splitlines()), "")


@functools.cache
def _detect_environment() -> BuildEnvironment:
    compiler, version = _compiler()
    return BuildEnvironment(
        machine=platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=_cpu_flags(),
        compiler=compiler,
        compiler_version=version,
    )


def _device_fingerprint(device: torch.device) -> str:
    """The accelerator a package's device code was compiled for (GPU code is per arch)."""
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm_{major}{minor}"
    return device.type


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


class PackageBuilder(Protocol):
    """Builds one static-kernel package file and loads it back as a callable."""

    def build(self, gm: fx.GraphModule, example_inputs: Sequence[Any], package: Path) -> None:
        """Write the compiled package of ``gm`` for these input shapes to ``package``."""
        ...

    def load(self, package: Path) -> Callable[..., Any]:
        """A callable running the package at ``package``."""
        ...


class AotInductorBuilder:
    """The CPU/CUDA builder: an AOTInductor package of the exported graph."""

    def build(self, gm: fx.GraphModule, example_inputs: Sequence[Any], package: Path) -> None:
        """Export ``gm`` at the inputs' exact shapes and AOT-compile it into ``package``."""
        args = tuple(_real_inputs(example_inputs))
        with torch.no_grad():
            exported = torch.export.export(gm, args, strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package))

    def load(self, package: Path) -> Callable[..., Any]:
        """Load the package (a shared library) and return its runner."""
        runner = torch._inductor.aoti_load_package(str(package))

        def run(*args: Any) -> Any:
            return runner(*args)

        return run


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (a no-op where ``fcntl`` is missing).

    The lock file stays: deleting it would let a waiter and a newcomer lock two different files.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename-if-absent publish still keeps entries whole
        yield
        return
    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class StaticKernelCache:
    """Builds or loads AOT-compiled static-shape kernels for optimized graphs.

    Args:
        build_dir: the cache directory.
        salt: extra key material, e.g. the pass manager's ``uuid()``.
        environment: the build environment keyed into entries (default: this machine's).
        builder: what builds and loads packages (default: :class:`AotInductorBuilder`).
    """

    def __init__(
        self,
        build_dir: str | Path | None = None,
        salt: str = "",
        *,
        environment: BuildEnvironment | None = None,
        builder: PackageBuilder | None = None,
    ) -> None:
        self.build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
        self.salt = salt
        self._environment = environment
        self.builder: PackageBuilder = builder if builder is not None else AotInductorBuilder()
        self.built = 0
        self.loaded = 0

    @property
    def environment(self) -> BuildEnvironment:
        """The build environment in the key (detected on first use: it runs the compiler)."""
        if self._environment is None:
            self._environment = BuildEnvironment.detect()
        return self._environment

    def key(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str:
        """The cache key of ``gm`` specialised to ``example_inputs`` (module docstring)."""
        h = hashlib.sha256()
        h.update(gm.code.encode())
        devices = set()
        for t in example_inputs:
            if isinstance(t, torch.Tensor):
                h.update(f"{tuple(t.shape)}|{tuple(t.stride())}|{t.dtype}|{t.device.type}".encode())
                devices.add(t.device)
            else:
                h.update(repr(t).encode())
        h.update(self.salt.encode())
        h.update(torch.__version__.encode())
        h.update(self.environment.fingerprint().encode())
        for device in sorted(devices, key=str):
            h.update(_device_fingerprint(device).encode())
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
        # A valid entry is complete and never changes (entries appear by rename only), so it
        # is loaded without the lock.
        if not self._valid(entry, key):
            self.build_dir.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.build_dir / f".{key}.lock"):
                # Another process may have published the entry while this one waited.
                if not self._valid(entry, key):
                    self._rebuild(gm, example_inputs, entry, key)
                    return self.builder.load(entry / _PACKAGE)
        self.loaded += 1
        return self.builder.load(entry / _PACKAGE)

    def _rebuild(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], entry: Path, key: str
    ) -> None:
        if entry.exists():
            warnings.warn(
                f"npugraph_ex: static kernel cache entry {entry} is corrupt or was written for "
                "another graph/torch; rebuilding it",
                stacklevel=3,
            )
            self._discard(entry)
        message = START_MESSAGE.format(path=self.build_dir)
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
        self._build(gm, example_inputs, entry, key)
        self.built += 1

    def _discard(self, entry: Path) -> None:
        """Remove ``entry``: first renamed aside, so no reader ever sees it half deleted."""
        trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.trash.", dir=self.build_dir))
        with contextlib.suppress(FileNotFoundError):  # someone else removed it already
            os.replace(entry, trash / entry.name)
        shutil.rmtree(trash, ignore_errors=True)

    def _build(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], entry: Path, key: str
    ) -> None:
        # Build in a private sibling temp dir and rename: an entry is never half written.
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.build_dir))
        try:
            self.builder.build(gm, example_inputs, tmp / _PACKAGE)
            manifest = {
                "format": _FORMAT,
                "key": key,
                "torch": torch.__version__,
                "environment": dataclasses.asdict(self.environment),
                "sha256": _sha256(tmp / _PACKAGE),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            self._publish(tmp, entry, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a publish: renamed

    def _publish(self, tmp: Path, entry: Path, key: str) -> None:
        """Rename ``tmp`` to ``entry`` if no entry exists; reuse a valid one that does."""
        try:
            # os.rename (unlike os.replace's promise) is what fails on an existing non-empty
            # directory on POSIX, which is exactly the rename-if-absent this needs.
            os.rename(tmp, entry)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        # Published meanwhile by a process that holds no lock (no flock on this filesystem).
        if self._valid(entry, key):
            logger.info("npugraph_ex: static kernel %s was built concurrently; using it", key)
            return
        self._discard(entry)
        os.rename(tmp, entry)
