"""build_attn_meta: vLLM-style per-request values -> Xlite's host metadata."""

from __future__ import annotations

import ascend_xlite_adapter as xa
import pytest
import torch


def test_lengths_flags_and_block_tables() -> None:
    table = torch.tensor([[3, 9, 0], [4, 0, 0], [7, 8, 2], [0, 0, 0]], dtype=torch.int32)
    positions = torch.arange(12)
    meta = xa.build_attn_meta(
        query_lens=torch.tensor([1, 6, 1]),
        seq_lens=torch.tensor([6, 6, 10, 0]),  # padded past num_reqs, as in graph mode
        block_tables=table,
        positions=positions,
    )
    assert meta.lens == (1, 6, 1)
    assert meta.cached_lens == (5, 0, 9)
    assert meta.seq_lens == (6, 6, 10)
    assert meta.is_prefills == (False, True, False)
    assert meta.block_tables_cpu == ((3, 9, 0), (4, 0, 0), (7, 8, 2))
    assert meta.positions is positions
    assert (meta.num_reqs, meta.num_tokens) == (3, 8)


def test_query_lens_from_start_loc_and_list_inputs() -> None:
    lens = xa.query_lens_from_start_loc(torch.tensor([0, 4, 5, 9]))
    assert lens == (4, 1, 4)
    meta = xa.build_attn_meta(
        query_lens=lens,
        seq_lens=[4, 8, 12],
        block_tables=[[1], [2, 3], [4, 5, 6]],
        positions=torch.zeros(3, 9, dtype=torch.long),
        is_prefills=[True, False, True],
    )
    assert meta.cached_lens == (0, 7, 8)
    assert meta.is_prefills == (True, False, True)
    # A chunk of a longer prefill with cached tokens is still a prefill by default.
    default = xa.build_attn_meta(
        query_lens=lens,
        seq_lens=[4, 8, 12],
        block_tables=[[1], [2], [3]],
        positions=torch.arange(9),
    )
    assert default.is_prefills == (True, False, True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_lens": [3, 1]}, r"request 1: query_len = 2, seq_len = 1"),
        ({"seq_lens": [3]}, r"seq_lens has 1 entries for 2 requests"),
        ({"block_tables": [[1]]}, r"block_tables has 1 rows for 2 requests"),
        ({"positions": torch.arange(3)}, r"positions has 3 tokens; the requests have 4"),
        ({"positions": torch.zeros(2, 4)}, r"expected \[num_tokens\] or \[3, num_tokens\]"),
        ({"is_prefills": [True]}, r"is_prefills has 1 entries for 2 requests"),
        ({"query_lens": torch.tensor([[2, 2]])}, r"query_lens: expected a 1-D integer tensor"),
    ],
)
def test_inconsistent_metadata_is_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "query_lens": [2, 2],
        "seq_lens": [3, 4],
        "block_tables": [[1], [2]],
        "positions": torch.arange(4),
        **kwargs,
    }
    with pytest.raises(xa.AttnMetaError, match=message):
        xa.build_attn_meta(**args)  # type: ignore[arg-type]


def test_bad_query_start_loc() -> None:
    with pytest.raises(xa.AttnMetaError, match="expected"):
        xa.query_lens_from_start_loc([1, 2])
    with pytest.raises(xa.AttnMetaError, match="non-decreasing"):
        xa.query_lens_from_start_loc([0, 3, 2])
