"""Capture sizes: which batch sizes get a graph, and how a batch is padded to one of them."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from ascend_aclgraph.errors import CaptureSizeError

__all__ = ["CaptureSizes", "default_capture_sizes"]

DEFAULT_MAX_CAPTURE_SIZE = 512


def default_capture_sizes(max_size: int = DEFAULT_MAX_CAPTURE_SIZE) -> list[int]:
    """vLLM's default list: 1, 2, 4, steps of 8 below 256, then steps of 16 up to ``max_size``.

    The largest size is the last one on that grid that does not exceed ``max_size``.
    """
    _check_positive_int(max_size, "max_size")
    sizes = [s for s in (1, 2, 4) if s <= max_size]
    sizes += range(8, min(max_size + 1, 256), 8)
    sizes += range(256, max_size + 1, 16)
    return sizes


def _check_positive_int(value: object, what: str) -> int:
    # bool is an int subclass; True as a batch size is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CaptureSizeError(f"{what} must be a positive int, got {value!r}")
    return value


class CaptureSizes:
    """A validated, sorted, deduplicated list of capture sizes with O(1) padding.

    ``pad(n)`` returns the smallest capture size ``>= n``, or ``None`` when ``n`` exceeds the
    largest size (such batches run eagerly). The lookup table is built once, as vLLM's dispatcher
    does, so the per-step cost is one list index.
    """

    __slots__ = ("_pad_table", "sizes")

    def __init__(self, sizes: Iterable[int] | None = None, *, max_size: int | None = None) -> None:
        if sizes is None:
            sizes = default_capture_sizes(
                DEFAULT_MAX_CAPTURE_SIZE if max_size is None else max_size
            )
        elif isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
            raise CaptureSizeError(
                f"capture sizes must be a list of positive ints, got {type(sizes).__name__}"
            )
        checked = [_check_positive_int(s, f"capture size {s!r}") for s in sizes]
        if not checked:
            raise CaptureSizeError(
                "capture sizes must not be empty; give at least one positive int"
            )
        unique = sorted(set(checked))
        if max_size is not None:
            _check_positive_int(max_size, "max_size")
            unique = [s for s in unique if s <= max_size]
            if not unique:
                raise CaptureSizeError(
                    f"every capture size in {sorted(set(checked))} exceeds max_size={max_size}"
                )
        self.sizes: tuple[int, ...] = tuple(unique)
        table: list[int | None] = [None] * (self.sizes[-1] + 1)
        for n in range(1, len(table)):
            table[n] = self.sizes[bisect.bisect_left(self.sizes, n)]
        self._pad_table = table

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def pad(self, n: int) -> int | None:
        """The capture size a batch of ``n`` is padded to, or ``None`` if it runs eagerly."""
        if n <= 0:
            raise CaptureSizeError(f"batch size must be positive, got {n}")
        table = self._pad_table
        return table[n] if n < len(table) else None

    def rounded_to_multiple(self, multiple: int) -> CaptureSizes:
        """Sizes rounded up to multiples of ``multiple`` (speculative decoding query lengths)."""
        _check_positive_int(multiple, "multiple")
        return CaptureSizes({-(-s // multiple) * multiple for s in self.sizes})

    def largest_first(self) -> list[int]:
        """Capture order: largest first, so smaller graphs reuse the pool memory it leaves."""
        return sorted(self.sizes, reverse=True)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __contains__(self, n: object) -> bool:
        return n in self.sizes

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CaptureSizes):
            return self.sizes == other.sizes
        if isinstance(other, Sequence):
            return list(self.sizes) == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.sizes)

    def __repr__(self) -> str:
        return f"CaptureSizes({list(self.sizes)})"
