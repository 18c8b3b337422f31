"""The fusion pass manager: ordered passes, one switch each, a stable hash, a per-graph report."""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import fx

from ascend_npugraph_ex.passes import activation, fx_utils, norm, rope
from ascend_npugraph_ex.passes.fx_utils import FusionPass, SkippedMatch

__all__ = ["FUSIONS", "FusionReport", "PassManager", "SkippedMatch"]

logger = logging.getLogger(__name__)

# Order matters: add+RMSNorm must claim its norms before plain RMSNorm does, and
# qk_norm_rope works on the rms_norm and rotary ops the earlier passes produced.
FUSIONS: dict[str, FusionPass] = {
    "add_rms_norm": norm.fuse_add_rms_norm,
    "rms_norm": norm.fuse_rms_norm,
    "swiglu": activation.fuse_swiglu,
    "rotary": rope.fuse_rotary,
    "qk_norm_rope": rope.fuse_qk_norm_rope,
}


@dataclass(frozen=True)
class FusionReport:
    """What the pass manager did to one graph.

    ``skipped`` lists the candidates a fusion recognised but left alone, each with the reason
    (an intermediate used elsewhere, a layout the fused op would change, an error while building
    the replacement, ...): a failed match never aborts a compile, it shows up here instead.
    """

    counts: Mapping[str, int]
    nodes_before: int
    nodes_after: int
    launches_before: int = 0
    launches_after: int = 0
    graph_id: int = 0
    enabled: tuple[str, ...] = field(default=())
    skipped: tuple[SkippedMatch, ...] = field(default=())

    @property
    def total(self) -> int:
        """Total number of fusions that fired."""
        return sum(self.counts.values())

    def __str__(self) -> str:
        fired = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        text = f"graph {self.graph_id}: {fired} ({self.nodes_before} -> {self.nodes_after} nodes)"
        if self.skipped:
            text += f", {len(self.skipped)} skipped (reasons at DEBUG level)"
        return text


def _call_nodes(graph: fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function")


def _launches(graph: fx.Graph) -> int:
    """Nodes that launch a device kernel: op calls that are not views, aliases or getitems."""
    count = 0
    for n in graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if not any(r.alias_info is not None for r in n.target._schema.returns):
            count += 1
    return count


class PassManager:
    """Runs the enabled fusions, in order, on aten-level inference graphs.

    Args:
        enabled: the fusions to run (names from :data:`FUSIONS`); default all.

    ``reports`` keeps one :class:`FusionReport` per graph it has seen; ``uuid()`` changes when the
    pass sources, the switches or the torch version change, so compile caches keyed on it are
    invalidated by an upgrade.
    """

    def __init__(self, enabled: tuple[str, ...] | None = None) -> None:
        names = tuple(FUSIONS) if enabled is None else tuple(enabled)
        unknown = sorted(set(names) - set(FUSIONS))
        if unknown:
            raise ValueError(f"unknown fusions {unknown}; known: {', '.join(FUSIONS)}")
        self.enabled: tuple[str, ...] = tuple(n for n in FUSIONS if n in names)
        self.reports: list[FusionReport] = []

    def __call__(self, gm: fx.GraphModule) -> FusionReport:
        """Fuse ``gm`` in place (then recompile it) and return the report."""
        graph = gm.graph
        before, launches_before = _call_nodes(graph), _launches(graph)
        counts: dict[str, int] = {}
        skipped: list[SkippedMatch] = []
        for name in self.enabled:
            counts[name] = FUSIONS[name](graph, skipped)
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        report = FusionReport(
            MappingProxyType(counts),
            before,
            _call_nodes(graph),
            launches_before,
            _launches(graph),
            graph_id=len(self.reports),
            enabled=self.enabled,
            skipped=tuple(skipped),
        )
        self.reports.append(report)
        logger.info("npugraph_ex fusions, %s", report)
        return report

    def uuid(self) -> str:
        """A stable hash of the pass sources, the enabled switches and the torch version."""
        h = hashlib.sha256()
        for module in (fx_utils, norm, activation, rope, sys.modules[__name__]):
            h.update(inspect.getsource(module).encode())
        h.update(repr(self.enabled).encode())
        h.update(torch.__version__.encode())
        return h.hexdigest()
