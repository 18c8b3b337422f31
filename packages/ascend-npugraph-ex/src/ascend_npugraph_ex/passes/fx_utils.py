"""Small helpers the fusion passes share: op tests, metadata access, transactional rewrites.

A fusion pass must never abort a compile. Every candidate is matched and rewritten inside
:meth:`FusionRewrite.candidate`: a candidate the pass declines, or one whose matching or
replacement raises (a fake kernel's shape check, a view that the new layout does not allow),
leaves the graph exactly as it was, and is recorded as a :class:`SkippedMatch` with the reason
(and logged at DEBUG), so that a missing fusion can be explained from the report.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "Decline",
    "FusionPass",
    "FusionRewrite",
    "SkippedMatch",
    "fake_val",
    "is_call",
    "last_dim",
    "same_sizes",
    "users_within",
]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


@dataclass(frozen=True)
class SkippedMatch:
    """A candidate that a fusion pass recognised but left alone, and why.

    Attributes:
        fusion: the fusion's name (a key of ``passes.FUSIONS``).
        node: the name of the FX node the candidate was found at.
        reason: why it was not fused.
    """

    fusion: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.fusion} at {self.node}: {self.reason}"


class FusionPass(Protocol):
    """A fusion pass: rewrites ``graph`` in place, appends declined candidates to ``skipped``."""

    def __call__(self, graph: fx.Graph, skipped: list[SkippedMatch] | None = None) -> int: ...


class Decline(Exception):
    """Raised inside :meth:`FusionRewrite.candidate` to leave a candidate alone with a reason."""


def is_call(node: object, *targets: Any) -> TypeGuard[fx.Node]:
    """Whether ``node`` is a live FX ``call_function`` node of one of ``targets``.

    Passes collect candidates before rewriting; a node an earlier rewrite erased is no call.
    """
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in targets
        and not getattr(node, "_erased", False)
    )


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


def same_sizes(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether two size (or stride) tuples are provably equal, symbolic entries included.

    ``statically_known_true`` answers without adding a guard: a pass must not specialise a
    dynamic graph just to decide whether it may fuse.
    """
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


def users_within(node: fx.Node, allowed: Iterable[fx.Node]) -> bool:
    """Whether every user of ``node`` is in ``allowed`` (an intermediate may not escape)."""
    allowed_set = set(allowed)
    return all(user in allowed_set for user in node.users)


def _meta_arg(node: fx.Node) -> Any:
    val = node.meta.get("val")
    if isinstance(val, torch.SymFloat):
        # A ``float`` schema argument cannot hold a symbolic float while tracing (the op would
        # guard on it). Fake kernels never read a float argument's value, so any float stands in.
        return 1.0
    return val


def _fake_call(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``target`` on the inputs' fake values (None if any is missing)."""
    from torch._guards import detect_fake_mode

    kwargs = kwargs or {}
    nodes: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), nodes.append)
    if any(n.meta.get("val") is None for n in nodes):
        return None
    vals, kwvals = fx.node.map_arg((args, kwargs), _meta_arg)
    tensors = [n.meta["val"] for n in nodes if isinstance(n.meta["val"], torch.Tensor)]
    mode = detect_fake_mode(tensors)
    if mode is None:
        return None
    with mode:
        return target(*vals, **kwvals)


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
        if ref is None or not isinstance(new, torch.Tensor) or new.dtype != ref.dtype:
            return False
        if not (same_sizes(new.shape, ref.shape) and same_sizes(new.stride(), ref.stride())):
            return False
    return True


