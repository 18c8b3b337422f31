"""Exception types raised by the npugraph_ex compiler.

Every error names what went wrong and what the caller can do instead.
"""

from __future__ import annotations

__all__ = [
    "NpugraphExError",
    "NpugraphExOptionsError",
    "StaticKernelCacheError",
]


class NpugraphExError(RuntimeError):
    """Base class of every error raised by ``ascend_npugraph_ex``."""


class NpugraphExOptionsError(NpugraphExError, ValueError):
    """An option is unknown, has the wrong type, or contradicts another option."""


class StaticKernelCacheError(NpugraphExError):
    """A static-kernel cache entry cannot be used (corrupt, foreign or unreadable)."""
