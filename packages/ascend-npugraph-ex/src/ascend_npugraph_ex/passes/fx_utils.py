"""Small helpers the fusion passes share: op tests, metadata access, safe node insertion."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, TypeGuard

import torch
from torch import fx

__all__ = [
    "FusionRewrite",
    "fake_val",
    "is_call",
    "last_dim",
    "users_within",
]

aten = torch.ops.aten


def is_call(node: object, *targets: Any) -> TypeGuard[fx.Node]:
    """Whether ``node`` is an FX ``call_function`` node of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def fake_val(node: object) -> torch.Tensor | None:
    """The fake tensor aot_autograd stored on ``node`` (``meta["val"]``), if it is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def last_dim(dim: object, ndim: int) -> bool:
    """Whether ``dim`` (an int or a one-element list) names the last of ``ndim`` dims."""
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def users_within(node: fx.Node, allowed: Iterable[fx.Node]) -> bool:
    """Whether every user of ``node`` is in ``allowed`` (an intermediate may not escape)."""
    allowed_set = set(allowed)
    return all(user in allowed_set for user in node.users)


def _fake_call(target: Any, args: tuple[Any, ...]) -> Any:
    """Run ``target`` on the inputs' fake values (None if any is missing)."""
    from torch._guards import detect_fake_mode

    vals = [fake_val(a) if isinstance(a, fx.Node) else a for a in args]
    if any(v is None for v in vals):
        return None
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    with mode:
        return target(*vals)


def _same_layout(out: Any, replaces: Sequence[fx.Node | None]) -> bool:
    """Whether the fused outputs have the shape, dtype and strides of the values they replace.

    Later ``view`` nodes were traced against those strides (an SDPA output's layout follows its
    query's), so a fused op that changed a layout would break them at run time.
    """
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    for new, old in zip(outs, replaces, strict=True):
        if old is None:
            continue
        ref = fake_val(old)
        if ref is None or not isinstance(new, torch.Tensor):
            return False
        if new.shape != ref.shape or new.dtype != ref.dtype or new.stride() != ref.stride():
            return False
    return True


class FusionRewrite:
    """Replaces a matched subgraph with one fused op call, or declines when it cannot do so safely.

    The fused node goes right after the latest of its inputs; every outside user of a replaced
    value must come after that point, otherwise the match is declined (the graph stays valid
    without a re-sort).
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._order: dict[fx.Node, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-number the graph after an outside edit."""
        self._order = {n: i for i, n in enumerate(self.graph.nodes)}

    def position(self, node: fx.Node) -> int:
        """The index of ``node`` in graph order (as of the last refresh)."""
        return self._order[node]

    def anchor(self, inputs: Sequence[fx.Node]) -> fx.Node:
        """The node after which a new node using ``inputs`` may be inserted."""
        latest = max(inputs, key=lambda n: self._order[n])
        if latest.op == "placeholder":
            # Keep placeholders together at the top: insert after the last one.
            placeholders: list[fx.Node] = [n for n in self.graph.nodes if n.op == "placeholder"]
            return placeholders[-1]
        return latest

    def apply(
        self,
        target: Any,
        args: tuple[Any, ...],
        replaces: Sequence[fx.Node | None],
        erase: Iterable[fx.Node],
    ) -> bool:
        """Insert ``target(*args)`` and reroute the users of ``replaces``.

        ``replaces[i]`` is the node whose value output ``i`` of the fused op takes over (None:
        unused output; a single-output op takes ``replaces[0]``). Nodes in
        ``erase`` are removed when dead. Returns False (graph untouched) if unsafe.
        """
        inputs = [a for a in args if isinstance(a, fx.Node)]
        anchor = self.anchor(inputs)
        pos = self._order[anchor]
        erase_set = set(erase)
        for old in replaces:
            if old is None:
                continue
            for user in old.users:
                if user not in erase_set and self._order[user] <= pos:
                    return False
        fake_out = _fake_call(target, args)
        if fake_out is None or not _same_layout(fake_out, replaces):
            return False
        with self.graph.inserting_after(anchor):
            fused = self.graph.call_function(target, args)
        fused.meta["val"] = fake_out
        outputs: list[fx.Node] = []
        if len(replaces) == 1:
            outputs.append(fused)
        else:
            cursor = fused
            for i in range(len(replaces)):
                with self.graph.inserting_after(cursor):
                    cursor = self.graph.call_function(operator.getitem, (fused, i))
                outputs.append(cursor)
        for old, new in zip(replaces, outputs, strict=True):
            if old is None:
                continue
            if "val" in old.meta:
                new.meta["val"] = old.meta["val"]
            old.replace_all_uses_with(new)
        # Erase in reverse topological order so each node is dead when its turn comes.
        for node in sorted(erase_set, key=lambda n: self._order[n], reverse=True):
            if not node.users:
                self.graph.erase_node(node)
        self.refresh()
        return True
