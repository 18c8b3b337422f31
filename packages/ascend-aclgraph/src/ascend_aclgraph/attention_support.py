"""How much of graph capture an attention backend supports, as vLLM's ``AttentionCGSupport``.

An attention backend's metadata builder declares one level. The levels are ordered, and the
weakest level among all attention backends of a model narrows the graph mode (see
:mod:`ascend_aclgraph.resolution`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from ascend_aclgraph.enum_parsing import parse_enum

__all__ = ["ASCEND_ATTENTION_BACKENDS", "AttentionSupport", "weakest_attention_backend"]


class AttentionSupport(enum.Enum):
    """Graph support of an attention backend, ordered ``NEVER < ... < ALWAYS``.

    - ``ALWAYS``: full graphs of any batch, mixed prefill/decode included.
    - ``UNIFORM_BATCH``: full graphs only of batches whose requests all have the same query
      length (decode, or speculative decode with ``1 + k`` tokens per request).
    - ``UNIFORM_SINGLE_TOKEN_DECODE``: full graphs only of pure decode batches (query length 1).
    - ``NEVER``: attention cannot run inside a full graph at all.

    Members compare by level with ``<``, ``<=``, ``>``, ``>=`` (and ``min``/``max`` work), but
    only with each other: comparing with a plain int is a ``TypeError``, as it should be.
    """

    NEVER = 0
    UNIFORM_SINGLE_TOKEN_DECODE = 1
    UNIFORM_BATCH = 2
    ALWAYS = 3

    @classmethod
    def parse(cls, value: AttentionSupport | str | int) -> AttentionSupport:
        """Accept a member, its name in any case, or its integer level.

        Raises:
            ValueError: naming the bad value and every accepted name.
        """
        return parse_enum(cls, value, "attention support")

    # Explicit comparisons (not IntEnum): a level must never compare equal or less than an int.
    def __lt__(self, other: object) -> bool:
        if not isinstance(other, AttentionSupport):
            return NotImplemented
        return self.value < other.value

    def __le__(self, other: object) -> bool:
        if not isinstance(other, AttentionSupport):
            return NotImplemented
        return self.value <= other.value

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, AttentionSupport):
            return NotImplemented
        return self.value > other.value

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, AttentionSupport):
            return NotImplemented
        return self.value >= other.value

    def __str__(self) -> str:
        return self.name


#: Support levels declared by vllm-ascend's attention metadata builders (its graph-mode guide and
#: the ``get_cudagraph_support`` overrides). Used by ``ascend-graph explain`` when only a backend
#: name is given; a backend that is not listed must state its level explicitly.
ASCEND_ATTENTION_BACKENDS: Mapping[str, AttentionSupport] = MappingProxyType(
    {
        "attention_v1": AttentionSupport.ALWAYS,
        "context_parallel/attention_cp": AttentionSupport.ALWAYS,
        "mla_v1": AttentionSupport.UNIFORM_BATCH,
        "context_parallel/mla_cp": AttentionSupport.UNIFORM_BATCH,
        "sfa_v1": AttentionSupport.UNIFORM_BATCH,
        "context_parallel/sfa_cp": AttentionSupport.UNIFORM_BATCH,
        "dsa_v1": AttentionSupport.UNIFORM_BATCH,
        "dsa_cp": AttentionSupport.UNIFORM_BATCH,
        "indexer": AttentionSupport.UNIFORM_BATCH,
        "gdn_attn": AttentionSupport.UNIFORM_BATCH,
    }
)


def weakest_attention_backend(
    backends: Mapping[str, AttentionSupport | str | int],
) -> tuple[str, AttentionSupport]:
    """The backend with the lowest support level, as vLLM's model runner picks it.

    Ties go to the first backend in iteration order, so the result is deterministic.

    Raises:
        ValueError: if ``backends`` is empty or a level cannot be parsed.
    """
    if not backends:
        raise ValueError("weakest_attention_backend() needs at least one attention backend")
    parsed = [(name, AttentionSupport.parse(level)) for name, level in backends.items()]
    # min() keeps the first of equal elements, which is the documented tie rule.
    return min(parsed, key=lambda item: item[1].value)
