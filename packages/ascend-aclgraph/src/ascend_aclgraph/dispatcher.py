"""Per-step choice of the runtime graph mode and graph key, as vLLM's ``CudagraphDispatcher``.

The dispatcher is built once from the *effective* graph mode (see
:func:`~ascend_aclgraph.resolve_graph_mode`) and the capture sizes. It knows which graphs get
captured (:meth:`GraphDispatcher.capture_descriptors`) and, on every step, which of them a batch
runs (:meth:`GraphDispatcher.dispatch`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ascend_aclgraph.capture_sizes import CaptureSizes
from ascend_aclgraph.errors import CaptureSizeError
from ascend_aclgraph.modes import BatchDescriptor, GraphMode

__all__ = ["GraphDispatcher", "sizes_for_spec_decode"]

_RUNTIME_GRAPH_MODES = (GraphMode.PIECEWISE, GraphMode.FULL)


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


def sizes_for_spec_decode(sizes: CaptureSizes, query_len: int) -> CaptureSizes:
    """Capture sizes rounded up to multiples of ``query_len``, as vLLM does for spec decode.

    A uniform speculative-decode batch has ``query_len`` tokens per request, so only multiples
    of it can key a uniform graph (vLLM issue #28207). Rounded sizes above the largest original
    size are dropped; if none is left, ``[query_len]`` is used when it fits.

    Raises:
        CaptureSizeError: ``query_len`` exceeds the largest capture size.
    """
    _check_positive_int(query_len, "query_len")
    if query_len == 1:
        return sizes
    limit = sizes.max_size
    rounded = {-(-s // query_len) * query_len for s in sizes}
    kept = [s for s in rounded if s <= limit]
    if not kept and query_len <= limit:
        kept = [query_len]
    if not kept:
        raise CaptureSizeError(
            f"no capture size is left after rounding {list(sizes)} to multiples of the uniform "
            f"decode query length {query_len}; raise the largest capture size to at least "
            f"{query_len} or use fewer speculative tokens"
        )
    return CaptureSizes(kept)


class GraphDispatcher:
    """Maps each batch to ``(runtime mode, BatchDescriptor)`` among the graphs of a mode.

    Keys, as vLLM's ``initialize_cudagraph_keys``:

    - ``mixed_mode()`` (PIECEWISE or FULL) gets one relaxed key (``uniform_decode=False``,
      ``num_reqs=None``) per capture size.
    - If the mode is a separate routine with FULL decode (``FULL_DECODE_ONLY``,
      ``FULL_AND_PIECEWISE``), FULL also gets one uniform key per capture size in
      ``[q, q * max_num_seqs]``, with ``num_reqs = size // q`` (``q`` is the uniform decode
      query length).
    - Pure ``FULL`` mode keys every size non-uniform: as vllm-ascend patches vLLM, batches are
      not treated as uniform decode there, since one graph serves every batch of that size.

    With FULL decode graphs and ``q > 1`` the capture sizes are first rounded to multiples of
    ``q`` (:func:`sizes_for_spec_decode`). With ``enable_lora`` every key exists with and
    without LoRA; otherwise LoRA batches find no graph and run eagerly.

    Every answer is precomputed, so :meth:`dispatch` is a bounds check and two list indexings.
    """

    def __init__(
        self,
        mode: GraphMode | str,
        capture_sizes: CaptureSizes | Iterable[int],
        *,
        max_num_seqs: int,
        uniform_decode_query_len: int = 1,
        enable_lora: bool = False,
    ) -> None:
        self.mode = GraphMode.parse(mode)
        self.uniform_decode_query_len = _check_positive_int(
            uniform_decode_query_len, "uniform_decode_query_len"
        )
        self.max_num_seqs = _check_positive_int(max_num_seqs, "max_num_seqs")
        self.enable_lora = bool(enable_lora)
        sizes = (
            capture_sizes
            if isinstance(capture_sizes, CaptureSizes)
            else CaptureSizes(capture_sizes)
        )
        if self.mode.decode_mode() is GraphMode.FULL:
            sizes = sizes_for_spec_decode(sizes, self.uniform_decode_query_len)
        self.capture_sizes = sizes

        self._keys: dict[GraphMode, frozenset[BatchDescriptor]] = self._build_keys()
        # One answer list per (uniform_decode, has_lora, disable_full), indexed by num_tokens - 1.
        self._tables: list[list[tuple[GraphMode, BatchDescriptor]]] = [
            [
                self._dispatch_uncached(n, uniform, lora, no_full)
                for n in range(1, sizes.max_size + 1)
            ]
            for uniform in (False, True)
            for lora in (False, True)
            for no_full in (False, True)
        ]

    @property
    def max_capture_size(self) -> int:
        """Batches with more tokens than this run eagerly."""
        return self.capture_sizes.max_size

    def keys(self, runtime_mode: GraphMode) -> frozenset[BatchDescriptor]:
        """The graph keys of one runtime mode (empty for NONE and for modes not in use)."""
        return self._keys.get(runtime_mode, frozenset())

    def _build_keys(self) -> dict[GraphMode, frozenset[BatchDescriptor]]:
        keys: dict[GraphMode, set[BatchDescriptor]] = {m: set() for m in _RUNTIME_GRAPH_MODES}
        lora_cases = (False, True) if self.enable_lora else (False,)
        mixed = self.mode.mixed_mode()
        if mixed is not GraphMode.NONE:
            for size in self.capture_sizes:
                for lora in lora_cases:
                    keys[mixed].add(BatchDescriptor(size, has_lora=lora))
        if self.mode.separate_routine() and self.mode.decode_mode() is GraphMode.FULL:
            q = self.uniform_decode_query_len
            for size in self.capture_sizes:
                # Sizes are multiples of q here (rounded above), so size // q is exact.
                if q <= size <= q * self.max_num_seqs:
                    for lora in lora_cases:
                        keys[GraphMode.FULL].add(self._uniform_key(size, lora))
        return {m: frozenset(k) for m, k in keys.items()}

    def _uniform_key(self, padded: int, has_lora: bool) -> BatchDescriptor:
        return BatchDescriptor(
            padded,
            uniform_decode=True,
            num_reqs=padded // self.uniform_decode_query_len,
            has_lora=has_lora,
        )

    def _dispatch_uncached(
        self, num_tokens: int, uniform_decode: bool, has_lora: bool, disable_full: bool
    ) -> tuple[GraphMode, BatchDescriptor]:
        # vLLM's order: FULL exact, FULL relaxed, PIECEWISE relaxed, NONE.
        padded = self.capture_sizes.pad(num_tokens)
        if padded is None:
            return GraphMode.NONE, BatchDescriptor(num_tokens)
        relaxed = BatchDescriptor(padded, has_lora=has_lora)
        full_keys = self._keys[GraphMode.FULL]
        if not disable_full:
            # Pure FULL mode has no uniform keys, so a uniform batch falls through to relaxed.
            if uniform_decode and (exact := self._uniform_key(padded, has_lora)) in full_keys:
                return GraphMode.FULL, exact
            if relaxed in full_keys:
                return GraphMode.FULL, relaxed
        if relaxed in self._keys[GraphMode.PIECEWISE]:
            return GraphMode.PIECEWISE, relaxed
        return GraphMode.NONE, BatchDescriptor(num_tokens)

    def dispatch(
        self,
        num_tokens: int,
        uniform_decode: bool = False,
        has_lora: bool = False,
        disable_full: bool = False,
    ) -> tuple[GraphMode, BatchDescriptor]:
        """The runtime mode and graph key for a batch of ``num_tokens`` tokens.

        Tries, in order: a FULL uniform graph (only when ``uniform_decode``), a FULL graph of
        any batch, a PIECEWISE graph, and finally NONE with the unpadded
        ``BatchDescriptor(num_tokens)``. The key's ``num_tokens`` is the padded size the
        batch's inputs must be padded to. ``disable_full`` skips FULL graphs (e.g. for a step
        that must not run attention inside a graph). ``uniform_decode`` must only be set when
        every request has exactly ``uniform_decode_query_len`` tokens.

        Raises:
            CaptureSizeError: ``num_tokens`` is not positive.
        """
        if num_tokens > self.capture_sizes.max_size:
            return GraphMode.NONE, BatchDescriptor(num_tokens)
        if num_tokens <= 0:
            raise CaptureSizeError(f"num_tokens must be positive, got {num_tokens}")
        # Same index layout as the nested comprehension in __init__.
        table = self._tables[4 * bool(uniform_decode) + 2 * bool(has_lora) + bool(disable_full)]
        return table[num_tokens - 1]

    def capture_descriptors(self) -> list[tuple[GraphMode, list[BatchDescriptor]]]:
        """What to capture: PIECEWISE first, then FULL, each largest first; empty modes left out.

        Largest first lets smaller graphs reuse the memory pool the larger ones leave.
        """
        result: list[tuple[GraphMode, list[BatchDescriptor]]] = []
        for mode in _RUNTIME_GRAPH_MODES:
            descs = sorted(
                self._keys[mode],
                key=lambda d: (d.num_tokens, d.uniform_decode, d.has_lora),
                reverse=True,
            )
            if descs:
                result.append((mode, descs))
        return result

    def __repr__(self) -> str:
        counts = ", ".join(f"{m.name}={len(self._keys[m])}" for m in _RUNTIME_GRAPH_MODES)
        return (
            f"GraphDispatcher(mode={self.mode.name}, sizes={list(self.capture_sizes)}, "
            f"uniform_decode_query_len={self.uniform_decode_query_len}, "
            f"max_num_seqs={self.max_num_seqs}, keys: {counts})"
        )
