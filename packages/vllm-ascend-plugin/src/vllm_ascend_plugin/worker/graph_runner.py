"""The model-runner side of graph mode, shared by the NPU runner and the CPU twin runner.

vLLM's GPU model runner already pads batches to capture sizes, dispatches batch descriptors and
sets the forward context; what a platform's runner adds (vllm-ascend's ``NPUModelRunner`` does
the same) is:

- ``load_model``: wrap the model in the platform's graph wrapper with runtime mode FULL when
  the effective mode has FULL graphs (piecewise wrappers come from vLLM's compile backend);
- ``load_model`` also puts the :class:`~vllm_ascend_plugin.xlite_graph.XliteWrapper` around
  it when ``xlite_graph_config.enabled`` (``initialize_kv_cache`` then binds it to the caches
  and the attention backend; dummy runs bypass it);
- ``get_model``: the unwrapped model;
- ``_check_and_update_cudagraph_mode``: resolve the mode from the attention backends really
  built, through ascend_aclgraph's resolver, and say if it differs from the platform's
  config-time decision;
- ``capture_model``: walk the dispatcher's capture descriptors (PIECEWISE sizes, then FULL)
  without CUDA streams or device memory queries; return the graph pool's bytes;
- ``graph_report``: what was captured and replayed, and which fusions fired, for the tests,
  the demo and the logs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import ascend_aclgraph as ag
from vllm.compilation.monitor import set_cudagraph_capturing_enabled
from vllm.config import CUDAGraphMode
from vllm.v1.attention.backend import AttentionCGSupport

from vllm_ascend_plugin.config import parse_additional_config
from vllm_ascend_plugin.graph_config import graph_decision, our_additional_config
from vllm_ascend_plugin.graph_wrapper import ACLGraphWrapper
from vllm_ascend_plugin.xlite_graph import XliteWrapper

__all__ = ["GraphModelRunnerMixin"]

logger = logging.getLogger(f"vllm.{__name__}")  # shown by vLLM's logging set-up


class GraphModelRunnerMixin:
    """Graph-mode methods for a subclass of vLLM's GPU model runner (see the module docstring)."""

    # Provided by vLLM's GPUModelRunner.
    model: Any
    vllm_config: Any
    compilation_config: Any
    cudagraph_dispatcher: Any
    attn_groups: list[list[Any]]
    uniform_decode_query_len: int

    _full_wrapper: ACLGraphWrapper | None = None
    _xlite: XliteWrapper | None = None
    _capture_seconds: float = 0.0
    _resolved_mode: str | None = None
    _resolution_reasons: tuple[str, ...] = ()

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        if self.compilation_config.cudagraph_mode.has_full_cudagraphs():
            self._full_wrapper = ACLGraphWrapper(
                self.model, self.vllm_config, runtime_mode=CUDAGraphMode.FULL
            )
            self.model = self._full_wrapper
        ascend = parse_additional_config(our_additional_config(self.vllm_config))
        if ascend.xlite_graph_config.enabled:
            from vllm.platforms import current_platform

            platform: Any = current_platform
            self._xlite = XliteWrapper(
                self.model,
                self.vllm_config,
                ascend,
                executor_factory=lambda adapted: platform.xlite_executor(adapted, self.vllm_config),
            )
            self.model = self._xlite

    def get_model(self) -> Any:
        model = self.model
        while isinstance(model, XliteWrapper | ACLGraphWrapper):
            model = model.unwrap()
        return model

    def initialize_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(*args, **kwargs)  # type: ignore[misc]
        if self._xlite is not None:
            self._bind_xlite(self._xlite)

    def _bind_xlite(self, xlite: XliteWrapper) -> None:
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        backends = {group.backend for groups in self.attn_groups for group in groups}
        backend = next(iter(backends)) if len(backends) == 1 else None
        if backend is None or not hasattr(backend, "xlite_step"):
            built = sorted(b.__name__ for b in backends)
            raise RuntimeError(
                f"xlite_graph_config.enabled needs the platform's own attention backend (which "
                f"shares its KV cache with Xlite); this model runs {built}. Accepted: the "
                "default attention backend (do not select one by name)"
            )
        context = self.compilation_config.static_forward_context
        names = sorted(
            (name for name, layer in context.items() if isinstance(layer, Attention)),
            key=extract_layer_index,
        )
        xlite.bind_attention(
            backend.xlite_kv_caches([context[name] for name in names]), backend.xlite_step
        )

    def _dummy_run(self, *args: Any, **kwargs: Any) -> Any:
        # Memory profiling and graph capture (its warm-ups included, see capture_model) run the
        # ACLGraph path, never Xlite. Other dummy runs (a data-parallel rank with no requests
        # stepping with the others) go through Xlite, as vllm-ascend routes them, so that
        # every rank runs the same path.
        if self._xlite is not None and (
            kwargs.get("is_profile") or kwargs.get("is_graph_capturing")
        ):
            with self._xlite.bypassed():
                return super()._dummy_run(*args, **kwargs)  # type: ignore[misc]
        return super()._dummy_run(*args, **kwargs)  # type: ignore[misc]

    def _check_and_update_cudagraph_mode(
        self, attention_backends: list[Any], kv_cache_groups: list[Any], **kwargs: Any
    ) -> None:
        weakest = AttentionCGSupport.ALWAYS
        weakest_name = None
        for backends, group in zip(attention_backends, kv_cache_groups, strict=True):
            for backend in backends:
                support = backend.get_builder_cls().get_cudagraph_support(
                    self.vllm_config, group.kv_cache_spec
                )
                if support.value < weakest.value:
                    weakest, weakest_name = support, backend.__name__
        decision = graph_decision(self.vllm_config)
        cc = self.compilation_config
        if decision is not None and cc.cudagraph_mode != CUDAGraphMode.NONE:
            split = bool(cc.splitting_ops)
            mode, reasons = ag.resolve_graph_mode(
                decision.resolved_from,
                weakest.name,
                attention_is_split=split,
                uniform_decode_query_len=self.uniform_decode_query_len,
                attention_backend=weakest_name,
                log=False,
            )
            self._resolution_reasons = tuple(reasons)
            if mode.name != decision.effective:
                logger.warning(
                    "graph mode %s -> %s with the attention backends built (%s supports %s), "
                    "not %s as decided at start-up: %s",
                    decision.requested,
                    mode.name,
                    weakest_name,
                    weakest.name,
                    decision.effective,
                    "; ".join(reasons),
                )
            cc.cudagraph_mode = CUDAGraphMode[mode.name]
        # vLLM's own resolution then sees a mode it has nothing to narrow in; it still sets the
        # capture sizes and initialises the dispatcher's keys.
        super()._check_and_update_cudagraph_mode(  # type: ignore[misc]
            attention_backends, kv_cache_groups, **kwargs
        )
        self._resolved_mode = cc.cudagraph_mode.name

    def capture_model(self) -> int:
        cc = self.compilation_config
        if cc.cudagraph_mode == CUDAGraphMode.NONE:
            return 0
        start = time.perf_counter()
        set_cudagraph_capturing_enabled(True)
        bypass = self._xlite.bypassed() if self._xlite is not None else contextlib.nullcontext()
        try:
            with bypass:
                for runtime_mode, descriptors in self.cudagraph_dispatcher.get_capture_descs():
                    # Largest first (the dispatcher's order): smaller graphs reuse the pool.
                    self._capture_cudagraphs(descriptors, runtime_mode)  # type: ignore[attr-defined]
        finally:
            set_cudagraph_capturing_enabled(False)
        self._capture_seconds = time.perf_counter() - start
        pool_bytes = _pool_bytes()
        logger.info(
            "graph capture finished in %.2f s, graph pool %.2f MiB",
            self._capture_seconds,
            pool_bytes / 2**20,
        )
        return pool_bytes

    def graph_report(self) -> dict[str, Any]:
        """Counts of this worker's graphs, for tests, the demo and the logs (JSON-able)."""
        from vllm_ascend_plugin.compiler import FUSION_REPORTS

        decision = graph_decision(self.vllm_config)
        full = self._full_wrapper
        pieces = [w for w in ACLGraphWrapper._all_instances if w is not full]
        # Every piece of a piecewise forward captures and replays once per step; the piece
        # that ran first in the forward stands for the step.
        first_piece = max(pieces, key=lambda w: w.stats.replays + w.stats.captures, default=None)
        return {
            "requested": decision.requested if decision else None,
            "effective": self._resolved_mode or self.compilation_config.cudagraph_mode.name,
            # The start-up decision's reasons, then any the runner's own resolution added (the
            # same narrowing found twice is one reason; the backend name differs in wording).
            "reasons": _merged_reasons(
                decision.reasons if decision else (), self._resolution_reasons
            ),
            "npugraph_ex": bool(decision and decision.compilation.npugraph_ex),
            "full_descriptors": _descriptors(full),
            "piecewise_descriptors": _descriptors(first_piece),
            "full_replays": full.stats.replays if full else 0,
            "piecewise_replays": first_piece.stats.replays if first_piece else 0,
            "piecewise_wrappers": len(pieces),
            "capture_seconds": self._capture_seconds,
            "graph_pool_bytes": _pool_bytes(),
            "fusion_reports": list(FUSION_REPORTS),
            "fused_ops_in_full_graphs": _fused_ops(full),
            "xlite": self._xlite.report() if self._xlite is not None else None,
        }


