"""The ``cuda`` backend: ``torch.cuda`` graphs, for real runs on NVIDIA GPUs.

CUDA has no equivalent of ACL graph task updates: kernels such as FlashAttention read sequence
lengths and block tables from *device* tensors, so a caller updates them by copying into the
captured buffers before replay. :meth:`CudaGraphBackend.update_host_args` therefore refuses host
values and says so; tensor arguments of updatable tasks are updated by copy on every backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ascend_aclgraph.backends.base import Graph, GraphBackend, GraphPool
from ascend_aclgraph.capture_guard import CaptureGuardMode
from ascend_aclgraph.errors import BackendUnavailableError, TaskUpdateError
from ascend_aclgraph.tasks import UpdatableTask

__all__ = ["CudaGraphBackend"]


class CudaGraphBackend(GraphBackend):
    """Graph backend over ``torch.cuda.CUDAGraph``."""

    name = "cuda"

    def __init__(self, capture_error_mode: str = "global") -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "the cuda backend needs a CUDA build of torch and a visible NVIDIA GPU; "
                f"this torch is {torch.__version__} and torch.cuda.is_available() is False"
            )
        self._device = torch.device("cuda", torch.cuda.current_device())
        self.capture_error_mode = capture_error_mode

    @property
    def device(self) -> torch.device:
        return self._device

    def new_pool(self) -> GraphPool:
        return GraphPool(torch.cuda.graph_pool_handle())

    def new_graph(self, pool: GraphPool) -> Graph:
        return Graph(self, torch.cuda.CUDAGraph(), pool)

    @contextlib.contextmanager
    def _capture(self, graph: Graph) -> Iterator[None]:
        before = torch.cuda.memory_reserved(self._device)
        with (
            torch.cuda.graph(
                graph.native, pool=graph.pool.handle, capture_error_mode=self.capture_error_mode
            ),
            CaptureGuardMode(),  # type: ignore[no-untyped-call]
        ):
            yield
        graph.pool.captured_bytes += max(0, torch.cuda.memory_reserved(self._device) - before)

    def is_capturing(self) -> bool:
        return bool(torch.cuda.is_current_stream_capturing())

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

    def replay(self, graph: Graph) -> None:
        graph.native.replay()

    def reset(self, graph: Graph) -> None:
        graph.native.reset()

    def memory_reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self._device))

    def run_updatable(
        self,
        task: UpdatableTask,
        op: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        return op(*args, **kwargs)

    def update_host_args(self, task: UpdatableTask, changes: dict[str, Any]) -> None:
        raise TaskUpdateError(
            f"host-side argument(s) {sorted(changes)} of {task.describe()} are baked into a CUDA "
            "graph and cannot be rewritten: CUDA has no graph task update. Pass them as a device "
            "tensor and update that (the device-buffer way), e.g. task.update(seq_lens=tensor)."
        )
