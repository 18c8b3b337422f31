"""The NPU platform: vLLM's ``Platform`` for Ascend NPUs (torch_npu), with the plugin's graph mode.

:func:`vllm_ascend_plugin.register` names this class when torch_npu imports and an NPU is
usable. It is written against vLLM 0.32's platform interface the way vllm-ascend's
``NPUPlatform`` is (device ``npu``, dispatch key ``PrivateUse1``, ``ASCEND_RT_VISIBLE_DEVICES``,
HCCL, eager ``simple_compile_backend``), and its graph side is the one the CPU twin platform
runs: the same config normalisation (:func:`~vllm_ascend_plugin.graph_config.configure_graph_mode`),
wrapper, compiler, graph pool and model runner, with ascend_aclgraph's ``npu`` backend.

What this release does not have, and says so instead of pretending:

- an NPU attention backend. vllm-ascend's ``AscendAttentionBackend`` captures each attention
  call in an updatable task group and re-issues it with the new sequence lengths after every
  FULL replay; :meth:`NPUPlatform.get_attn_backend_cls` raises
  :class:`NPUAttentionBackendUnavailableError` rather than hand vLLM a backend that would bake
  one step's sequence lengths into every replay;
- HCCL device communicators (vllm-ascend's ``NPUCommunicator``): collectives go through vLLM's
  base communicator, i.e. plain ``torch.distributed`` on the ``hccl`` process group torch_npu
  registers.

Nothing here imports torch_npu at module import: device calls import it when they run, which
only happens on an NPU host. None of the device calls has run on an NPU (no machine we test on
has one); the config hooks are tested on CPU.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import ascend_aclgraph as ag
import torch
from ascend_aclgraph.attention_support import ASCEND_ATTENTION_BACKENDS
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_ascend_plugin.platforms.common import GraphPlatformMixin

__all__ = [
    "DEFAULT_MAX_CAPTURE_SIZE_CAP",
    "NPU_WORKER",
    "NPUAttentionBackendUnavailableError",
    "NPUPlatform",
    "default_max_capture_size",
]

logger = logging.getLogger(f"vllm.{__name__}")  # shown by vLLM's logging set-up

#: The worker class the platform installs when the user left ``worker_cls`` at ``auto``.
NPU_WORKER = "vllm_ascend_plugin.worker.npu_worker.NPUWorker"

#: The largest default capture size (vLLM's CUDA default ceiling, which vllm-ascend keeps).
DEFAULT_MAX_CAPTURE_SIZE_CAP = 512

# vllm-ascend's default attention backend (vllm_ascend.attention.attention_v1) and what its
# metadata builder declares; the config-time mode resolution narrows the requested mode by it.
_DEFAULT_ATTENTION_BACKEND = "attention_v1"


class NPUAttentionBackendUnavailableError(NotImplementedError):
    """The NPU platform was asked for an attention backend, and this release has none."""


def default_max_capture_size(vllm_config: Any) -> int | None:
    """vllm-ascend's default ``max_cudagraph_capture_size``, or ``None`` to keep vLLM's choice.

    ``min(max_num_seqs * (1 + num_speculative_tokens), 512)``: vLLM's CUDA default without its
    trailing ``* 2``, so the largest graph tracks the largest decode batch. ``None`` when the
    user gave ``max_cudagraph_capture_size`` or ``cudagraph_capture_sizes`` (their sizes stay
    theirs) or when the scheduler's ``max_num_seqs`` is not known yet.
    """
    cc = vllm_config.compilation_config
    if cc.max_cudagraph_capture_size is not None or cc.cudagraph_capture_sizes is not None:
        return None
    scheduler = getattr(vllm_config, "scheduler_config", None)
    max_num_seqs = getattr(scheduler, "max_num_seqs", None)
    if max_num_seqs is None:
        return None
    query_len = 1
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and spec.num_speculative_tokens:
        query_len += int(spec.num_speculative_tokens)
    return min(int(max_num_seqs) * query_len, DEFAULT_MAX_CAPTURE_SIZE_CAP)


def _npu() -> Any:
    """``torch.npu`` (torch_npu's device module), imported only when a device call runs."""
    import torch_npu

    return torch_npu.npu


class NPUPlatform(GraphPlatformMixin, Platform):
    """vLLM's platform for Ascend NPUs with the plugin's graph mode (see the module docstring)."""

    _enum = PlatformEnum.OOT
    device_name: str = "npu"
    device_type: str = "npu"
    dispatch_key: str = "PrivateUse1"
    device_control_env_var: str = "ASCEND_RT_VISIBLE_DEVICES"
    ray_device_key: str = "NPU"
    # torch.distributed backend that torch_npu registers (vLLM's base communicator uses it).
    dist_backend: str = "hccl"
    # vLLM's small standalone torch.compile uses (sampler helpers and the like) stay eager:
    # inductor has no NPU code generation.
    simple_compile_backend: str = "eager"

    graph_backend: ClassVar[str] = "npu"
    attention_support: ClassVar[ag.AttentionSupport] = ASCEND_ATTENTION_BACKENDS[
        _DEFAULT_ATTENTION_BACKEND
    ]

    # ---- config hooks (run on CPU too: tested) ------------------------------------------

    @classmethod
    def apply_config_platform_defaults(cls, vllm_config: Any) -> None:
        # vLLM calls this early in VllmConfig.__post_init__, before _set_cudagraph_sizes(),
        # which takes a preset max as the ceiling of its default size list.
        super().apply_config_platform_defaults(vllm_config)
        size = default_max_capture_size(vllm_config)
        if size is not None:
            vllm_config.compilation_config.max_cudagraph_capture_size = size
            logger.debug("default max_cudagraph_capture_size for NPU: %d", size)

    @classmethod
    def check_and_update_config(cls, vllm_config: Any) -> None:
        # Imported here: this module loads while vllm.config is still initialising.
        from vllm_ascend_plugin.graph_config import SavedGraphConfig, configure_graph_mode

        saved = SavedGraphConfig.take(vllm_config)
        worker_cls = vllm_config.parallel_config.worker_cls
        super().check_and_update_config(vllm_config)
        configure_graph_mode(
            vllm_config,
            saved,
            attention_support=cls.attention_support,
            # custom_ops stay as vLLM set them: the CPU twin switches them to their native
            # forwards when npugraph_ex runs, so that its passes see PyTorch code; on the NPU
            # an op's forward_oot is where NPU kernels plug in, and that would bypass them.
            native_forwards_for_fusion=False,
            # A worker class the user chose is kept; ``auto`` becomes ours.
            worker_cls=NPU_WORKER if worker_cls in ("auto", NPU_WORKER) else None,
        )

    @classmethod
    def get_attn_backend_cls(
        cls, selected_backend: Any, attn_selector_config: Any, num_heads: int | None = None
    ) -> str:
        raise NPUAttentionBackendUnavailableError(
            "vllm_ascend_plugin's NPU platform has no attention backend to give vLLM: the "
            "NPU attention backend with updatable task groups is not part of this release "
            "(FULL graphs must re-issue attention with each step's sequence lengths through "
            "torch.npu.graph_task_update_begin/end). vllm-ascend's backend "
            "(vllm_ascend.attention.attention_v1.AscendAttentionBackend, under vllm-ascend's "
            "own platform) or a future vllm-ascend-plugin release provides it."
        )

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        """vLLM's base communicator: ``torch.distributed`` collectives on the HCCL group.

        vllm-ascend's ``NPUCommunicator`` (HCCL all-to-all, custom all-reduce paths) is not part
        of this package.
        """
        return str(super().get_device_communicator_cls())

    @classmethod
    def opaque_attention_op(cls) -> bool:
        # Attention is one opaque custom op (as on vllm-ascend): the piecewise split point.
        return True

    # ---- device calls (torch_npu imported when called; untested without an NPU) ---------

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return str(_npu().get_device_name(device_id))

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return int(_npu().get_device_properties(device_id).total_memory)

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return True

    @classmethod
    def get_current_memory_usage(cls, device: torch.types.Device | None = None) -> float:
        npu = _npu()
        npu.reset_peak_memory_stats(device)
        return float(npu.max_memory_allocated(device))

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        _npu().set_device(device)

    @classmethod
    def inference_mode(cls) -> torch.inference_mode:
        return torch.inference_mode()

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        _npu().manual_seed_all(seed)

    @classmethod
    def synchronize(cls) -> None:
        _npu().synchronize()

    @classmethod
    def empty_cache(cls) -> None:
        _npu().empty_cache()

    @classmethod
    def mem_get_info(cls) -> tuple[int, int]:
        free, total = _npu().mem_get_info()
        return int(free), int(total)

    @classmethod
    def check_if_supports_dtype(cls, dtype: torch.dtype) -> None:
        # Atlas A2/A3 run float16, bfloat16 and float32; the 310P series has no bfloat16.
        if dtype == torch.bfloat16 and "310P" in cls.get_device_name():
            raise ValueError(
                f"{cls.get_device_name()} does not support bfloat16: pass dtype='float16'"
            )
