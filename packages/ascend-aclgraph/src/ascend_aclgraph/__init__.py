"""ascend_aclgraph: capture/replay graph runtime for PyTorch on Ascend NPUs, CUDA and a CPU twin."""

from ascend_aclgraph.attention_support import AttentionSupport
from ascend_aclgraph.capture_sizes import CaptureSizes, default_capture_sizes
from ascend_aclgraph.dispatcher import GraphDispatcher
from ascend_aclgraph.errors import (
    AclGraphError,
    BackendUnavailableError,
    CaptureError,
    CaptureSizeError,
    GraphInputError,
    GraphModeError,
    TaskUpdateError,
)
from ascend_aclgraph.modes import BatchDescriptor, GraphMode
from ascend_aclgraph.resolution import resolve_graph_mode

__all__ = [
    "AclGraphError",
    "AttentionSupport",
    "BackendUnavailableError",
    "BatchDescriptor",
    "CaptureError",
    "CaptureSizeError",
    "CaptureSizes",
    "GraphDispatcher",
    "GraphInputError",
    "GraphMode",
    "GraphModeError",
    "TaskUpdateError",
    "default_capture_sizes",
    "resolve_graph_mode",
]
