"""Telling the ``aclgraph`` compile backend what kind of batch the next calls carry.

vLLM's scheduler knows when a step is a *uniform decode* batch (every request has the same
query length), and its dispatcher sends those to FULL graphs under FULL_DECODE_ONLY and
FULL_AND_PIECEWISE. Plain PyTorch code has no scheduler, so the caller says it::

    with ascend_aclgraph.batch_hint(uniform_decode=True):
        logits = compiled(tokens, positions)

Outside any hint a batch is mixed (prefill and decode together), the safe default: a mixed
batch never runs a graph captured for uniform batches.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["batch_hint", "current_uniform_decode"]

_uniform_decode: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ascend_aclgraph_uniform_decode", default=False
)


@contextlib.contextmanager
def batch_hint(*, uniform_decode: bool) -> Iterator[None]:
    """Mark the calls made in the block as uniform decode batches (or explicitly not)."""
    if not isinstance(uniform_decode, bool):
        raise TypeError(f"uniform_decode must be a bool, got {uniform_decode!r}")
    token = _uniform_decode.set(uniform_decode)
    try:
        yield
    finally:
        _uniform_decode.reset(token)


def current_uniform_decode() -> bool:
    """Whether the current call is marked as a uniform decode batch."""
    return _uniform_decode.get()