class FusionRewrite:
    """Replaces matched subgraphs with fused op calls, one candidate at a time, all or nothing.

    The fused node goes right after the latest of its inputs. An outside user of a replaced
    value that comes before that point (vLLM views q's RoPE output before k's input exists) is
    moved after the fused op, with whatever depends on it up to that point, when none of them
    feeds the fused op's inputs or has side effects; otherwise the match is declined. The graph
    stays in a valid order without a re-sort. Helper nodes a candidate needs (a view moved in
    front of the fused op, a host read of a scalar) are inserted with :meth:`insert` and removed
    again unless :meth:`apply` commits the candidate.

    Args:
        graph: the graph to rewrite.
        fusion: the fusion's name, for :class:`SkippedMatch` records.
        skipped: where to record declined candidates (a fresh list if None).
    """

    def __init__(
        self, graph: fx.Graph, fusion: str, skipped: list[SkippedMatch] | None = None
    ) -> None:
        self.graph = graph
        self.fusion = fusion
        self.skipped: list[SkippedMatch] = [] if skipped is None else skipped
        self._order: dict[fx.Node, int] = {}
        self._pending: list[fx.Node] = []
        self._current: fx.Node | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-number the graph after an outside edit."""
        self._order = {n: i for i, n in enumerate(self.graph.nodes)}

    def position(self, node: fx.Node) -> int:
        """The index of ``node`` in graph order (as of the last refresh)."""
        return self._order[node]

    def anchor(self, inputs: Sequence[fx.Node]) -> fx.Node:
        """The node after which a new node using ``inputs`` may be inserted."""
        if not inputs:
            raise Decline("the replacement has no graph inputs to anchor it")
        latest = max(inputs, key=lambda n: self._order[n])
        if latest.op == "placeholder":
            # Keep placeholders together at the top: insert after the last one.
            placeholders: list[fx.Node] = [n for n in self.graph.nodes if n.op == "placeholder"]
            return placeholders[-1]
        return latest

    @contextlib.contextmanager
    def candidate(self, node: fx.Node) -> Iterator[None]:
        """Match and rewrite the candidate found at ``node``; never lets an error escape.

        A :class:`Decline` or any other exception (a fake kernel's check, a view the new layout
        does not allow, a matcher meeting a graph it did not expect) skips the candidate: its
        helper nodes are removed, the graph is as it was, and the reason is recorded.
        """
        self._current = node
        try:
            yield
        except Decline as exc:
            self.decline(str(exc))
        except Exception as exc:  # a failed match must never abort the compile
            first_line = next(iter(str(exc).splitlines()), "")
            self.decline(f"{type(exc).__name__} while building the replacement: {first_line}")
        finally:
            # Helpers of a candidate that was neither applied nor declined are dropped too.
            self._rollback()
            self._current = None

    def decline(self, reason: str) -> bool:
        """Leave the current candidate alone: undo its helper nodes, record why; returns False."""
        self._rollback()
        node = self._current
        record = SkippedMatch(self.fusion, node.name if node is not None else "?", reason)
        self.skipped.append(record)
        logger.debug("npugraph_ex: skipped %s", record)
        return False

    def insert(
        self,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        val: Any = None,
    ) -> fx.Node:
        """Insert helper node ``target(*args, **kwargs)`` for the candidate, after its inputs.

        Its metadata is ``val``, else traced with the inputs' fake values (a view the inputs'
        layout does not allow raises here, before the candidate touched the graph).
        """
        if val is None:
            val = _fake_call(target, args, kwargs)
            if val is None:
                raise Decline(f"no metadata to trace {target} on")
        inputs: list[fx.Node] = []
        fx.node.map_arg((args, kwargs), inputs.append)
        with self.graph.inserting_after(self.anchor(inputs)):
            node = self.graph.call_function(target, args, kwargs)
        node.meta["val"] = val
        self._pending.append(node)
        self.refresh()
        return node

    def _rollback(self) -> None:
        if not self._pending:
            return
        for node in reversed(self._pending):
            if not node.users:
                self.graph.erase_node(node)
        self._pending.clear()
        self.refresh()

    def _movable(
        self, early: list[fx.Node], inputs: list[fx.Node], pos: int, erase: set[fx.Node]
    ) -> list[fx.Node] | str:
        """The nodes to move after the fused op for ``early`` users (graph order), or why not.

        They are the early users and everything up to position ``pos`` that depends on them.
        None may be an ancestor of the fused op's inputs (it would need its own output) or have
        side effects (moving a write past a read of the same memory changes what is read).
        """
        if not early:
            return []
        start = min(self._order[u] for u in early)
        moved: set[fx.Node] = set()
        todo = list(early)
        while todo:
            node = todo.pop()
            if node in moved:
                continue
            moved.add(node)
            todo += [u for u in node.users if self._order[u] <= pos and u not in erase]
        needed: set[fx.Node] = set()
        todo = list(inputs)
        while todo:
            node = todo.pop()
            if node in needed or self._order[node] < start:
                continue
            needed.add(node)
            todo += node.all_input_nodes
        first = min(early, key=lambda n: self._order[n])
        if moved & needed:
            clash = min(moved & needed, key=lambda n: self._order[n])
            return (
                f"{first.name} uses a replaced value before the fused op's inputs are all "
                f"available, and {clash.name}, which depends on it, feeds those inputs"
            )
        impure = [n for n in moved if n.op != "call_function" or n.is_impure()]
        if impure:
            return (
                f"{first.name} uses a replaced value before the fused op's inputs are all "
                f"available, and {impure[0].name} after it cannot be moved (side effects)"
            )
        return sorted(moved, key=lambda n: self._order[n])

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
        ``erase`` are removed when dead. Returns False (graph untouched, reason recorded) if
        unsafe. Everything that can fail runs before the first edit of the graph.
        """
        inputs: list[fx.Node] = []
        fx.node.map_arg(args, inputs.append)
        anchor = self.anchor(inputs)
        pos = self._order[anchor]
        erase_set = set(erase)
        early = [
            user
            for old in replaces
            if old is not None
            for user in old.users
            if user not in erase_set and self._order[user] <= pos
        ]
        moved = self._movable(early, inputs, pos, erase_set)
        if isinstance(moved, str):
            return self.decline(moved)
        fake_out = _fake_call(target, args)
        if fake_out is None:
            return self.decline("an input has no fake value to trace the fused op with")
        if not _same_layout(fake_out, replaces):
            return self.decline(
                "the fused op's output would differ in shape, dtype or strides from the value "
                "it replaces"
            )
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
        cursor = outputs[-1]
        for node in moved:
            cursor.append(node)  # moves it: right after the fused op's outputs, in order
            cursor = node
        # Erase in reverse topological order so each node is dead when its turn comes.
        for node in sorted(erase_set, key=lambda n: self._order[n], reverse=True):
            if not node.users:
                self.graph.erase_node(node)
        self._pending.clear()  # the helpers are the fused op's inputs now: committed
        self.refresh()
        return True
