"""What both platforms answer the same way: graph mode on, our wrapper, compiler and pool, the
capture-size default and the config normalisation.

The NPU platform and the CPU twin differ only in the values they declare (graph backend,
attention support, worker class, whether fusions need vLLM's native op forwards, which Xlite
executor runs); every decision made from those values lives here and in
:mod:`vllm_ascend_plugin.graph_config`, so the twin exercises the NPU's logic.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import ascend_aclgraph as ag

__all__ = ["DEFAULT_MAX_CAPTURE_SIZE_CAP", "GraphPlatformMixin", "default_max_capture_size"]

logger = logging.getLogger(f"vllm.{__name__}")  # shown by vLLM's logging set-up

_WRAPPER = "vllm_ascend_plugin.graph_wrapper.ACLGraphWrapper"
_COMPILER = "vllm_ascend_plugin.compiler.AscendCompiler"

#: The largest default capture size (vLLM's CUDA default ceiling, which vllm-ascend keeps).
DEFAULT_MAX_CAPTURE_SIZE_CAP = 512


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


class GraphPlatformMixin:
    """Graph-mode hooks of vLLM's ``Platform`` (put it before the vLLM platform base class).

    Subclasses declare:

    - :attr:`graph_backend`: the ascend_aclgraph backend;
    - :attr:`attention_support`: what their attention backend's metadata builder declares (the
      config-time mode resolution uses it before any backend is built);
      :meth:`config_attention_support` may refine it from the config;
    - :attr:`graph_worker_cls`: the worker installed when the user left ``worker_cls`` at
      ``auto``;
    - :attr:`native_forwards_for_fusion`: whether npugraph_ex's passes need vLLM's custom ops
      to run their native (PyTorch) forwards to see them;
    - :attr:`xlite_native`: whether the XliteGraph path runs the native ``xlite._C`` (else the
      adapter's reference executor stands in for it).
    """

    graph_backend: ClassVar[str]
    attention_support: ClassVar[ag.AttentionSupport]
    graph_worker_cls: ClassVar[str]
    native_forwards_for_fusion: ClassVar[bool]
    xlite_native: ClassVar[bool]

    @classmethod
    def support_static_graph_mode(cls) -> bool:
        return True

    @classmethod
    def get_static_graph_wrapper_cls(cls) -> str:
        return _WRAPPER

    @classmethod
    def get_compile_backend(cls) -> str:
        return _COMPILER

    def get_global_graph_pool(self) -> Any:
        from vllm_ascend_plugin.device import shared_graph_pool

        return shared_graph_pool()

    @classmethod
    def xlite_executor(cls, adapted: Any, vllm_config: Any) -> Any:
        """The XliteGraph executor for an adapted model (an ``XliteExecutor``)."""
        raise NotImplementedError(f"{cls.__name__} declares no XliteGraph executor")

    @classmethod
    def config_attention_support(cls, vllm_config: Any) -> ag.AttentionSupport:
        """The attention support the config-time resolution uses (default: the declared one)."""
        return cls.attention_support

    @classmethod
    def apply_config_platform_defaults(cls, vllm_config: Any) -> None:
        # vLLM calls this early in VllmConfig.__post_init__, before _set_cudagraph_sizes(),
        # which takes a preset max as the ceiling of its default size list.
        super().apply_config_platform_defaults(vllm_config)  # type: ignore[misc]
        size = default_max_capture_size(vllm_config)
        if size is not None:
            vllm_config.compilation_config.max_cudagraph_capture_size = size
            logger.debug("default max_cudagraph_capture_size: %d", size)

    @classmethod
    def check_and_update_config(cls, vllm_config: Any) -> None:
        # Imported here: platform modules load while vllm.config is still initialising.
        from vllm_ascend_plugin.graph_config import SavedGraphConfig, configure_graph_mode

        # What the base platform may erase (vLLM's CPU platform turns graph mode off).
        saved = SavedGraphConfig.take(vllm_config)
        worker_cls = vllm_config.parallel_config.worker_cls
        super().check_and_update_config(vllm_config)  # type: ignore[misc]
        configure_graph_mode(
            vllm_config,
            saved,
            attention_support=cls.config_attention_support(vllm_config),
            native_forwards_for_fusion=cls.native_forwards_for_fusion,
            # A worker class the user chose is kept; ``auto`` (or the base platform's default,
            # which replaced it) becomes ours.
            worker_cls=(
                cls.graph_worker_cls if worker_cls in ("auto", cls.graph_worker_cls) else None
            ),
            xlite_native=cls.xlite_native,
        )
