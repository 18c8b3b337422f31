"""``AscendCompiler``: the ``CompilerInterface`` vLLM's ``VllmBackend`` calls for each graph.

What it does per graph mode is the user guide's table:

- FULL / FULL_DECODE_ONLY (one whole graph): npugraph_ex optimizes it (aot_autograd to aten,
  the fusion passes, static kernels when enabled) with ``force_eager``: compile-time only, and
  ACLGraph captures the optimized callable at run time;
- PIECEWISE / FULL_AND_PIECEWISE, or npugraph_ex switched off: the graph runs as traced, without
  npugraph_ex (vLLM's own post-grad passes are CUDA-only, so none apply on our platforms);
- NONE: vLLM does not compile at all.

Every graph's fusion report is kept in :data:`FUSION_REPORTS` (the worker returns them with its
graph report) and logged. ``compute_hash`` covers what changes the compiled result: the plugin
and npugraph_ex versions, the pass manager's source hash, and the decision (npugraph_ex, static
kernels, which fusions), so vLLM's compile cache never serves a graph compiled another way.

Caching: ``compile`` returns a handle (the cache key) and ``load`` recompiles from the graph vLLM
gives it. vLLM's cache then saves the Dynamo trace and the split on a second start with the
same configuration; the fusion passes themselves are cheap to run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from torch import fx
from vllm.compilation.compiler_interface import CompilerInterface
from vllm.config import VllmConfig

from vllm_ascend_plugin.config import CompilationDecision
from vllm_ascend_plugin.graph_config import graph_decision

__all__ = ["FUSION_REPORTS", "AscendCompiler"]

logger = logging.getLogger(f"vllm.{__name__}")  # shown by vLLM's logging set-up

#: One entry per graph compiled in this process: the npugraph_ex fusion report as a dict.
FUSION_REPORTS: list[dict[str, Any]] = []


def _decision(vllm_config: VllmConfig | None) -> CompilationDecision | None:
    if vllm_config is None:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
    decision = graph_decision(vllm_config)
    return None if decision is None else decision.compilation


class AscendCompiler(CompilerInterface):
    """vLLM compiler interface for graph mode on Ascend (see the module docstring)."""

    name = "ascend_graph"

    def __init__(self) -> None:
        self._decision: CompilationDecision | None = None

    def compute_hash(self, vllm_config: VllmConfig) -> str:
        import ascend_npugraph_ex
        from ascend_npugraph_ex import PassManager

        import vllm_ascend_plugin

        decision = _decision(vllm_config)
        self._decision = decision
        fusions = _fusion_names(decision)
        payload = {
            "plugin": vllm_ascend_plugin.__version__,
            "npugraph_ex": getattr(ascend_npugraph_ex, "__version__", "unknown"),
            "passes": PassManager(tuple(fusions)).uuid(),
            "decision": None
            if decision is None
            else {
                "npugraph_ex": decision.npugraph_ex,
                "static_kernel": decision.static_kernel,
                "fusion_passes": list(fusions),
            },
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def initialize_cache(
        self, cache_dir: str, disable_cache: bool = False, prefix: str = ""
    ) -> None:
        self.cache_dir = cache_dir

    def compile(
        self,
        graph: fx.GraphModule,
        example_inputs: list[Any],
        compiler_config: dict[str, Any],
        compile_range: Any,
        key: str | None = None,
    ) -> tuple[Callable[..., Any] | None, Any | None]:
        decision = self._decision or _decision(None)
        compiled = self._compile(graph, example_inputs, decision)
        return compiled, key

    def load(
        self,
        handle: Any,
        graph: fx.GraphModule,
        example_inputs: list[Any],
        graph_index: int,
        compile_range: Any,
    ) -> Callable[..., Any]:
        decision = self._decision or _decision(None)
        return self._compile(graph, example_inputs, decision)

    def _compile(
        self,
        graph: fx.GraphModule,
        example_inputs: list[Any],
        decision: CompilationDecision | None,
    ) -> Callable[..., Any]:
        if decision is None or not decision.npugraph_ex:
            FUSION_REPORTS.append({"npugraph_ex": False, "counts": {}, "fused_ops": 0})
            return graph
        from ascend_npugraph_ex import NpugraphExOptions, compile_graph

        enabled = _fusion_names(decision)
        switches = {name: name in enabled for name in _FUSE_SWITCHES}
        options = NpugraphExOptions.from_mapping(
            {
                "force_eager": True,
                "static_kernel": decision.static_kernel,
                **{f"fuse_{name}": on for name, on in switches.items()},
            }
        )
        compiled, manager = compile_graph(graph, example_inputs, options)
        for report in manager.reports:
            entry = {
                "npugraph_ex": True,
                "counts": dict(report.counts),
                "fused_ops": report.total,
                "nodes_before": report.nodes_before,
                "nodes_after": report.nodes_after,
            }
            FUSION_REPORTS.append(entry)
            logger.info("npugraph_ex fusions, %s", report)
        return compiled


# The fusions of ascend_npugraph_ex, by the suffix of their ``fuse_*`` switch.
_FUSE_SWITCHES = ("add_rms_norm", "rms_norm", "swiglu", "rotary", "qk_norm_rope")


def _fusion_names(decision: CompilationDecision | None) -> tuple[str, ...]:
    """The enabled fusions as ascend_npugraph_ex names them (``fuse_`` prefix dropped)."""
    if decision is None:
        return ()
    return tuple(name.removeprefix("fuse_") for name in decision.fusion_passes)
