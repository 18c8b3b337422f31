"""ascend_aclgraph: capture/replay graph runtime for PyTorch on Ascend NPUs, CUDA and a CPU twin."""

from ascend_aclgraph.capture_sizes import CaptureSizes, default_capture_sizes
from ascend_aclgraph.errors import (
    AclGraphError,
    BackendUnavailableError,
    CaptureError,
    CaptureSizeError,
    GraphInputError,
    TaskUpdateError,
)
from ascend_aclgraph.modes import BatchDescriptor, GraphMode

__all__ = [
    "AclGraphError",
    "BackendUnavailableError",
    "BatchDescriptor",
    "CaptureError",
    "CaptureSizeError",
    "CaptureSizes",
    "GraphInputError",
    "GraphMode",
    "TaskUpdateError",
    "default_capture_sizes",
]
