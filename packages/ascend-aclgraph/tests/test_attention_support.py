"""AttentionSupport: ordering, parsing, and picking the weakest backend."""

from __future__ import annotations

import itertools

import pytest
from ascend_aclgraph import AttentionSupport
from ascend_aclgraph.attention_support import (
    ASCEND_ATTENTION_BACKENDS,
    UnknownAttentionBackendError,
    resolve_attention_support,
    weakest_attention_backend,
)

ORDER = ["NEVER", "UNIFORM_SINGLE_TOKEN_DECODE", "UNIFORM_BATCH", "ALWAYS"]


def test_levels_are_vllms() -> None:
    assert [(m.name, m.value) for m in AttentionSupport] == [(n, i) for i, n in enumerate(ORDER)]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(ORDER, ORDER)))
def test_ordering_follows_level(a: str, b: str) -> None:
    x, y = AttentionSupport[a], AttentionSupport[b]
    i, j = ORDER.index(a), ORDER.index(b)
    assert (x < y, x <= y, x > y, x >= y, x == y) == (i < j, i <= j, i > j, i >= j, i == j)


def test_min_and_max() -> None:
    levels = [AttentionSupport.UNIFORM_BATCH, AttentionSupport.NEVER, AttentionSupport.ALWAYS]
    assert min(levels) is AttentionSupport.NEVER
    assert max(levels) is AttentionSupport.ALWAYS


def test_no_comparison_with_ints() -> None:
    with pytest.raises(TypeError):
        AttentionSupport.NEVER < 1  # noqa: B015
    assert AttentionSupport.NEVER != 0  # type: ignore[comparison-overlap]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (AttentionSupport.ALWAYS, AttentionSupport.ALWAYS),
        ("always", AttentionSupport.ALWAYS),
        (" Uniform_Batch ", AttentionSupport.UNIFORM_BATCH),
        ("UNIFORM_SINGLE_TOKEN_DECODE", AttentionSupport.UNIFORM_SINGLE_TOKEN_DECODE),
        (0, AttentionSupport.NEVER),
    ],
)
def test_parse(value: AttentionSupport | str | int, expected: AttentionSupport) -> None:
    assert AttentionSupport.parse(value) is expected


@pytest.mark.parametrize("bad", ["sometimes", "", 7, True])
def test_parse_rejects_with_accepted_values(bad: object) -> None:
    with pytest.raises(ValueError, match="accepted values: NEVER, UNIFORM_SINGLE_TOKEN_DECODE"):
        AttentionSupport.parse(bad)  # type: ignore[arg-type]


def test_weakest_backend_picks_lowest_and_first_on_ties() -> None:
    backends: dict[str, AttentionSupport | str | int] = {
        "attention_v1": "ALWAYS",
        "mla_v1": "uniform_batch",
        "sfa_v1": 2,
    }
    assert weakest_attention_backend(backends) == ("mla_v1", AttentionSupport.UNIFORM_BATCH)
    with pytest.raises(ValueError, match="at least one"):
        weakest_attention_backend({})


def test_ascend_backend_table_matches_the_guide() -> None:
    assert ASCEND_ATTENTION_BACKENDS["attention_v1"] is AttentionSupport.ALWAYS
    assert ASCEND_ATTENTION_BACKENDS["context_parallel/attention_cp"] is AttentionSupport.ALWAYS
    for name in ("mla_v1", "context_parallel/mla_cp", "sfa_v1", "context_parallel/sfa_cp"):
        assert ASCEND_ATTENTION_BACKENDS[name] is AttentionSupport.UNIFORM_BATCH


@pytest.mark.parametrize(
    ("support", "name", "expected"),
    [
        # An explicit level wins, and any name is then a mere label.
        ("uniform_batch", "my_attn", (AttentionSupport.UNIFORM_BATCH, "given", "my_attn")),
        (3, "MLA_V1", (AttentionSupport.ALWAYS, "given", "mla_v1")),
        # Without one, the table gives the level; names are matched in any case.
        (None, "mla_v1", (AttentionSupport.UNIFORM_BATCH, "backend table", "mla_v1")),
        (None, " SFA_V1 ", (AttentionSupport.UNIFORM_BATCH, "backend table", "sfa_v1")),
        (None, "Attention_V1", (AttentionSupport.ALWAYS, "backend table", "attention_v1")),
        # Nothing at all: vLLM's default for a backend that declares nothing.
        (None, None, (AttentionSupport.ALWAYS, "default", None)),
    ],
)
def test_resolve_attention_support(
    support: str | int | None, name: str | None, expected: tuple[object, ...]
) -> None:
    # (`backend` is the conftest's graph-backend fixture, hence `name`.)
    assert tuple(resolve_attention_support(support, name)) == expected


def test_unknown_backend_without_a_level_is_an_error() -> None:
    with pytest.raises(UnknownAttentionBackendError) as info:
        resolve_attention_support(None, "mla_v2")
    message = str(info.value)
    assert message.startswith("unknown attention backend 'mla_v2'; known backends (any case): ")
    assert all(name in message for name in ASCEND_ATTENTION_BACKENDS)
    assert isinstance(info.value, ValueError)


def test_empty_backend_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="the attention backend name is empty"):
        resolve_attention_support("ALWAYS", "")
