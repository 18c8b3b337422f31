"""GraphDispatcher: keys per mode, vLLM's dispatch order, padding, spec decode, LoRA."""

from __future__ import annotations

import pytest
from ascend_aclgraph import (
    BatchDescriptor,
    CaptureSizeError,
    CaptureSizes,
    GraphDispatcher,
    GraphMode,
)
from ascend_aclgraph.dispatcher import sizes_for_spec_decode
from hypothesis import assume, given, settings
from hypothesis import strategies as st

NONE, PIECEWISE, FULL = GraphMode.NONE, GraphMode.PIECEWISE, GraphMode.FULL
SIZES = [1, 2, 4, 8]


def bd(
    n: int, uniform: bool = False, reqs: int | None = None, lora: bool = False
) -> BatchDescriptor:
    return BatchDescriptor(n, uniform_decode=uniform, num_reqs=reqs, has_lora=lora)


def make(
    mode: str, sizes: list[int] = SIZES, seqs: int = 4, q: int = 1, lora: bool = False
) -> GraphDispatcher:
    return GraphDispatcher(
        mode, sizes, max_num_seqs=seqs, uniform_decode_query_len=q, enable_lora=lora
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("NONE", []),
        ("PIECEWISE", [(PIECEWISE, [bd(8), bd(4), bd(2), bd(1)])]),
        ("FULL", [(FULL, [bd(8), bd(4), bd(2), bd(1)])]),
        # Uniform FULL keys stop at q * max_num_seqs = 4.
        ("FULL_DECODE_ONLY", [(FULL, [bd(4, True, 4), bd(2, True, 2), bd(1, True, 1)])]),
        (
            "FULL_AND_PIECEWISE",
            [
                (PIECEWISE, [bd(8), bd(4), bd(2), bd(1)]),
                (FULL, [bd(4, True, 4), bd(2, True, 2), bd(1, True, 1)]),
            ],
        ),
    ],
)
def test_capture_descriptors_per_mode(
    mode: str, expected: list[tuple[GraphMode, list[BatchDescriptor]]]
) -> None:
    assert make(mode).capture_descriptors() == expected


@pytest.mark.parametrize(
    ("mode", "n", "uniform", "disable_full", "expected"),
    [
        # FULL exact (uniform key) beats everything.
        ("FULL_AND_PIECEWISE", 3, True, False, (FULL, bd(4, True, 4))),
        # Mixed batch: no relaxed FULL key in FULL_AND_PIECEWISE, so PIECEWISE.
        ("FULL_AND_PIECEWISE", 3, False, False, (PIECEWISE, bd(4))),
        ("FULL_AND_PIECEWISE", 3, True, True, (PIECEWISE, bd(4))),
        # Uniform but above q * max_num_seqs: PIECEWISE of the padded size.
        ("FULL_AND_PIECEWISE", 6, True, False, (PIECEWISE, bd(8))),
        ("FULL_DECODE_ONLY", 3, True, False, (FULL, bd(4, True, 4))),
        ("FULL_DECODE_ONLY", 3, False, False, (NONE, bd(3))),
        ("FULL_DECODE_ONLY", 3, True, True, (NONE, bd(3))),
        ("FULL_DECODE_ONLY", 5, True, False, (NONE, bd(5))),
        # Pure FULL: FULL relaxed, uniform batches are not treated as uniform (Ascend patch).
        ("FULL", 3, True, False, (FULL, bd(4))),
        ("FULL", 3, False, False, (FULL, bd(4))),
        ("FULL", 3, True, True, (NONE, bd(3))),
        ("PIECEWISE", 5, True, False, (PIECEWISE, bd(8))),
        ("NONE", 3, True, False, (NONE, bd(3))),
    ],
)
def test_dispatch_order(
    mode: str,
    n: int,
    uniform: bool,
    disable_full: bool,
    expected: tuple[GraphMode, BatchDescriptor],
) -> None:
    assert make(mode).dispatch(n, uniform_decode=uniform, disable_full=disable_full) == expected


def test_padding_to_next_capture_size() -> None:
    d = make("PIECEWISE", sizes=[1, 2, 4, 8, 16, 24])
    padded = [d.dispatch(n)[1].num_tokens for n in range(1, 25)]
    assert padded == [1, 2, 4, 4] + [8] * 4 + [16] * 8 + [24] * 8


