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

from typing import Any, ClassVar

import ascend_aclgraph as ag
import torch
from ascend_aclgraph.attention_support import ASCEND_ATTENTION_BACKENDS
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_ascend_plugin.platforms.common import (
    DEFAULT_MAX_CAPTURE_SIZE_CAP,
    GraphPlatformMixin,
    default_max_capture_size,
)

__all__ = [
    "DEFAULT_MAX_CAPTURE_SIZE_CAP",
    "NPU_WORKER",
    "NPUAttentionBackendUnavailableError",
    "NPUPlatform",
    "default_max_capture_size",
]

#: The worker class the platform installs when the user left ``worker_cls`` at ``auto``.
NPU_WORKER = "vllm_ascend_plugin.worker.npu_worker.NPUWorker"

# vllm-ascend's default attention backend (vllm_ascend.attention.attention_v1) and what its
# metadata builder declares; the config-time mode resolution narrows the requested mode by it.
_DEFAULT_ATTENTION_BACKEND = "attention_v1"


class NPUAttentionBackendUnavailableError(NotImplementedError):
    """The NPU platform was asked for an attention backend, and this release has none."""


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

    graph_worker_cls: ClassVar[str] = NPU_WORKER
    # custom_ops stay as vLLM set them: the CPU twin switches them to their native forwards
    # when npugraph_ex runs, so that its passes see PyTorch code; on the NPU an op's
    # forward_oot is where NPU kernels plug in, and that would bypass them.
    native_forwards_for_fusion: ClassVar[bool] = False
    xlite_native: ClassVar[bool] = True

    @classmethod
    def xlite_executor(cls, adapted: Any, vllm_config: Any) -> Any:
        return _NativeXliteExecutor(adapted, vllm_config)

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


class _NativeXliteExecutor:
    """Xlite's native model and runtime behind the executor interface of
    :mod:`vllm_ascend_plugin.xlite_graph` (vllm-ascend's ``XliteWrapper`` set-up).

    Never run: no machine we test on has an NPU. It follows the calls of Xlite's ``_C.pyi``
    stub: ``Runtime(devid, size, rank, tp_size, dp_size)``, ``init_tensor_pool`` sized by the
    model, and ``Model.forward(rt, input, attn_meta, kv_cache, freqs_cis, output, stream)``.
    """

    def __init__(self, adapted: Any, vllm_config: Any) -> None:
        from ascend_xlite_adapter import import_xlite, to_native_model
        from vllm.distributed import get_tensor_model_parallel_world_size, get_world_group

        self._xlite = import_xlite()
        rank = torch.distributed.get_rank()
        self.runtime = self._xlite.Runtime(
            get_world_group().local_rank,
            0,
            rank,
            get_tensor_model_parallel_world_size(),
            vllm_config.parallel_config.data_parallel_size,
        )
        self.model = to_native_model(adapted.config, adapted.weights, self._xlite, rank=rank)
        pool_mib = self.model.get_tensor_pool_size()
        if self.runtime.init_tensor_pool(pool_mib) != 0:
            raise RuntimeError(f"xlite Runtime.init_tensor_pool({pool_mib} MiB) failed")

    def _native(self, attn_meta: Any) -> Any:
        from ascend_xlite_adapter import to_native_attn_meta

        return to_native_attn_meta(attn_meta, self._xlite)

    def forward(
        self, input: Any, attn_meta: Any, kv_cache: Any, freqs_cis: Any, output: Any
    ) -> None:
        stream = _npu().current_stream().npu_stream
        self.model.forward(
            self.runtime, input, self._native(attn_meta), kv_cache, freqs_cis, output, stream
        )

    def forward_with_inputs_embeds(
        self,
        input: Any,
        attn_meta: Any,
        kv_cache: Any,
        freqs_cis: Any,
        output: Any,
        deepstack_input: Any = (),
    ) -> None:
        stream = _npu().current_stream().npu_stream
        self.model.forward_with_inputs_embeds(
            self.runtime,
            input,
            self._native(attn_meta),
            kv_cache,
            freqs_cis,
            output,
            stream,
            list(deepstack_input),
        )
