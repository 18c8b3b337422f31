"""The ``aclgraph`` torch.compile backend: graph capture for plain PyTorch code, no vLLM needed.

::

    compiled = torch.compile(
        model,
        backend="aclgraph",
        options={"mode": "FULL_AND_PIECEWISE", "batch_sizes": [1, 2, 4, 8]},
        dynamic=True,
    )
    logits = compiled(tokens, positions)                     # mixed batch: PIECEWISE graphs
    with ascend_aclgraph.batch_hint(uniform_decode=True):
        logits = compiled(tokens, positions)                 # uniform decode: a FULL graph

The name ``aclgraph`` is registered through the ``torch_dynamo_backends`` entry point of the
installed distribution. ``torch.compile`` passes ``options`` to the backend as they are (and
``mode=...``, if given instead, is taken as the graph mode). Without the installed entry point,
pass :data:`aclgraph_backend` itself as ``backend=``, or build a configured backend with
:func:`make_compile_backend`, whose :class:`AclGraphCompiler` also exposes the runners and
their counters.

Every compiled graph of one compiler (graph breaks give several, a recompile for a new shape
gives another) gets its own :class:`~ascend_aclgraph.compile_runner.CompiledGraphRunner`; all of
them capture into the compiler's one graph pool, as vLLM shares one global pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ascend_aclgraph.backends import get_backend
from ascend_aclgraph.compile_options import AclGraphCompileOptions
from ascend_aclgraph.compile_runner import CompiledGraphRunner
from ascend_aclgraph.errors import CompileOptionsError
from ascend_aclgraph.piecewise import sum_stats
from ascend_aclgraph.stats import GraphStats

__all__ = ["AclGraphCompiler", "aclgraph_backend", "make_compile_backend", "shared_compiler"]


class AclGraphCompiler:
    """A configured ``aclgraph`` backend: pass it as ``torch.compile(..., backend=compiler)``."""

    __name__ = "aclgraph"

    def __init__(self, options: AclGraphCompileOptions) -> None:
        self.options = options
        self.backend = get_backend(options.backend)
        self.pool = self.backend.new_pool()
        self.runners: list[CompiledGraphRunner] = []
        self._lock = threading.Lock()

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        **kwargs: Any,
    ) -> Callable[..., Any]:
        if kwargs:
            raise CompileOptionsError(
                f"this aclgraph backend was configured by make_compile_backend(); pass every "
                f"option there, not to torch.compile (got {', '.join(sorted(kwargs))})"
            )
        runner = CompiledGraphRunner(
            gm, example_inputs, self.options, backend=self.backend, pool=self.pool
        )
        with self._lock:
            self.runners.append(runner)
        return runner

    @property
    def stats(self) -> GraphStats:
        """Counters of every compiled graph's runner, added up."""
        total = sum_stats([r.stats for r in self.runners])
        pools = {id(p): p for r in self.runners for p in r.pools()}
        total.pool_bytes = sum(p.nbytes for p in pools.values())
        return total

    @property
    def num_graphs(self) -> int:
        """Graphs captured so far (FULL graphs plus one per PIECEWISE piece and descriptor)."""
        return self.stats.captures

    @property
    def eager_calls(self) -> int:
        """Calls that ran eagerly (runtime mode NONE, no usable layout, or grad mode)."""
        return sum(r.eager_calls for r in self.runners)


def make_compile_backend(**options: Any) -> AclGraphCompiler:
    """A backend with ``options`` bound (same keys as ``torch.compile``'s ``options``).

    Raises:
        CompileOptionsError: an unknown key or a bad value, at once rather than at the first
            compiled call.
    """
    return AclGraphCompiler(AclGraphCompileOptions.from_dict(options))


_shared: dict[AclGraphCompileOptions, AclGraphCompiler] = {}
_shared_lock = threading.Lock()


def shared_compiler(options: Mapping[str, Any] | None = None) -> AclGraphCompiler:
    """The compiler :data:`aclgraph_backend` uses for ``options``: one per distinct options.

    Recompiles of one ``torch.compile``'d model pass equal options, so they share a compiler,
    its pool and its counters; read ``shared_compiler(options).stats`` for them.
    """
    parsed = AclGraphCompileOptions.from_dict(options)
    with _shared_lock:
        compiler = _shared.get(parsed)
        if compiler is None:
            compiler = _shared[parsed] = AclGraphCompiler(parsed)
        return compiler


def aclgraph_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``aclgraph`` dynamo backend, as registered under the ``torch_dynamo_backends`` group.

    ``options`` are :class:`AclGraphCompileOptions` keys. ``mode`` is what ``torch.compile``
    forwards from its own ``mode=`` argument, taken here as the graph mode.
    """
    merged = dict(options or {})
    if mode is not None:
        if "mode" in merged:
            raise CompileOptionsError("give the graph mode once: mode= or options['mode']")
        merged["mode"] = mode
    return shared_compiler(merged)(gm, example_inputs)
