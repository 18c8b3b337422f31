"""What the ``cuda`` and ``npu`` backends share: torch's device-graph API, module by module.

torch_npu mirrors ``torch.cuda``'s graph API name for name (``NPUGraph`` / ``CUDAGraph``,
``graph``, ``graph_pool_handle``, ``is_current_stream_capturing``, ``memory_reserved``), so both
backends are this class over a different device module; each adds only what differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ascend_aclgraph.backends.base import Graph, GraphBackend, GraphPool
from ascend_aclgraph.capture_guard import CaptureGuardMode

__all__ = ["DeviceGraphBackend"]


class DeviceGraphBackend(GraphBackend):
    """A graph backend over a torch device module (``torch.cuda`` or ``torch.npu``)."""

    def __init__(
        self, module: Any, graph_class: type[Any], device: torch.device, capture_error_mode: str
    ) -> None:
        self._module = module
        self._graph_class = graph_class
        self._device = device
        self.capture_error_mode = capture_error_mode

    @property
    def device(self) -> torch.device:
        return self._device

    def new_pool(self) -> GraphPool:
        return GraphPool(self._module.graph_pool_handle())

    def new_graph(self, pool: GraphPool) -> Graph:
        return Graph(self, self._graph_class(), pool)

    @contextlib.contextmanager
    def _capture(self, graph: Graph) -> Iterator[None]:
        before = self.memory_reserved()
        with (
            self._module.graph(
                graph.native, pool=graph.pool.handle, capture_error_mode=self.capture_error_mode
            ),
            CaptureGuardMode(),  # type: ignore[no-untyped-call]
        ):
            yield
        # What the capture added to the allocator's reservation: the pool's share of memory.
        graph.pool.captured_bytes += max(0, self.memory_reserved() - before)

    def is_capturing(self) -> bool:
        return bool(self._module.is_current_stream_capturing())

    def synchronize(self) -> None:
        self._module.synchronize(self._device)

    def reset(self, graph: Graph) -> None:
        graph.native.reset()

    def memory_reserved(self) -> int:
        return int(self._module.memory_reserved(self._device))
