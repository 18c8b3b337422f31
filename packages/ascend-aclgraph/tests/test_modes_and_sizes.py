"""GraphMode semantics (as vLLM defines them) and capture-size validation and padding."""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
from ascend_aclgraph import BatchDescriptor, CaptureSizes, GraphMode


def test_vllm_default_capture_sizes() -> None:
    sizes = ag.default_capture_sizes(512)
    assert sizes[:4] == [1, 2, 4, 8]
    assert sizes[4:7] == [16, 24, 32]
    assert 248 in sizes
    assert 256 in sizes
    assert 264 not in sizes
    assert 272 in sizes
    assert sizes[-1] == 512
    assert all(
        b - a == 16
        for a, b in zip(sizes[sizes.index(256) :], sizes[sizes.index(256) + 1 :], strict=False)
    )
    assert ag.default_capture_sizes(100)[-1] == 96
    assert ag.default_capture_sizes(3) == [1, 2]


def test_user_sizes_are_deduplicated_sorted_and_padded() -> None:
    sizes = CaptureSizes([8, 1, 4, 4, 2])
    assert list(sizes) == [1, 2, 4, 8]
    assert [sizes.pad(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]
    assert sizes.largest_first() == [8, 4, 2, 1]
    assert CaptureSizes([3, 5, 9]).rounded_to_multiple(4) == [4, 8, 12]
    assert list(CaptureSizes([1, 64, 600], max_size=512)) == [1, 64]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([0], "positive int"),
        ([-2, 4], "positive int"),
        ([1.5], "positive int"),
        ([True], "positive int"),
        ([], "must not be empty"),
        ("8", "list of positive ints"),
        (8, "list of positive ints"),
    ],
)
def test_bad_capture_sizes(bad: object, match: str) -> None:
    with pytest.raises(ag.CaptureSizeError, match=match):
        CaptureSizes(bad)  # type: ignore[arg-type]


def test_pad_rejects_non_positive_batches() -> None:
    with pytest.raises(ag.CaptureSizeError, match="positive"):
        CaptureSizes([1, 2]).pad(0)


def test_modes_decode_mixed_and_helpers() -> None:
    table = {
        GraphMode.NONE: (GraphMode.NONE, GraphMode.NONE, False, False),
        GraphMode.PIECEWISE: (GraphMode.PIECEWISE, GraphMode.PIECEWISE, False, True),
        GraphMode.FULL: (GraphMode.FULL, GraphMode.FULL, True, False),
        GraphMode.FULL_DECODE_ONLY: (GraphMode.FULL, GraphMode.NONE, True, False),
        GraphMode.FULL_AND_PIECEWISE: (GraphMode.FULL, GraphMode.PIECEWISE, True, True),
    }
    for mode, (decode, mixed, full, piecewise) in table.items():
        assert mode.decode_mode() is decode
        assert mode.mixed_mode() is mixed
        assert mode.has_full_graphs() is full
        assert mode.requires_piecewise_compilation() is piecewise
        assert mode.valid_runtime_modes() is (
            mode in (GraphMode.NONE, GraphMode.PIECEWISE, GraphMode.FULL)
        )
    assert GraphMode.FULL_AND_PIECEWISE.without_piecewise() is GraphMode.FULL_DECODE_ONLY
    assert GraphMode.PIECEWISE.without_piecewise() is GraphMode.NONE
    with pytest.raises(ValueError, match="runtime mode"):
        GraphMode.FULL.has_mode(GraphMode.FULL_DECODE_ONLY)


def test_mode_parsing() -> None:
    assert GraphMode.parse("full_and_piecewise") is GraphMode.FULL_AND_PIECEWISE
    assert GraphMode.parse(" PIECEWISE ") is GraphMode.PIECEWISE
    assert GraphMode.parse(2) is GraphMode.FULL
    assert GraphMode.parse(None) is GraphMode.NONE
    with pytest.raises(
        ValueError, match="accepted values: NONE, PIECEWISE, FULL, FULL_DECODE_ONLY"
    ):
        GraphMode.parse("FULLEST")
    with pytest.raises(ValueError, match="unknown graph mode True"):
        GraphMode.parse(True)  # type: ignore[arg-type]


def test_batch_descriptor_relaxing() -> None:
    d = BatchDescriptor(8, uniform_decode=True, num_reqs=8, has_lora=True)
    assert d.relax_for_mixed_batch() == BatchDescriptor(8, False, None, True)
    assert hash(d) != hash(d.relax_for_mixed_batch())
