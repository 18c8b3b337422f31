"""``ACLGraphWrapper``: vLLM's static-graph wrapper contract on top of ascend_aclgraph.

vLLM builds one wrapper per piece of a piecewise graph (``runtime_mode=PIECEWISE``, from the
platform's ``get_static_graph_wrapper_cls``) and the model runner wraps the whole model once more
for FULL graphs. This class has ``CUDAGraphWrapper``'s shape, so a vLLM engineer finds the same
contract:

- ``__init__(runnable, vllm_config, runtime_mode, cudagraph_options=None)``;
- each call reads ``cudagraph_runtime_mode`` and ``batch_descriptor`` from vLLM's forward
  context and trusts them: NONE, or a mode other than the wrapper's, runs the runnable as is
  (that is how the FULL wrapper and the PIECEWISE wrappers nest);
- one graph per batch descriptor, captured on first sight (vLLM's runner does the warm-up runs
  itself, with the runtime mode NONE) and only while capturing is enabled
  (``validate_cudagraph_capturing_enabled``); replays return non-owning views of the captured
  outputs (weak refs);
- ``unwrap()`` and attribute forwarding to the runnable.

The capture, the pool, output lifetimes and the device differences (npu / cpu twin) are
ascend_aclgraph's :class:`~ascend_aclgraph.GraphWrapper`. What FULL graphs add is the per-step
update of attention's host-side parameters (see :mod:`vllm_ascend_plugin.graph_params`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

import ascend_aclgraph as ag
from ascend_aclgraph.backends.base import TaskUpdates
from ascend_aclgraph.wrapper import GraphEntry
from vllm.compilation.counter import compilation_counter
from vllm.compilation.cuda_graph import CUDAGraphOptions
from vllm.compilation.monitor import validate_cudagraph_capturing_enabled
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available

from vllm_ascend_plugin import graph_params
from vllm_ascend_plugin.device import graph_backend_name, shared_graph_pool

__all__ = ["ACLGraphWrapper"]


class ACLGraphWrapper(ag.GraphWrapper):
    """Capture/replay a vLLM runnable per batch descriptor (see the module docstring)."""

    # Every live wrapper, for the runner's counters and for clear_all_graphs().
    _all_instances: ClassVar[weakref.WeakSet[ACLGraphWrapper]] = weakref.WeakSet()

    def __init__(
        self,
        runnable: Callable[..., Any],
        vllm_config: VllmConfig,
        runtime_mode: CUDAGraphMode,
        cudagraph_options: CUDAGraphOptions | None = None,
    ) -> None:
        if runtime_mode == CUDAGraphMode.NONE:
            raise ValueError("ACLGraphWrapper needs runtime mode PIECEWISE or FULL, not NONE")
        options = cudagraph_options or CUDAGraphOptions()
        super().__init__(
            runnable,
            ag.GraphMode.parse(runtime_mode.name),
            backend=graph_backend_name(),
            pool=shared_graph_pool(),
            options=ag.GraphOptions(
                # vLLM's runner runs the warm-ups itself (runtime mode NONE) before a capture.
                num_warmups=0,
                weak_ref_outputs=options.weak_ref_output,
            ),
        )
        self.vllm_config = vllm_config
        self.vllm_runtime_mode = runtime_mode
        self.cudagraph_options = options
        ACLGraphWrapper._all_instances.add(self)

    @classmethod
    def clear_all_graphs(cls) -> None:
        for instance in list(cls._all_instances):
            instance.clear_graphs()

    def clear_graphs(self) -> None:
        self.entries.clear()

    @property
    def cudagraph_wrapper(self) -> ACLGraphWrapper:
        return self

    def unwrap(self) -> Callable[..., Any]:
        runnable = self.runnable
        unwrap = getattr(runnable, "unwrap", None)
        return unwrap() if callable(unwrap) else runnable

    def graph_key(self) -> Hashable | None:
        if not is_forward_context_available():
            # Outside the model runner's forward (an encoder run, say): no graphs.
            return None
        context = get_forward_context()
        mode = context.cudagraph_runtime_mode
        if mode == CUDAGraphMode.NONE or mode != self.vllm_runtime_mode:
            return None
        descriptor: Hashable | None = context.batch_descriptor
        if descriptor is None:
            raise RuntimeError(
                f"forward context asks for {mode.name} graphs without a batch descriptor"
            )
        entry = self.entries.get(descriptor)
        if entry is None or entry.graph is None:
            # A capture is about to happen: only legal while the runner captures.
            validate_cudagraph_capturing_enabled()
        return descriptor

    def _capture(self, entry: GraphEntry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with graph_params.capturing(entry.descriptor):
            output = super()._capture(entry, args, kwargs)
        compilation_counter.num_cudagraph_captured += 1
        return output

    def task_updates(self, entry: GraphEntry) -> TaskUpdates | None:
        if self.runtime_mode is not ag.GraphMode.FULL or entry.graph is None:
            return None
        # vllm-ascend's update_full_graph_params: this step's attention parameters for every
        # attention task of the graph; the backend applies them after the replay is enqueued.
        return graph_params.full_graph_updates(entry.descriptor, entry.graph)
