"""``ascend_aclgraph.capture``: graph mode for plain PyTorch code, no vLLM needed.

::

    step = ascend_aclgraph.capture(decoder_step, (tokens, positions), batch_sizes=[1, 8, 32])
    logits = step(tokens_for_5_requests, positions_for_5_requests)   # replays the size-8 graph

The returned :class:`CapturedCallable` owns static input buffers sized for the largest capture
size. Each call copies the inputs into them (and fills the padding rows with each input's pad
value), replays the graph of the next capture size up, and returns the outputs cut back to the
real batch. Batches above the largest size run eagerly and are counted.

Which inputs are batched, how each is padded and how outputs are cut back is decided by
:mod:`ascend_aclgraph.batch_layout`, shared with the compile paths: ``fn`` is traced once with a
symbolic batch size, which also proves that padding cannot change real rows. When it could (rows
see each other), every graph is replayed at its exact size only and other sizes run eagerly.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten

from ascend_aclgraph import tasks
from ascend_aclgraph.backends import Graph, GraphBackend, get_backend
from ascend_aclgraph.batch_layout import BatchLayout, PadValues, layout_for_callable
from ascend_aclgraph.capture_sizes import CaptureSizes
from ascend_aclgraph.errors import GraphInputError
from ascend_aclgraph.graph_capture import (
    CaptureFailures,
    FailurePolicy,
    capture_callable,
    weak_ref_tensors,
)
from ascend_aclgraph.static_inputs import (
    CutOutputs,
    OutputCutter,
    StaticBatchInputs,
    resolve_batch_dims,
)
from ascend_aclgraph.stats import GraphStats

__all__ = ["CapturedCallable", "capture"]

logger = logging.getLogger(__name__)


@dataclass
class _SizeEntry:
    size: int
    graph: Graph | None
    # Non-owning views of the graph's outputs: valid until the next replay in the pool.
    flat_outputs: list[Any]
    spec: TreeSpec | None


@dataclass
class _CallPlan:
    """Everything a call of batch size ``n`` needs, worked out once (slicing, lookups)."""

    entry: _SizeEntry
    outputs: CutOutputs


def _progress(total: int, enabled: bool | None, desc: str) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="graph", leave=False)


class CapturedCallable:
    """A callable replaying captured graphs for padded batch sizes; see :func:`capture`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        sample_args: Sequence[Any],
        *,
        batch_sizes: Sequence[int] | CaptureSizes | None,
        dynamic_dim: int | Sequence[int | None],
        backend: str | GraphBackend,
        num_warmups: int,
        pad_value: PadValues,
        exact_sizes: bool,
        clone_outputs: bool,
        on_capture_failure: FailurePolicy,
        progress: bool | None,
    ) -> None:
        if isinstance(num_warmups, bool) or not isinstance(num_warmups, int) or num_warmups < 0:
            raise ValueError(f"num_warmups must be an int >= 0, got {num_warmups!r}")
        self.fn = fn
        self.backend = get_backend(backend)
        self.sizes = (
            batch_sizes if isinstance(batch_sizes, CaptureSizes) else CaptureSizes(batch_sizes)
        )
        self.pad_value = pad_value
        self.clone_outputs = clone_outputs
        self.stats = GraphStats()
        self._failures = CaptureFailures(on_capture_failure, self.stats)
        self.pool = self.backend.new_pool()
        self._lock = threading.Lock()
        self._sample_args = tuple(sample_args)
        self.layout: BatchLayout = layout_for_callable(
            fn,
            self._sample_args,
            resolve_batch_dims(self._sample_args, dynamic_dim),
            pad_value,
        )
        # Padding is only sound when real rows never see padding rows; otherwise (or on
        # request) a graph serves exactly its own size.
        self.exact_sizes = exact_sizes or self.layout.exact_only
        if self.layout.exact_only and not exact_sizes:
            logger.warning(
                "capture(): padding could change real rows, so each graph serves its exact "
                "batch size only and other sizes run eagerly: %s",
                self.layout.describe_exact(),
            )
        self._inputs = StaticBatchInputs(
            self._sample_args,
            self.layout.inputs,
            max_size=self.sizes.max_size,
            device=self.backend.device,
        )
        self._cut = OutputCutter(self.layout.outputs)
        self._warned_uncaptured = False
        self._entries: dict[int, _SizeEntry] = {}
        # Per batch size: its graph and output views, made once. Slicing a tensor costs as much
        # as a small kernel launch, and these are on every call's path.
        self._plans: dict[int, _CallPlan | None] = {}
        self._capture_all(num_warmups, progress)

    # --- construction -----------------------------------------------------------------------

    def _capture_all(self, num_warmups: int, progress: bool | None) -> None:
        order = self.sizes.largest_first()  # smaller graphs reuse the largest one's pool memory
        bar = _progress(len(order), progress, f"capturing graphs ({self.backend.name})")
        try:
            for size in order:
                self._entries[size] = self._capture_size(size, num_warmups)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.stats.pool_bytes = self.pool.nbytes
        logger.info(
            "captured %d graphs (%s) on %s in %.2fs, pool %d bytes",
            self.stats.captures,
            ", ".join(map(str, self.sizes)),
            self.backend.name,
            self.stats.capture_seconds,
            self.stats.pool_bytes,
        )

    def _capture_size(self, size: int, num_warmups: int) -> _SizeEntry:
        args = self._inputs.args_for(size)
        try:
            with torch.no_grad():
                for _ in range(num_warmups):
                    self.fn(*args)
            captured = capture_callable(self.backend, self.pool, self.fn, args, {})
        except Exception as exc:
            self._failures.handle(exc, f"batch size {size}")
            return _SizeEntry(size, None, [], None)
        # Held weakly, as vLLM's wrapper holds them: the pool may reuse the memory of outputs
        # nobody holds, and each replay rewrites them.
        flat, spec = tree_flatten(weak_ref_tensors(captured.outputs))
        self.stats.record_capture(size, captured.seconds)
        return _SizeEntry(size, captured.graph, flat, spec)

    # --- calls ------------------------------------------------------------------------------

    @property
    def graphs(self) -> dict[int, Any]:
        """Captured graph per batch size (sizes whose capture failed are absent)."""
        return {s: e.graph for s, e in self._entries.items() if e.graph is not None}

    def _plan(self, n: int) -> _CallPlan | None:
        """The plan of batch size ``n``, or None when it runs eagerly."""
        size = (n if n in self._entries else None) if self.exact_sizes else self.sizes.pad(n)
        entry = self._entries.get(size) if size is not None else None
        if entry is None or entry.graph is None:
            return None
        assert entry.spec is not None
        return _CallPlan(
            entry, CutOutputs(self._cut(entry.flat_outputs, n, entry.size), entry.spec)
        )

    def __call__(self, *args: Any, task_args: dict[str, Any] | None = None) -> Any:
        """Run one batch: replay the graph of the next capture size up, or run eagerly.

        ``task_args`` rewrite host-side arguments of the updatable tasks (see
        :func:`ascend_aclgraph.updatable`): list values of the real batch length are padded to
        the graph's size by repeating their last element.
        """
        inputs = self._inputs
        n = inputs.batch_size(args)
        with self._lock:
            try:
                plan = self._plans[n]
            except KeyError:
                plan = self._plans[n] = self._plan(n)
            if plan is None:
                self._run_eagerly_note(n)
                with torch.no_grad(), tasks.task_overrides(task_args or {}):
                    return self.fn(*args)
            entry = plan.entry
            graph = entry.graph
            assert graph is not None
            moved = inputs.moved_state(args)
            if moved is not None:
                raise GraphInputError(moved)
            inputs.check_host(args)
            inputs.copy_in(args, n, entry.size)
            if task_args:
                graph.replay(graph.updates_for(_pad_task_args(task_args, n, entry.size)))
            else:
                graph.replay()
            inputs.copy_back(args, n)
            self.stats.replays += 1
            return plan.outputs.result(self.clone_outputs)

    def _run_eagerly_note(self, n: int) -> None:
        if n <= self.sizes.max_size and not self.exact_sizes:
            return  # that size's capture failed; CaptureFailures already said so
        self.stats.eager_fallbacks += 1
        if self.exact_sizes and n <= self.sizes.max_size and not self._warned_uncaptured:
            self._warned_uncaptured = True
            logger.warning(
                "capture(): batch size %d has no graph of its own and padding is off "
                "(exact sizes); it runs eagerly (further such calls are counted in "
                "stats.eager_fallbacks)",
                n,
            )


