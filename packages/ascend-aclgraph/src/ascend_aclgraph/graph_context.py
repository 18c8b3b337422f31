"""Which runtime mode and batch descriptor the current forward pass runs under.

The same role as vLLM's forward context fields ``cudagraph_runtime_mode`` and
``batch_descriptor``: the caller (a model runner, or :func:`ascend_aclgraph.capture`) decides once
per step, and every :class:`~ascend_aclgraph.wrapper.GraphWrapper` below reads it. A wrapper
whose runtime mode differs passes the call through, which is how FULL and PIECEWISE wrappers
nest under FULL_AND_PIECEWISE.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

from ascend_aclgraph.modes import BatchDescriptor, GraphMode

__all__ = [
    "GraphContext",
    "current_graph_context",
    "enter_graph_context",
    "exit_graph_context",
    "graph_context",
]


class GraphContext(NamedTuple):
    runtime_mode: GraphMode
    descriptor: BatchDescriptor | None


_NONE = GraphContext(GraphMode.NONE, None)
_current: contextvars.ContextVar[GraphContext] = contextvars.ContextVar(
    "ascend_aclgraph_graph_context", default=_NONE
)


def current_graph_context() -> GraphContext:
    return _current.get()


def make_graph_context(
    runtime_mode: GraphMode, descriptor: BatchDescriptor | None = None
) -> GraphContext:
    """A validated context: a runtime mode, and a descriptor unless the mode is NONE."""
    if not runtime_mode.valid_runtime_modes():
        raise ValueError(
            "a forward pass runs in a runtime mode (NONE, PIECEWISE, FULL), "
            f"not {runtime_mode.name}"
        )
    if runtime_mode is not GraphMode.NONE and descriptor is None:
        raise ValueError(f"runtime mode {runtime_mode.name} needs a BatchDescriptor")
    return GraphContext(runtime_mode, descriptor)


def enter_graph_context(ctx: GraphContext) -> contextvars.Token[GraphContext]:
    """Make ``ctx`` current; pass the token to :func:`exit_graph_context`.

    The allocation-free form of :func:`graph_context` for runners that keep one validated
    context per batch size and switch to it on every call.
    """
    return _current.set(ctx)


def exit_graph_context(token: contextvars.Token[GraphContext]) -> None:
    _current.reset(token)


@contextlib.contextmanager
def graph_context(
    runtime_mode: GraphMode, descriptor: BatchDescriptor | None = None
) -> Iterator[GraphContext]:
    """Run the block as one forward pass in ``runtime_mode`` keyed by ``descriptor``."""
    ctx = make_graph_context(runtime_mode, descriptor)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
