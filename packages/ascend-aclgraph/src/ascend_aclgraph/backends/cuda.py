"""The ``cuda`` backend: ``torch.cuda`` graphs, for real runs on NVIDIA GPUs.

CUDA has no equivalent of ACL graph task updates: kernels such as FlashAttention read sequence
lengths and block tables from *device* tensors, so a caller updates them by copying into the
captured buffers before replay. Staging a host value for a task therefore raises and says so;
tensor arguments of updatable tasks are updated by copy on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ascend_aclgraph.backends.base import Graph
from ascend_aclgraph.backends.device import DeviceGraphBackend
from ascend_aclgraph.errors import BackendUnavailableError, TaskUpdateError
from ascend_aclgraph.tasks import UpdatableTask

__all__ = ["CudaGraphBackend"]


class CudaGraphBackend(DeviceGraphBackend):
    """Graph backend over ``torch.cuda.CUDAGraph``."""

    name = "cuda"

    def __init__(self, capture_error_mode: str = "global") -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "the cuda backend needs a CUDA build of torch and a visible NVIDIA GPU; "
                f"this torch is {torch.__version__} and torch.cuda.is_available() is False"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(torch.cuda, torch.cuda.CUDAGraph, device, capture_error_mode)

    def run_updatable(
        self,
        task: UpdatableTask,
        op: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        return op(*args, **kwargs)

    def replay(self, graph: Graph, updates: Mapping[UpdatableTask, dict[str, Any]]) -> None:
        for task, changes in updates.items():
            self.check_host_update(task, changes)  # staging refused them already
        graph.native.replay()

    def update_host_args(self, task: UpdatableTask, changes: dict[str, Any]) -> None:
        self.check_host_update(task, changes)

    def check_host_update(self, task: UpdatableTask, changes: Mapping[str, Any]) -> None:
        raise TaskUpdateError(
            f"host-side argument(s) {sorted(changes)} of {task.describe()} are baked into a CUDA "
            "graph and cannot be rewritten: CUDA has no graph task update. Pass them as a device "
            "tensor and update that (the device-buffer way), e.g. task.update(seq_lens=tensor)."
        )
