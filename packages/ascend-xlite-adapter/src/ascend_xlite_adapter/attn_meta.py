"""Xlite's host-side attention metadata (``xlite._C.AttnMeta``) and how to build it.

Xlite takes per-request lengths and block tables as host lists, and the token positions as a
tensor. vLLM's attention metadata has per-request query lengths (or ``query_start_loc``), total
sequence lengths and a block-table tensor; the cached length of a request is what it had in the
KV cache before this step: ``seq_len - query_len``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ascend_xlite_adapter.errors import AttnMetaError

__all__ = [
    "XliteAttnMeta",
    "build_attn_meta",
    "query_lens_from_start_loc",
]

IntsLike = Sequence[int] | torch.Tensor


@dataclass(frozen=True, eq=False)
class XliteAttnMeta:
    """Mirror of ``xlite._C.AttnMeta``: same field names, immutable host values.

    Requests appear in batch order; the tokens of request ``i`` are rows
    ``sum(lens[:i]) : sum(lens[:i + 1])`` of the step's input.

    Attributes:
        lens: tokens each request contributes to this step (query lengths).
        cached_lens: tokens each request already has in the KV cache.
        is_prefills: whether each request is prefilling (Xlite marks the field deprecated; it
            is filled for older Xlite builds).
        block_tables_cpu: each request's KV-cache block ids, in order; a row may be longer
            than the request needs (vLLM pads rows).
        positions: ``[num_tokens]`` RoPE positions, or ``[3, num_tokens]`` for mRoPE
            (temporal, height, width); may be longer than ``sum(lens)`` (padding).
    """

    lens: tuple[int, ...]
    cached_lens: tuple[int, ...]
    is_prefills: tuple[bool, ...]
    block_tables_cpu: tuple[tuple[int, ...], ...]
    positions: torch.Tensor

    @property
    def num_reqs(self) -> int:
        """Requests in this step."""
        return len(self.lens)

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in this step."""
        return sum(self.lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Each request's length after this step: cached plus new tokens."""
        return tuple(c + n for c, n in zip(self.cached_lens, self.lens, strict=True))


def _ints(name: str, values: IntsLike) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point():
            raise AttnMetaError(
                f"{name}: expected a 1-D integer tensor, got {values.dtype} {tuple(values.shape)}"
            )
        # .tolist() is the one host sync; this metadata is host-side by design.
        return tuple(int(v) for v in values.tolist())
    return tuple(int(v) for v in values)


def query_lens_from_start_loc(query_start_loc: IntsLike) -> tuple[int, ...]:
    """Per-request query lengths from vLLM's cumulative ``query_start_loc`` (``[num_reqs + 1]``)."""
    starts = _ints("query_start_loc", query_start_loc)
    if not starts or starts[0] != 0:
        raise AttnMetaError(f"query_start_loc = {list(starts)}: expected [0, ...] of num_reqs + 1")
    lens = tuple(b - a for a, b in itertools.pairwise(starts))
    if any(n < 0 for n in lens):
        raise AttnMetaError(f"query_start_loc = {list(starts)}: must be non-decreasing")
    return lens


def build_attn_meta(
    *,
    query_lens: IntsLike,
    seq_lens: IntsLike,
    block_tables: torch.Tensor | Sequence[Sequence[int]],
    positions: torch.Tensor,
    is_prefills: Sequence[bool] | None = None,
) -> XliteAttnMeta:
    """Build Xlite's attention metadata from vLLM-style per-request values.

    Args:
        query_lens: new tokens per request in this step.
        seq_lens: total tokens per request after this step (cached + new).
        block_tables: ``[>= num_reqs, max_blocks]`` block ids (tensor or nested lists); rows
            past ``num_reqs`` (vLLM pads the batch) are dropped.
        positions: RoPE positions, ``[>= num_tokens]`` or ``[3, >= num_tokens]``.
        is_prefills: per-request prefill flags; by default a request is a decode when it adds
            exactly one token to a non-empty cache, a prefill otherwise.

    Raises:
        AttnMetaError: the lengths disagree, a sequence is shorter than its query, there are
            fewer block-table rows than requests, or ``positions`` has too few tokens.
    """
    lens = _ints("query_lens", query_lens)
    totals = _ints("seq_lens", seq_lens)
    if len(totals) < len(lens):
        raise AttnMetaError(
            f"seq_lens has {len(totals)} entries for {len(lens)} requests (query_lens)"
        )
    # vLLM pads seq_lens to the padded batch in graph mode; only the real requests count.
    totals = totals[: len(lens)]
    cached: list[int] = []
    for i, (n, total) in enumerate(zip(lens, totals, strict=True)):
        if n < 0 or total < n:
            raise AttnMetaError(
                f"request {i}: query_len = {n}, seq_len = {total}: expected 0 <= query_len <= "
                "seq_len"
            )
        cached.append(total - n)

    if isinstance(block_tables, torch.Tensor):
        if block_tables.dim() != 2:
            raise AttnMetaError(
                f"block_tables: expected a 2-D tensor, got shape {tuple(block_tables.shape)}"
            )
        rows: list[list[int]] = block_tables[: len(lens)].cpu().tolist()
    else:
        rows = [list(r) for r in block_tables[: len(lens)]]
    if len(rows) < len(lens):
        raise AttnMetaError(f"block_tables has {len(rows)} rows for {len(lens)} requests")

    num_tokens = sum(lens)
    if positions.dim() not in (1, 2) or (positions.dim() == 2 and positions.shape[0] != 3):
        raise AttnMetaError(
            f"positions: expected [num_tokens] or [3, num_tokens], got {tuple(positions.shape)}"
        )
    if positions.shape[-1] < num_tokens:
        raise AttnMetaError(
            f"positions has {positions.shape[-1]} tokens; the requests have {num_tokens}"
        )

    if is_prefills is None:
        flags = tuple(not (n == 1 and c > 0) for n, c in zip(lens, cached, strict=True))
    else:
        flags = tuple(bool(f) for f in is_prefills)
        if len(flags) != len(lens):
            raise AttnMetaError(f"is_prefills has {len(flags)} entries for {len(lens)} requests")

    return XliteAttnMeta(
        lens=lens,
        cached_lens=tuple(cached),
        is_prefills=flags,
        block_tables_cpu=tuple(tuple(int(b) for b in r) for r in rows),
        positions=positions,
    )
