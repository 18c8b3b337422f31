"""The NPU platform's worker and model runner: vLLM's GPU ones on torch_npu, plus graph mode.

vLLM 0.32's ``Worker`` accepts only ``device_type == "cuda"`` in ``init_device`` and measures
memory through ``torch.accelerator``; its ``GPUModelRunner`` creates ``torch.cuda`` streams and
events (async scheduling, speculative decoding). These subclasses change only that:

- :class:`NPUWorker` sets the NPU up with ``torch.npu`` (device, HCCL process groups, memory
  snapshot and KV-cache sizing from ``torch.npu``'s allocator statistics), builds
  :class:`NPUModelRunner`, and keeps vLLM's start-up capture: ``compile_or_warm_up_model``
  calls ``capture_model``, which is the graph-mode mixin's
  (:class:`~vllm_ascend_plugin.worker.graph_runner.GraphModelRunnerMixin`) and needs no CUDA
  streams;
- :class:`NPUModelRunner` is the GPU runner with the shared graph-mode methods (the ones the
  CPU twin runner runs), and ``torch.cuda``'s stream and event names aliased to ``torch.npu``'s
  in the worker process, as vLLM's own XPU runner does for ``torch.xpu``.

Untested: no NPU has run any of this. What runs on CPU is the import (without torch_npu, which
is imported lazily) and the class layout; the device paths are written against torch_npu's
documented API and vLLM 0.32's GPU worker, and the NPU attention backend they would need is
not part of this release (see :mod:`vllm_ascend_plugin.platforms.npu`).
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.multimodal.gpu_ipc_memory import reserve_mm_ipc_gpu_memory
from vllm.utils.mem_utils import MemorySnapshot, format_gib
from vllm.utils.torch_utils import set_random_seed
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker, init_worker_distributed_environment
from vllm.v1.worker.utils import request_memory

from vllm_ascend_plugin.worker.graph_runner import GraphModelRunnerMixin

__all__ = ["NPUModelRunner", "NPUWorker"]

logger = logging.getLogger(f"vllm.{__name__}")  # shown by vLLM's logging set-up

# The torch.cuda names vLLM 0.32's GPUModelRunner calls (at construction and at step time).
_CUDA_NAMES_TO_ALIAS = ("Stream", "Event", "current_stream", "default_stream", "stream")
_ALIASED_FLAG = "_vllm_ascend_plugin_npu_aliases"


def _npu() -> Any:
    """``torch.npu`` (torch_npu's device module), imported only when an NPU path runs."""
    import torch_npu

    return torch_npu.npu


def _alias_torch_cuda_to_npu() -> None:
    """Point ``torch.cuda``'s stream and event names at ``torch.npu``'s (once per process).

    Not undone: the GPU runner also calls ``torch.cuda.current_stream()`` / ``stream()`` per
    step (async output copies, draft-token copies), and a worker process that drives an NPU has
    no CUDA for the change to take away.
    """
    if getattr(torch.cuda, _ALIASED_FLAG, False):
        return
    npu = _npu()
    for name in _CUDA_NAMES_TO_ALIAS:
        target = getattr(npu, name, None)
        if target is None:
            continue
        # Functions go in as partials: TorchDynamo asserts when torch.cuda.X and torch.npu.X
        # are one object (vLLM's XPU runner does the same for torch.xpu).
        setattr(
            torch.cuda,
            name,
            target if isinstance(target, type) else functools.partial(target),
        )
    setattr(torch.cuda, _ALIASED_FLAG, True)


class _NPUMemorySnapshot(MemorySnapshot):
    """vLLM's memory snapshot measured with ``torch.npu``'s allocator statistics.

    vLLM's own measures with ``torch.accelerator``, which needs the device's allocator to be a
    ``c10::DeviceAllocator``; ``torch.npu`` has the same statistics under CUDA's names.
    """

    def measure(self) -> None:
        npu = _npu()
        device = self.device_
        stats = npu.memory_stats(device)
        self.torch_peak = int(stats.get("allocated_bytes.all.peak", 0))
        self.torch_allocated = int(stats.get("allocated_bytes.all.current", 0))
        free, total = npu.mem_get_info(device)
        self.free_memory, self.total_memory = int(free), int(total)
        self.cuda_memory = self.total_memory - self.free_memory
        self.torch_memory = int(npu.memory_reserved(device))
        self.non_torch_memory = self.cuda_memory - self.torch_memory
        self.timestamp = time.time()


class NPUModelRunner(GraphModelRunnerMixin, GPUModelRunner):
    """vLLM's GPU model runner on an NPU, with ACLGraph capture/replay (``npu`` backend)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        # Before GPUModelRunner.__init__, which creates torch.cuda streams and events.
        _alias_torch_cuda_to_npu()
        super().__init__(vllm_config, device)


class NPUWorker(Worker):
    """vLLM's GPU worker on an NPU: ``torch.npu`` device set-up, :class:`NPUModelRunner`."""

    def init_device(self) -> None:
        from vllm.platforms import current_platform
        from vllm.platforms.interface import set_assigned_physical_gpu_ids

        npu = _npu()
        parallel = self.parallel_config
        if (
            parallel.distributed_executor_backend not in ("ray", "external_launcher")
            and parallel.data_parallel_backend != "ray"
            and parallel.nnodes_within_dp == 1
        ):
            # As vLLM's GPU worker: data-parallel ranks on one node take consecutive devices.
            dp_local_rank = parallel.data_parallel_rank_local
            if dp_local_rank is None:
                dp_local_rank = parallel.data_parallel_index
            self.local_rank += dp_local_rank * (
                parallel.pipeline_parallel_size
                * parallel.prefill_context_parallel_size
                * parallel.tensor_parallel_size
            )
        if parallel.assigned_physical_gpu_ids is not None:
            set_assigned_physical_gpu_ids(parallel.assigned_physical_gpu_ids)
        index = current_platform.logical_device_id_to_visible_device_id(self.local_rank)
        self.device = torch.device(f"npu:{index}")
        current_platform.set_device(self.device)
        dtype = self.model_config.dtype  # a torch.dtype once ModelConfig has resolved it
        if isinstance(dtype, torch.dtype):
            current_platform.check_if_supports_dtype(dtype)

        # HCCL process groups before the memory snapshot, so that their buffers count as
        # in use (as vLLM does with NCCL).
        init_worker_distributed_environment(
            self.vllm_config,
            self.rank,
            self.distributed_init_method,
            self.local_rank,
            current_platform.dist_backend,
        )
        set_random_seed(self.model_config.seed)
        gc.collect()
        npu.empty_cache()
        self.init_snapshot = _NPUMemorySnapshot(device=self.device)
        self.requested_memory = request_memory(self.init_snapshot, self.cache_config)
        logger.debug("NPU worker init memory snapshot: %r", self.init_snapshot)
        self._init_workspace_and_model_runner()

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError(
                "the NPU platform runs vLLM's V1 GPUModelRunner (with the plugin's graph "
                "mode); VLLM_USE_V2_MODEL_RUNNER is not supported: unset it"
            )
        assert self.device is not None, "init_device() sets the device first"
        return NPUModelRunner(self.vllm_config, self.device)

    def _maybe_get_memory_pool_context(self, tag: str) -> AbstractContextManager[Any]:
        # vLLM's memory pool for sleep mode is its CuMem allocator (CUDA only); the NPU
        # platform does not offer sleep mode (is_sleep_mode_available() is False for it).
        return nullcontext()

    @torch.inference_mode()
    def determine_available_memory(self) -> int:
        """Bytes left for the KV cache: vLLM's profiling arithmetic on ``torch.npu``'s stats.

        Weights + the activation peak of a profiling run + what non-torch users (HCCL, the
        runtime) took since start-up, subtracted from ``gpu_memory_utilization`` of the device.
        Graph memory is not estimated beforehand (vLLM estimates it only on CUDA and XPU).
        """
        npu = _npu()
        kv_cache_bytes = self.cache_config.kv_cache_memory_bytes
        if kv_cache_bytes:
            with set_current_vllm_config(self.vllm_config):
                self.model_runner.profile_run()
            available = int(kv_cache_bytes)
        else:
            gc.collect()
            npu.empty_cache()
            npu.reset_peak_memory_stats(self.device)
            before = _NPUMemorySnapshot(device=self.device)
            with set_current_vllm_config(self.vllm_config):
                self.model_runner.profile_run()
            npu.synchronize()
            after = _NPUMemorySnapshot(device=self.device)
            weights = int(self.model_runner.model_memory_usage)
            activation_peak = after.torch_peak - before.torch_allocated
            non_torch = after.non_torch_memory - self.init_snapshot.non_torch_memory
            available = int(self.requested_memory - (weights + activation_peak + non_torch))
            logger.info(
                "NPU memory: weights %s GiB, activation peak %s GiB, non-torch %s GiB; "
                "available KV cache memory: %s GiB",
                format_gib(weights),
                format_gib(activation_peak),
                format_gib(non_torch),
                format_gib(available),
            )
            gc.collect()
            npu.empty_cache()
        self.available_kv_cache_memory_bytes = available
        return int(
            reserve_mm_ipc_gpu_memory(
                available,
                self.model_config.multimodal_config,
                getattr(self.parallel_config, "_api_process_count", 1),
            )
        )

    def graph_report(self) -> dict[str, Any]:
        """This worker's graph counters (``LLM.collective_rpc("graph_report")``)."""
        runner = self.model_runner
        assert isinstance(runner, NPUModelRunner)
        return runner.graph_report()