@pytest.mark.parametrize(
    "mode", ["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]
)
@pytest.mark.parametrize("uniform", [False, True])
def test_above_max_runs_eagerly(mode: str, uniform: bool) -> None:
    d = make(mode)
    assert d.max_capture_size == 8
    assert d.dispatch(9, uniform_decode=uniform) == (NONE, bd(9))
    assert d.dispatch(10_000, uniform_decode=uniform, has_lora=True) == (NONE, bd(10_000))


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_tokens_rejected(n: int) -> None:
    with pytest.raises(CaptureSizeError, match="positive"):
        make("PIECEWISE").dispatch(n)


def test_spec_decode_rounds_sizes_for_full_decode() -> None:
    # Rounded up to multiples of 3: 1,2 -> 3; 4 -> 6; 8 -> 9; 16 -> 18 > 16 is dropped.
    d = make("FULL_AND_PIECEWISE", sizes=[1, 2, 4, 8, 16], seqs=4, q=3)
    assert list(d.capture_sizes) == [3, 6, 9]
    assert d.capture_descriptors() == [
        (PIECEWISE, [bd(9), bd(6), bd(3)]),
        (FULL, [bd(9, True, 3), bd(6, True, 2), bd(3, True, 1)]),
    ]
    assert d.dispatch(6, uniform_decode=True) == (FULL, bd(6, True, 2))
    assert d.dispatch(5) == (PIECEWISE, bd(6))
    assert d.dispatch(10) == (NONE, bd(10))


def test_spec_decode_uniform_keys_bounded_by_max_num_seqs() -> None:
    d = make("FULL_DECODE_ONLY", sizes=[2, 4, 6, 8], seqs=2, q=2)
    assert d.capture_descriptors() == [(FULL, [bd(4, True, 2), bd(2, True, 1)])]


def test_pure_full_spec_decode_rounds_too() -> None:
    assert list(make("FULL", sizes=SIZES, q=2).capture_sizes) == [2, 4, 8]


def test_piecewise_mode_does_not_round() -> None:
    assert list(make("PIECEWISE", sizes=SIZES, q=3).capture_sizes) == SIZES


def test_sizes_for_spec_decode_edges() -> None:
    # All rounded sizes exceed the max, but q itself fits: vLLM keeps [q].
    assert list(sizes_for_spec_decode(CaptureSizes([5]), 3)) == [3]
    with pytest.raises(CaptureSizeError, match="uniform decode query length 3"):
        sizes_for_spec_decode(CaptureSizes([2]), 3)
    same = CaptureSizes(SIZES)
    assert sizes_for_spec_decode(same, 1) is same


def test_lora_keys() -> None:
    with_lora = make("FULL_AND_PIECEWISE", lora=True)
    assert with_lora.dispatch(3, has_lora=True) == (PIECEWISE, bd(4, lora=True))
    assert with_lora.dispatch(3, uniform_decode=True, has_lora=True) == (
        FULL,
        bd(4, True, 4, lora=True),
    )
    assert len(with_lora.keys(PIECEWISE)) == 2 * len(SIZES)
    # Without LoRA graphs, a LoRA batch has no graph to run.
    assert make("FULL_AND_PIECEWISE").dispatch(3, has_lora=True) == (NONE, bd(3))


def test_keys_of_none_is_empty_and_repr() -> None:
    d = make("FULL_AND_PIECEWISE")
    assert d.keys(NONE) == frozenset()
    assert "PIECEWISE=4" in repr(d)
    assert "FULL=3" in repr(d)


@pytest.mark.parametrize(
    ("seqs", "q", "match"),
    [(0, 1, "max_num_seqs"), (4, 0, "uniform_decode_query_len"), (True, 1, "max_num_seqs")],
)
def test_bad_arguments(seqs: int, q: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GraphDispatcher("FULL", SIZES, max_num_seqs=seqs, uniform_decode_query_len=q)


def test_bad_mode_name() -> None:
    with pytest.raises(ValueError, match="accepted values"):
        GraphDispatcher("HALF", SIZES, max_num_seqs=4)


# ---- properties ---------------------------------------------------------------------------


@st.composite
def dispatchers(draw: st.DrawFn) -> GraphDispatcher:
    mode = draw(st.sampled_from(list(GraphMode)))
    sizes = draw(st.lists(st.integers(1, 64), min_size=1, max_size=8))
    q = draw(st.integers(1, 4))
    seqs = draw(st.integers(1, 32))
    lora = draw(st.booleans())
    try:
        return GraphDispatcher(
            mode, sizes, max_num_seqs=seqs, uniform_decode_query_len=q, enable_lora=lora
        )
    except CaptureSizeError:
        assume(False)
        raise


@settings(max_examples=400, deadline=None)
@given(
    d=dispatchers(),
    n=st.integers(1, 80),
    uniform=st.booleans(),
    has_lora=st.booleans(),
    disable_full=st.booleans(),
)
def test_dispatch_properties(
    d: GraphDispatcher, n: int, uniform: bool, has_lora: bool, disable_full: bool
) -> None:
    mode, desc = d.dispatch(n, uniform_decode=uniform, has_lora=has_lora, disable_full=disable_full)
    if mode is NONE:
        assert desc == BatchDescriptor(n)
    else:
        # A graph exists for the answer, of a runtime mode this configuration uses.
        assert desc in d.keys(mode)
        assert d.mode.has_mode(mode)
        # Padded to the smallest key >= n of that mode (for the same LoRA case).
        candidates = [k.num_tokens for k in d.keys(mode) if k.has_lora == has_lora]
        assert desc.num_tokens == min(c for c in candidates if c >= n)
        assert desc.has_lora == has_lora
        assert not desc.uniform_decode or uniform
    if disable_full:
        assert mode is not FULL
    # Preference order: a usable FULL graph of the padded size always wins, then PIECEWISE.
    padded = min((s for s in d.capture_sizes if s >= n), default=None)
    usable_full = padded is not None and any(
        k.num_tokens == padded and k.has_lora == has_lora and (uniform or not k.uniform_decode)
        for k in d.keys(FULL)
    )
    usable_piecewise = padded is not None and bd(padded, lora=has_lora) in d.keys(PIECEWISE)
    if usable_full and not disable_full:
        assert mode is FULL
    elif usable_piecewise:
        assert mode is PIECEWISE
    else:
        assert mode is NONE


@settings(max_examples=200, deadline=None)
@given(d=dispatchers())
def test_capture_descriptors_properties(d: GraphDispatcher) -> None:
    descs = d.capture_descriptors()
    assert [m for m, _ in descs] == [m for m in (PIECEWISE, FULL) if d.keys(m)]
    for mode, items in descs:
        assert set(items) == d.keys(mode)
        sizes = [x.num_tokens for x in items]
        assert sizes == sorted(sizes, reverse=True)
        assert all(x.num_tokens in d.capture_sizes for x in items)
