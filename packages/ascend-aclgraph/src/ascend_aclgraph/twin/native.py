"""Replay a twin program from a C++ loop over its ops: no Python per op.

The generated function of :mod:`.codegen` is the cheapest way to drive the dispatcher from
Python, and still pays per op a bytecode call, the Python argument parser (``out=`` keyword
included) and a GIL release and re-acquire. ``csrc/native_replay.cpp`` keeps, per op, its
operator handle and its boxed arguments (the captured tensors, sharing their memory) and calls
the boxed kernel; it runs below the autograd keys with grad mode off, as the replay is
inference. Measured on small decoders (hidden 64-128, batch 4, 1 thread) that takes the replay
from 5-6.5 us to 2.5-3.5 us per op, 1.7-2x faster (2.5-3 us less per op, whatever the op's
work); see ``replay_cost`` in ``benchmarks/bench_graph_modes.py``.

Each op is replayed through the same overload and arguments as the generated function
(:func:`.codegen.replay_form`), so both compute bitwise the same. Updatable tasks' segments stay
Python: the loop calls their current ``run`` at their place, with the caller's dispatch keys.

The extension is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja needed; ~30 s on two cores) into ``$TORCH_EXTENSIONS_DIR``, once per source, torch and Python
version. If ``ASCEND_ACLGRAPH_NO_NATIVE_REPLAY=1`` is set, or the build fails, the generated
Python function replays (the build failure warns once).

Concurrent builders (tensor-parallel ranks, parallel test workers) serialise on an ``flock``
of the build directory, which the kernel drops when its holder dies. cpp_extension's own lock
is a file that stays behind when a build is killed, and every later load waits for it forever;
under our flock nobody else can be building, so a leftover one is stale and is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ascend_aclgraph.twin.codegen import replay_form
from ascend_aclgraph.twin.recorder import OpRecord

__all__ = ["ENV_DISABLE", "SOURCE", "enabled", "load", "native_replay"]

log = logging.getLogger(__name__)

ENV_DISABLE = "ASCEND_ACLGRAPH_NO_NATIVE_REPLAY"
SOURCE = Path(__file__).resolve().parent / "csrc" / "native_replay.cpp"

# None: not tried yet; False: unavailable in this process (the build failed once).
_module: Any = None
_load_lock = threading.Lock()


def enabled() -> bool:
    """Whether replays go native: not disabled by ``ASCEND_ACLGRAPH_NO_NATIVE_REPLAY``."""
    return os.environ.get(ENV_DISABLE, "") in ("", "0")


def load() -> Any:
    """The built extension module, or ``None`` when disabled or it cannot be built."""
    global _module
    if not enabled() or _module is False:
        return None
    with _load_lock:
        if _module is None:
            _module = _build()
    return _module or None


def _import_cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, without its import-time CUDA notice.

    With a CUDA build of torch on a machine without a GPU, importing it logs "No CUDA runtime
    is found" on stderr. The loop is plain CPU code that never looks for CUDA, so on a normal
    run that line would only be noise.
    """
    notices = logging.getLogger("torch.utils.cpp_extension")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        notices.setLevel(level)
    return cpp_extension


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; a virtualenv not activated has its wheel's off it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + os.environ.get("PATH", "")


def _build() -> Any:
    """Compile (or load from the extension cache) the loop; ``False`` if that fails."""
    source = SOURCE.read_bytes()
    # The extension links against this torch and Python: they are part of its name, so
    # environments sharing one cache directory never load each other's builds.
    key = hashlib.sha256(source + torch.__version__.encode() + sys.version.encode()).hexdigest()
    _put_ninja_on_path()
    try:
        cpp_extension = _import_cpp_extension()

        name = f"ascend_aclgraph_twin_replay_{key[:16]}"
        built = Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
        # Compiling takes ~30 s on a small machine, once per source, torch and Python version
        # (later loads come from the cache): say so, rather than stall silently.
        if not built.exists():
            log.warning(
                "ascend_aclgraph: compiling the cpu twin's native replay loop (once per torch "
                "and Python version; ~30 s)"
            )
        start = time.perf_counter()
        with _exclusive_build(built.parent):
            module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=["-O2"],
                verbose=False,
            )
        log.info("ascend_aclgraph: native replay loop ready in %.1fs", time.perf_counter() - start)
    except Exception as exc:  # no compiler or ninja, a failed build: replay in Python
        warnings.warn(
            f"ascend_aclgraph: the cpu twin's native replay loop could not be built ({exc}); "
            f"replaying through generated Python instead (set {ENV_DISABLE}=1 to skip the "
            "build)",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return module


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold the build directory's ``flock``; clear cpp_extension's lock a dead build left."""
    try:
        import fcntl
    except ImportError:  # not POSIX: cpp_extension's own lock only
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "ascend_aclgraph.flock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"  # torch.utils.file_baton.FileBaton's file
            if stale.exists():
                log.warning(
                    "ascend_aclgraph: removing %s, left by a native replay build that was "
                    "killed (it would make every later build wait forever)",
                    stale,
                )
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def native_replay(items: Sequence[OpRecord | Any]) -> Callable[[], None] | None:
    """A function replaying ``items`` (as :func:`.codegen.generate_replay` does) from C++.

    ``None`` when the extension is unavailable, or when some op cannot be replayed natively
    (a new tensor nested inside a returned list, an argument the dispatcher's conversions
    refuse): then the generated Python function replays the whole graph.
    """
    module = load()
    if module is None:
        return None
    replay = module.NativeReplay()
    for item in items:
        if not isinstance(item, OpRecord):
            # An updatable task's segment: its `run` changes when an update is staged.
            replay.add_callback(item)
            continue
        func, kwargs, copy = replay_form(item)
        copies = []
        if copy:
            paths = item.extra["result_paths"]
            for i in item.fresh:
                path = paths[i]
                if len(path) > 1:
                    return None  # inside a returned list: the boxed stack holds the list
                copies.append((path[0] if path else 0, item.outputs[i]))
        schema = func._schema
        try:
            replay.add_op(schema.name, schema.overload_name, tuple(item.args), kwargs, copies)
        except (RuntimeError, ValueError, TypeError) as exc:
            log.debug("native replay refused %s (%s): replaying in Python", func, exc)
            return None
    run: Callable[[], None] = replay.run
    return run