def _pad_task_args(values: dict[str, Any], n: int, size: int) -> dict[str, Any]:
    padded: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, (list, tuple)) and len(value) == n and size > n:
            value = [*value, *([value[-1]] * (size - n))]
        padded[name] = list(value) if isinstance(value, tuple) else value
    return padded


def capture(
    fn: Callable[..., Any] | torch.nn.Module,
    sample_args: Sequence[Any],
    *,
    batch_sizes: Sequence[int] | CaptureSizes | None = None,
    dynamic_dim: int | Sequence[int | None] = 0,
    backend: str | GraphBackend = "auto",
    num_warmups: int = 1,
    pad_value: PadValues = 0,
    exact_sizes: bool = False,
    clone_outputs: bool = True,
    on_capture_failure: FailurePolicy = "raise",
    progress: bool | None = None,
) -> CapturedCallable:
    """Capture ``fn`` for every batch size and return a callable that replays them.

    Args:
        fn: a function or module; called positionally with tensors shaped like ``sample_args``.
        sample_args: example arguments. Tensors with a batch dim are copied into static
            buffers of the largest size (and, if the graph writes them, their real rows are
            copied back); other tensors, and every parameter or buffer, are state captured by
            address (a call must pass the same tensor); host values are baked in.
        batch_sizes: capture sizes (validated, deduplicated, sorted); default vLLM's list up to 512.
        dynamic_dim: batch dim of every tensor argument, or one entry (int or None) per argument.
        backend: "auto" (npu, then cuda, then cpu), "npu", "cuda" or "cpu".
        num_warmups: eager runs before each capture. Capture runs ``fn`` on the sample data, so
            its side effects (a KV-cache write, say) happen then.
        pad_value: fills the padding rows of batched inputs: one number for all, one per
            argument, or a mapping ``{argument name or index: value}`` (others get 0); ``None``
            leaves stale rows. Pad index inputs so that padding rows write nothing real: vLLM
            pads slot mappings with -1, which its kernels skip (see
            ``ascend_aclgraph.testing.Qwen3Decoder.PAD_VALUES``).
        exact_sizes: never pad: each graph serves its own size, other sizes run eagerly.
            Switched on automatically (with one log line naming the op and source line) when
            rows of ``fn`` see each other, so that padding would change real results.
        clone_outputs: return fresh tensors (default). ``False`` returns views of the static
            outputs, valid until the next call; faster, but not safe to keep across calls.
        on_capture_failure: "raise" (default) or "eager" (warn once, run that size eagerly).
        progress: show a tqdm bar while capturing; ``None`` shows it only on a terminal.

    Outputs are cut back to the real batch along the dims that carry it (known from tracing
    ``fn`` with a symbolic batch size); other outputs are returned whole. Calls are serialized
    by a lock, so concurrent callers never see each other's outputs.
    """
    start = time.perf_counter()
    captured = CapturedCallable(
        fn,
        sample_args,
        batch_sizes=batch_sizes,
        dynamic_dim=dynamic_dim,
        backend=backend,
        num_warmups=num_warmups,
        pad_value=pad_value,
        exact_sizes=exact_sizes,
        clone_outputs=clone_outputs,
        on_capture_failure=on_capture_failure,
        progress=progress,
    )
    logger.debug("capture() finished in %.3fs", time.perf_counter() - start)
    return captured
