"""Exception types raised by the graph runtime.

Every error names what went wrong and, where there is one, what the caller should do instead.
"""

from __future__ import annotations

__all__ = [
    "AclGraphError",
    "BackendUnavailableError",
    "CaptureError",
    "CaptureSizeError",
    "CompileOptionsError",
    "GraphInputError",
    "GraphModeError",
    "TaskUpdateError",
]


class AclGraphError(RuntimeError):
    """Base class of every error raised by ``ascend_aclgraph``."""


class BackendUnavailableError(AclGraphError):
    """The requested graph backend cannot run here (missing package, driver or device)."""


class CaptureError(AclGraphError):
    """Something inside a capture cannot be captured (host sync, data-dependent shape, ...)."""


class CaptureSizeError(AclGraphError, ValueError):
    """A capture-size list or a batch size is invalid."""


class CompileOptionsError(AclGraphError, ValueError):
    """Options given to the ``aclgraph`` torch.compile backend are unknown or of the wrong type."""


class GraphInputError(AclGraphError, ValueError):
    """Inputs given to a captured graph do not match what was captured."""


class GraphModeError(AclGraphError, ValueError):
    """A requested graph mode cannot run with the given attention backend and model features."""


class TaskUpdateError(AclGraphError, ValueError):
    """An updatable task cannot be rewritten with the given arguments."""
