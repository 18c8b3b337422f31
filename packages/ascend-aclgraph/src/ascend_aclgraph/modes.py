"""Graph modes and batch descriptors, with the same names and semantics as vLLM.

``GraphMode`` mirrors ``vllm.config.compilation.CUDAGraphMode``: three *runtime* modes (``NONE``,
``PIECEWISE``, ``FULL``) that a single forward pass runs in, and two *config* modes that pick a
runtime mode per batch: ``FULL_DECODE_ONLY`` (FULL for uniform decode batches, NONE otherwise) and
``FULL_AND_PIECEWISE`` (FULL for uniform decode batches, PIECEWISE otherwise).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from ascend_aclgraph.enum_parsing import parse_enum

__all__ = ["BatchDescriptor", "GraphMode"]


class GraphMode(enum.Enum):
    """How a model runs: eagerly, as piecewise graphs, as one full graph, or a mix per batch."""

    NONE = 0
    PIECEWISE = 1
    FULL = 2
    # Tuple values are (decode_mode, mixed_mode), exactly as vLLM encodes them.
    FULL_DECODE_ONLY = (FULL, NONE)
    FULL_AND_PIECEWISE = (FULL, PIECEWISE)

    @classmethod
    def parse(cls, value: GraphMode | str | int | None) -> GraphMode:
        """Accept a member, its name in any case, or its integer value; ``None`` means NONE.

        Raises:
            ValueError: naming the bad value and every accepted name.
        """
        if value is None:
            return cls.NONE
        return parse_enum(cls, value, "graph mode")

    def separate_routine(self) -> bool:
        """True for the config modes that pick different runtime modes for decode and mixed."""
        return isinstance(self.value, tuple)

    def decode_mode(self) -> GraphMode:
        """The runtime mode used for uniform decode batches."""
        return GraphMode(self.value[0]) if self.separate_routine() else self

    def mixed_mode(self) -> GraphMode:
        """The runtime mode used for mixed prefill/decode batches."""
        return GraphMode(self.value[1]) if self.separate_routine() else self

    def valid_runtime_modes(self) -> bool:
        """True if this mode can be the mode of a single forward pass."""
        return self in (GraphMode.NONE, GraphMode.PIECEWISE, GraphMode.FULL)

    def has_mode(self, mode: GraphMode) -> bool:
        """Whether ``mode`` (a runtime mode) is used by this mode for some batch."""
        if not mode.valid_runtime_modes():
            raise ValueError(
                f"has_mode() takes a runtime mode (NONE, PIECEWISE, FULL), got {mode.name}"
            )
        if self.separate_routine():
            return mode.value in self.value
        return self is mode

    def max_runtime_mode(self) -> GraphMode:
        """The strongest runtime mode this mode uses (FULL > PIECEWISE > NONE)."""
        if self.separate_routine():
            return GraphMode(max(self.value))
        return self

    def has_full_graphs(self) -> bool:
        return self.max_runtime_mode() is GraphMode.FULL

    def has_piecewise_graphs(self) -> bool:
        return self.has_mode(GraphMode.PIECEWISE)

    def requires_piecewise_compilation(self) -> bool:
        """PIECEWISE graphs need the FX graph split at the splitting ops."""
        return self.has_piecewise_graphs()

    def without_piecewise(self) -> GraphMode:
        """This mode with its piecewise part dropped (kept as a separate routine's NONE)."""
        if self is GraphMode.PIECEWISE:
            return GraphMode.NONE
        if self is GraphMode.FULL_AND_PIECEWISE:
            return GraphMode.FULL_DECODE_ONLY
        return self

    def __str__(self) -> str:
        return self.name


class BatchDescriptor(NamedTuple):
    """Key of one captured graph: the padded shape class of a batch.

    ``num_tokens`` is the padded token count. ``uniform_decode`` marks batches in which every
    request has the same query length (one token, or ``1 + num_speculative_tokens``), which is
    what FULL graphs of attention backends with ``UNIFORM_*`` support need. ``num_reqs`` is only
    set for uniform batches, where it is ``num_tokens // query_len``.
    """

    num_tokens: int
    uniform_decode: bool = False
    num_reqs: int | None = None
    has_lora: bool = False

    def relax_for_mixed_batch(self) -> BatchDescriptor:
        """The descriptor a mixed (non-uniform) graph of the same size is keyed by."""
        return BatchDescriptor(
            self.num_tokens, uniform_decode=False, num_reqs=None, has_lora=self.has_lora
        )
