"""Graph backends and their selection: ``get_backend("auto" | "npu" | "cuda" | "cpu")``."""

from __future__ import annotations

import threading

import torch

from ascend_aclgraph.backends.base import Graph, GraphBackend, GraphPool
from ascend_aclgraph.errors import BackendUnavailableError

__all__ = [
    "BACKEND_NAMES",
    "Graph",
    "GraphBackend",
    "GraphPool",
    "available_backends",
    "get_backend",
]

BACKEND_NAMES = ("npu", "cuda", "cpu")
_instances: dict[str, GraphBackend] = {}
_lock = threading.Lock()


def _create(name: str) -> GraphBackend:
    if name == "cpu":
        from ascend_aclgraph.backends.cpu import CpuTwinBackend

        return CpuTwinBackend()
    if name == "cuda":
        from ascend_aclgraph.backends.cuda import CudaGraphBackend

        return CudaGraphBackend()
    from ascend_aclgraph.backends.npu import NpuGraphBackend

    return NpuGraphBackend()


def get_backend(name: str | GraphBackend = "auto") -> GraphBackend:
    """The graph backend called ``name`` (one shared instance per name).

    ``"auto"`` picks the first that can run here: npu, then cuda, then cpu. Asking for a backend
    that cannot run raises :class:`BackendUnavailableError` saying what is missing.
    """
    if isinstance(name, GraphBackend):
        return name
    if not isinstance(name, str) or name not in (*BACKEND_NAMES, "auto"):
        raise ValueError(
            f"unknown graph backend {name!r}; accepted values: auto, {', '.join(BACKEND_NAMES)}"
        )
    if name == "auto":
        for candidate in BACKEND_NAMES:
            if candidate in available_backends():
                return get_backend(candidate)
        raise BackendUnavailableError("no graph backend can run here")  # cpu always can
    with _lock:
        backend = _instances.get(name)
        if backend is None:
            backend = _instances[name] = _create(name)
        return backend


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in ``auto`` preference order."""
    from ascend_aclgraph.backends.npu import npu_available

    names = []
    if npu_available():
        names.append("npu")
    if torch.cuda.is_available():
        names.append("cuda")
    names.append("cpu")
    return names