def _merged_reasons(startup: tuple[str, ...], runner: tuple[str, ...]) -> list[str]:
    seen = {reason.split(": ", 1)[0] for reason in startup}
    return list(startup) + [r for r in runner if r.split(": ", 1)[0] not in seen]


def _descriptors(wrapper: ACLGraphWrapper | None) -> list[list[Any]]:
    if wrapper is None:
        return []
    out = []
    for key, entry in wrapper.entries.items():
        descriptor: Any = key  # vLLM's BatchDescriptor
        if entry.graph is not None:
            out.append([descriptor.num_tokens, descriptor.num_reqs, bool(descriptor.uniform)])
    return sorted(out)


def _fused_ops(wrapper: ACLGraphWrapper | None) -> dict[str, int]:
    """Per captured FULL graph (by token count), how many npugraph_ex ops its replay launches."""
    if wrapper is None:
        return {}
    counts: dict[str, int] = {}
    for key, entry in wrapper.entries.items():
        descriptor: Any = key
        if entry.graph is not None:
            counts[str(descriptor.num_tokens)] = sum(
                1 for name in (entry.graph.op_names() or ()) if name.startswith("npugraph_ex::")
            )
    return counts


def _pool_bytes() -> int:
    from vllm_ascend_plugin.device import shared_graph_pool

    return int(shared_graph_pool().nbytes)
