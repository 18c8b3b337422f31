"""Splitting an FX graph at its attention ops, as vLLM's ``split_graph`` does for PIECEWISE graphs.

Attention kernels depend on per-batch metadata (sequence lengths, block tables) that a captured
graph would freeze, so PIECEWISE mode captures only what lies *between* them: the graph is cut
at every *splitting op*, each splitting op gets a submodule of its own that runs eagerly, and
every other submodule is a piece captured per batch descriptor.

Splitting ops are given as any mix of:

* op names, ``"namespace::op"`` (every overload) or ``"namespace::op.overload"`` (one;
  ``.default`` for the default overload), matched by name so that ops of libraries that are
  not loaded (``vllm::unified_attention``) can be listed;
* dotted Python paths, ``"torch.nn.functional.scaled_dot_product_attention"``, imported once;
* ``OpOverload`` / ``OpOverloadPacket`` objects, or any other callable, matched by identity.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.passes.split_module import split_module

__all__ = ["DEFAULT_SPLITTING_OPS", "SplitItem", "SplittingOps", "split_graph"]

SplittingOpSpec = str | Callable[..., Any]

DEFAULT_SPLITTING_OPS: tuple[str, ...] = (
    # Torch-level graphs (what dynamo hands a backend): F.scaled_dot_product_attention is the
    # builtin torch._C._nn.scaled_dot_product_attention.
    "torch.nn.functional.scaled_dot_product_attention",
    # Aten-level graphs (make_fx, AOT autograd): the composite op and every fused variant it
    # may decompose into.
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    # vLLM's attention custom ops (its _attention_ops), so vLLM model graphs split the same way.
    "vllm::unified_attention",
    "vllm::unified_attention_with_output",
    "vllm::unified_mla_attention",
    "vllm::unified_mla_attention_with_output",
)


def _resolve_dotted(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    raise ImportError(path)


def _op_names(target: Any) -> tuple[str, ...]:
    """The names a node target answers to: ``ns::op`` and, for one overload, ``ns::op.ovl``."""
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        overload = schema.overload_name or "default"
        return (schema.name, f"{schema.name}.{overload}")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return (target._qualified_op_name,)
    return ()


class SplittingOps:
    """A matcher for FX nodes that call one of the given splitting ops.

    Raises:
        ValueError: a spec is neither an op name, an importable dotted path, nor a callable.
    """

    def __init__(self, specs: Iterable[SplittingOpSpec] | None = None) -> None:
        self.specs: tuple[SplittingOpSpec, ...] = tuple(
            DEFAULT_SPLITTING_OPS if specs is None else specs
        )
        self._names: set[str] = set()
        self._objects: list[Any] = []
        self._packets: list[torch._ops.OpOverloadPacket] = []
        for spec in self.specs:
            if isinstance(spec, str):
                if "::" in spec:
                    self._names.add(spec)
                    continue
                try:
                    self._objects.append(_resolve_dotted(spec))
                except (ImportError, AttributeError) as exc:
                    raise ValueError(
                        f"splitting op {spec!r} is neither an op name ('namespace::op') nor an "
                        f"importable dotted path ({exc})"
                    ) from exc
            elif isinstance(spec, torch._ops.OpOverloadPacket):
                self._packets.append(spec)
            elif callable(spec):
                self._objects.append(spec)
            else:
                raise ValueError(
                    f"splitting op {spec!r} must be an op name ('namespace::op'), a dotted "
                    "path, an OpOverload/OpOverloadPacket or a callable"
                )

    def matches(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` calls a splitting op."""
        if node.op != "call_function":
            return False
        target = node.target
        if any(target is obj for obj in self._objects):
            return True
        if isinstance(target, torch._ops.OpOverload) and any(
            target.overloadpacket is p for p in self._packets
        ):
            return True
        return any(name in self._names for name in _op_names(target))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SplittingOps):
            return NotImplemented
        return self.specs == other.specs

    def __hash__(self) -> int:
        return hash(self.specs)

    def __repr__(self) -> str:
        return f"SplittingOps({list(self.specs)!r})"


@dataclass(frozen=True)
class SplitItem:
    """One submodule of a split graph, in execution order."""

    name: str
    module: torch.fx.GraphModule
    is_splitting: bool


def split_graph(
    gm: torch.fx.GraphModule, splitting_ops: SplittingOps | Sequence[SplittingOpSpec] | None
) -> tuple[torch.fx.GraphModule, list[SplitItem]]:
    """Cut ``gm`` before and after every splitting op.

    Returns the split module (its forward calls the submodules in the original order) and the
    submodules in execution order. Each splitting op sits alone in its submodule, together with
    the ``getitem`` nodes unpacking its tuple result, so that no captured piece ever contains
    one. ``gm`` itself is left unchanged.
    """
    matcher = (
        splitting_ops if isinstance(splitting_ops, SplittingOps) else SplittingOps(splitting_ops)
    )
    subgraph = 0
    node_to_subgraph: dict[torch.fx.Node, int] = {}
    splitting_ids: set[int] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and node_to_subgraph.get(source) in splitting_ids:
                node_to_subgraph[node] = node_to_subgraph[source]
                continue
        if matcher.matches(node):
            subgraph += 1
            node_to_subgraph[node] = subgraph
            splitting_ids.add(subgraph)
            subgraph += 1
        else:
            node_to_subgraph[node] = subgraph
    split_gm = split_module(gm, gm, lambda node: node_to_subgraph[node], keep_original_order=True)
    items = []
    for node in split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = getattr(split_gm, name)
        index = int(name.rsplit("_", 1)[1])
        items.append(SplitItem(name, module, index in splitting_ids))
    return split_gm, items
