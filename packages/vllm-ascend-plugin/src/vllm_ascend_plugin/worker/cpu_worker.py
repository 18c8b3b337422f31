"""The CPU twin platform's worker and model runner: vLLM's CPU ones plus graph mode.

vLLM's ``CPUWorker`` never captures graphs and its ``CPUModelRunner`` never wraps the model for
FULL graphs; the inherited GPU ``capture_model`` needs CUDA streams. These subclasses add the
graph-mode runner methods (:class:`~vllm_ascend_plugin.worker.graph_runner.GraphModelRunnerMixin`,
the same ones the NPU runner uses) and the start-up capture, and keep everything else of vLLM's
CPU path (threads binding, memory sizing, KV cache layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_ascend_plugin.config import parse_additional_config
from vllm_ascend_plugin.graph_config import our_additional_config
from vllm_ascend_plugin.worker.graph_runner import GraphModelRunnerMixin

__all__ = ["CpuTwinModelRunner", "CpuTwinWorker"]


class CpuTwinModelRunner(GraphModelRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with ACLGraph capture/replay on the cpu twin backend."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        keep = parse_additional_config(
            our_additional_config(self.vllm_config)
        ).xlite_graph_config.enabled
        with _linear_weights_kept(keep):
            super().load_model(*args, **kwargs)


@contextmanager
def _linear_weights_kept(keep: bool) -> Iterator[None]:
    """Keep vLLM's linear weights after the CPU platform packs them (for the Xlite stand-in).

    vLLM's CPU linear layers hand their weight to a packed GEMM (oneDNN, sgl) after loading
    and release the original tensor. The XliteGraph path maps the model's own weight tensors
    into Xlite's slots (shared, never copied), so while it is on, the originals stay: the
    packed kernels still serve vLLM's forward, and the memory of the linear weights doubles.
    """
    if not keep:
        yield
        return
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_weight(layer: Any, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch


class CpuTwinWorker(CPUWorker):
    """vLLM's CPU worker that builds :class:`CpuTwinModelRunner` and captures at start-up."""

    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(
                f"the CPU twin platform needs vLLM's V1 CPUModelRunner, got "
                f"{type(self.model_runner).__name__} (VLLM_USE_V2_MODEL_RUNNER is not supported)"
            )
        # CPUWorker built the runner (with its CPU-specific set-up); it becomes ours in place.
        self.model_runner.__class__ = CpuTwinModelRunner

    def compile_or_warm_up_model(self) -> Any:
        times = super().compile_or_warm_up_model()
        if not self.model_config.enforce_eager:
            self.model_runner.capture_model()
        return times

    def graph_report(self) -> dict[str, Any]:
        """This worker's graph counters (``LLM.collective_rpc("graph_report")``)."""
        runner = self.model_runner
        assert isinstance(runner, CpuTwinModelRunner)
        return runner.graph_report()
