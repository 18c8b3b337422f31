"""How much of graph capture an attention backend supports, as vLLM's ``AttentionCGSupport``.

An attention backend's metadata builder declares one level. The levels are ordered, and the
weakest level among all attention backends of a model narrows the graph mode (see
:mod:`ascend_aclgraph.resolution`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, NamedTuple

from ascend_aclgraph.enum_parsing import parse_enum

__all__ = [
    "ASCEND_ATTENTION_BACKENDS",
    "AttentionSupport",
    "AttentionSupportChoice",
    "UnknownAttentionBackendError",
    "resolve_attention_support",
    "weakest_attention_backend",
]


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
#: the ``get_cudagraph_support`` overrides). Used by :func:`resolve_attention_support` (and so by
#: ``ascend-graph explain``) when only a backend name is given; a backend that is not listed must
#: state its level explicitly.
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


# Lower-cased name -> name as listed: backend names are matched in any case, like mode names.
_BACKENDS_BY_FOLDED_NAME: Mapping[str, str] = MappingProxyType(
    {name.lower(): name for name in ASCEND_ATTENTION_BACKENDS}
)


class UnknownAttentionBackendError(ValueError):
    """A backend name that is not in :data:`ASCEND_ATTENTION_BACKENDS`, with no explicit level."""


class AttentionSupportChoice(NamedTuple):
    """The attention support level to resolve a graph mode with, and where it came from."""

    support: AttentionSupport
    #: ``"given"`` (stated explicitly), ``"backend table"`` (looked up in
    #: :data:`ASCEND_ATTENTION_BACKENDS`) or ``"default"`` (nothing given: ``ALWAYS``).
    source: Literal["given", "backend table", "default"]
    #: The backend's name as listed in the table if it is listed there, else as given; ``None``
    #: when no backend was named.
    backend: str | None


def resolve_attention_support(
    attention_support: AttentionSupport | str | int | None,
    attention_backend: str | None,
) -> AttentionSupportChoice:
    """The support level for a backend name and/or an explicit level: the one rule for both.

    - An explicit ``attention_support`` wins. The backend name is then only a label and may be
      any name, so backends that are not in :data:`ASCEND_ATTENTION_BACKENDS` can be described.
    - Otherwise a named backend must be in :data:`ASCEND_ATTENTION_BACKENDS` (matched in any
      case) and gives its level. An unknown name is an error rather than a guess: a typo such as
      ``mla_v2`` must not silently get ``ALWAYS``, and with it FULL graphs the backend cannot run.
    - With neither, the level is ``ALWAYS``, vLLM's default for a backend that declares nothing.

    Raises:
        UnknownAttentionBackendError: an unknown backend name without an explicit level; the
            message lists the known backends.
        ValueError: an empty backend name, or an unknown support level.
    """
    backend = None
    if attention_backend is not None:
        backend = attention_backend.strip()
        if not backend:
            raise ValueError("the attention backend name is empty")
        backend = _BACKENDS_BY_FOLDED_NAME.get(backend.lower(), backend)
    if attention_support is not None:
        return AttentionSupportChoice(AttentionSupport.parse(attention_support), "given", backend)
    if backend is None:
        return AttentionSupportChoice(AttentionSupport.ALWAYS, "default", None)
    if backend not in ASCEND_ATTENTION_BACKENDS:
        raise UnknownAttentionBackendError(
            f"unknown attention backend {attention_backend!r}; known backends (any case): "
            f"{', '.join(ASCEND_ATTENTION_BACKENDS)}; to use another backend, give its "
            "attention support level explicitly"
        )
    return AttentionSupportChoice(ASCEND_ATTENTION_BACKENDS[backend], "backend table", backend)
