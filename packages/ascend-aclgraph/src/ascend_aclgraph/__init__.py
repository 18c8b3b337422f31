"""ascend_aclgraph: capture/replay graph runtime for PyTorch on Ascend NPUs, CUDA and a CPU twin.

Standalone use, no vLLM needed::

    import ascend_aclgraph
    step = ascend_aclgraph.capture(model, (tokens, positions), batch_sizes=[1, 8, 32])
    out = step(tokens, positions)          # padded, replayed, cut back to the real batch

Or through torch.compile (FULL / PIECEWISE / FULL_AND_PIECEWISE graphs per batch size)::

    compiled = torch.compile(model, backend="aclgraph", dynamic=True,
                             options={"mode": "FULL_AND_PIECEWISE", "batch_sizes": [1, 8, 32]})
"""

from ascend_aclgraph.attention_support import AttentionSupport
from ascend_aclgraph.backends import (
    Graph,
    GraphBackend,
    GraphPool,
    available_backends,
    get_backend,
)
from ascend_aclgraph.batch_hint import batch_hint, current_uniform_decode
from ascend_aclgraph.capture_sizes import CaptureSizes, default_capture_sizes
from ascend_aclgraph.compile_backend import (
    AclGraphCompiler,
    aclgraph_backend,
    make_compile_backend,
    shared_compiler,
)
from ascend_aclgraph.compile_options import AclGraphCompileOptions
from ascend_aclgraph.compile_runner import CompiledGraphRunner
from ascend_aclgraph.dispatcher import GraphDispatcher
from ascend_aclgraph.errors import (
    AclGraphError,
    BackendUnavailableError,
    CaptureError,
    CaptureSizeError,
    CompileOptionsError,
    GraphInputError,
    GraphModeError,
    TaskUpdateError,
)
from ascend_aclgraph.graph_capture import weak_ref_tensor, weak_ref_tensors
from ascend_aclgraph.graph_context import GraphContext, current_graph_context, graph_context
from ascend_aclgraph.guard_free import GuardFreeModule
from ascend_aclgraph.modes import BatchDescriptor, GraphMode
from ascend_aclgraph.piecewise import PiecewiseGraph
from ascend_aclgraph.resolution import resolve_graph_mode
from ascend_aclgraph.row_analysis import register_row_wise_op
from ascend_aclgraph.splitting import DEFAULT_SPLITTING_OPS, SplittingOps, split_graph
from ascend_aclgraph.standalone import CapturedCallable, capture
from ascend_aclgraph.stats import GraphStats
from ascend_aclgraph.tasks import UpdatableTask, declare_host_tensor_arguments, updatable
from ascend_aclgraph.wrapper import GraphEntry, GraphOptions, GraphWrapper

try:
    from ascend_aclgraph._version import __version__
except ImportError:  # running from a source tree that was never built
    __version__ = "0.0.0+unknown"

__all__ = [
    "DEFAULT_SPLITTING_OPS",
    "AclGraphCompileOptions",
    "AclGraphCompiler",
    "AclGraphError",
    "AttentionSupport",
    "BackendUnavailableError",
    "BatchDescriptor",
    "CaptureError",
    "CaptureSizeError",
    "CaptureSizes",
    "CapturedCallable",
    "CompileOptionsError",
    "CompiledGraphRunner",
    "Graph",
    "GraphBackend",
    "GraphContext",
    "GraphDispatcher",
    "GraphEntry",
    "GraphInputError",
    "GraphMode",
    "GraphModeError",
    "GraphOptions",
    "GraphPool",
    "GraphStats",
    "GraphWrapper",
    "GuardFreeModule",
    "PiecewiseGraph",
    "SplittingOps",
    "TaskUpdateError",
    "UpdatableTask",
    "__version__",
    "aclgraph_backend",
    "available_backends",
    "batch_hint",
    "capture",
    "current_graph_context",
    "current_uniform_decode",
    "declare_host_tensor_arguments",
    "default_capture_sizes",
    "get_backend",
    "graph_context",
    "make_compile_backend",
    "register_row_wise_op",
    "resolve_graph_mode",
    "shared_compiler",
    "split_graph",
    "updatable",
    "weak_ref_tensor",
    "weak_ref_tensors",
]
