"""The ``npugraph_ex`` torch.compile backend.

``torch.compile(model, backend="npugraph_ex", options={...})`` finds this module through the
``torch_dynamo_backends`` entry point; torch passes ``options`` on to the backend as a keyword (it
only rejects ``mode`` together with ``options``). :func:`make_backend` binds validated options to
a backend callable for code that prefers ``backend=make_backend(force_eager=True)``.

Pipeline: dynamo graph → aot_autograd (aten level; the fusion passes run on the forward /
inference graph) → optionally static kernels → either returned as is (``force_eager``) or
captured by ascend_aclgraph's compile runner (the same padding and state rules as the
``aclgraph`` backend).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from ascend_npugraph_ex.errors import NpugraphExError, NpugraphExOptionsError
from ascend_npugraph_ex.options import NpugraphExOptions
from ascend_npugraph_ex.passes.in_place import restore_in_place_ops
from ascend_npugraph_ex.passes.manager import PassManager
from ascend_npugraph_ex.static_kernel import StaticKernelCache

__all__ = ["CompiledGraph", "make_backend", "npugraph_ex_backend"]

logger = logging.getLogger(__name__)

CompiledGraph = Callable[..., Any]


def _is_npu(example_inputs: Sequence[Any]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "npu" for t in example_inputs)


def _npu_static_kernel(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: NpugraphExOptions
) -> CompiledGraph:
    """Hand the optimized graph to npugraph_ex with static kernels on (as vllm-ascend does)."""
    import npugraph_ex as nge  # type: ignore[import-not-found]
    from npugraph_ex.configs.compiler_config import (  # type: ignore[import-not-found]
        _process_kwargs_options,
    )

    config = nge.CompilerConfig()
    options: dict[str, Any] = {
        "force_eager": True,  # capture is ours (or vLLM's), not npugraph_ex's
        "inplace_pass": False,
        "clone_input": False,
        "clone_output": False,
        "static_kernel_compile": True,
    }
    if opts.batch_sizes:
        options["_vllm_aclnn_static_kernel_sym_range"] = list(opts.batch_sizes)
    _process_kwargs_options(config, {"options": options})
    compiled: CompiledGraph = nge.get_npu_backend(compiler_config=config)(gm, example_inputs)
    return compiled


def _capture(
    gm: fx.GraphModule,
    compiled: CompiledGraph,
    example_inputs: Sequence[Any],
    opts: NpugraphExOptions,
) -> CompiledGraph:
    """Capture ``compiled`` (a static-shape graph) with ascend_aclgraph: reduce-overhead mode.

    The runner is ascend_aclgraph's own compile runner, so which inputs are batched (the
    caller's tensors; never parameters or buffers, whose writes stay the module's), how outputs
    are returned and when a call must run eagerly are decided by the one rule in
    :mod:`ascend_aclgraph.batch_layout`, exactly as for ``backend="aclgraph"``.
    """
    import ascend_aclgraph
    from ascend_aclgraph.compile_runner import CompiledGraphRunner

    if any(isinstance(t, torch.SymInt) for t in example_inputs) or any(
        isinstance(t, torch.Tensor) and not all(isinstance(s, int) for s in t.shape)
        for t in example_inputs
    ):
        raise NpugraphExError(
            "npugraph_ex capture mode needs a static-shape graph (each batch size is its own "
            "graph); use torch.compile(..., dynamic=False), or force_eager=True and capture the "
            "result yourself"
        )
    options = ascend_aclgraph.AclGraphCompileOptions.from_dict(
        {
            "mode": "FULL",
            "backend": opts.capture_backend,
            "dynamic_dim": opts.dynamic_dim,
            **({"batch_sizes": list(opts.batch_sizes)} if opts.batch_sizes else {}),
        }
    )
    backend = ascend_aclgraph.get_backend(options.backend)
    return CompiledGraphRunner(
        gm,
        example_inputs,
        options,
        backend=backend,
        pool=backend.new_pool(),
        runnable=compiled,
    )


def compile_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: NpugraphExOptions
) -> tuple[CompiledGraph, PassManager]:
    """Optimize ``gm`` (aot_autograd + fusions) as ``opts`` say; also returns the pass manager."""
    from torch._functorch.aot_autograd import aot_module_simplified

    manager = PassManager(opts.enabled_fusions)
    cache = StaticKernelCache(opts.build_dir, salt=manager.uuid()) if opts.static_kernel else None

    def fw_compiler(fgm: fx.GraphModule, fex: Sequence[Any]) -> CompiledGraph:
        if manager.enabled:
            manager(fgm)
        restore_in_place_ops(fgm)
        if cache is None:
            return fgm
        if _is_npu(fex):
            return _npu_static_kernel(fgm, fex, opts)
        return cache.load_or_build(fgm, fex)

    # Our forward compiler returns a GraphModule, not inductor's OutputCode, so AOTAutograd's
    # cache cannot hold it: callers that switch the cache on (vLLM does, around its piecewise
    # compiles) would otherwise fail with "expected OutputCode".
    with torch._functorch.config.patch(enable_autograd_cache=False, bundled_autograd_cache=False):
        compiled: CompiledGraph = aot_module_simplified(
            gm,
            list(example_inputs),
            fw_compiler=fw_compiler,  # type: ignore[arg-type]  # a plain callable is accepted
        )
    if not opts.force_eager:
        compiled = _capture(gm, compiled, example_inputs, opts)
    return compiled, manager


def npugraph_ex_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **unexpected: Any,
) -> CompiledGraph:
    """The dynamo backend: ``torch.compile(model, backend="npugraph_ex", options={...})``."""
    if mode is not None:
        raise NpugraphExOptionsError(
            f"npugraph_ex takes no torch.compile mode (got mode={mode!r}); use options=, e.g. "
            f"options={{'force_eager': True}}; accepted options: "
            f"{', '.join(NpugraphExOptions.accepted_keys())}"
        )
    if unexpected:
        raise NpugraphExOptionsError(
            f"npugraph_ex backend got unexpected argument(s) {sorted(unexpected)}; pass options "
            f"as options={{...}} with keys: {', '.join(NpugraphExOptions.accepted_keys())}"
        )
    opts = NpugraphExOptions.from_mapping(options)
    return compile_graph(gm, example_inputs, opts)[0]


class _BoundBackend:
    """A backend callable with validated options; ``managers`` keeps each graph's pass manager."""

    def __init__(self, opts: NpugraphExOptions) -> None:
        self.options = opts
        self.managers: list[PassManager] = []
        self.__name__ = "npugraph_ex"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> CompiledGraph:
        compiled, manager = compile_graph(gm, example_inputs, self.options)
        self.managers.append(manager)
        return compiled

    @property
    def reports(self) -> list[Any]:
        """Fusion reports of every graph compiled so far."""
        return [r for m in self.managers for r in m.reports]


def make_backend(**options: Any) -> _BoundBackend:
    """A backend callable with these options bound (validated now, not at first call).

    ``torch.compile(model, backend=make_backend(force_eager=True))``; the returned object's
    ``reports`` lists which fusions fired how often per graph.
    """
    return _BoundBackend(NpugraphExOptions.from_mapping(options))
