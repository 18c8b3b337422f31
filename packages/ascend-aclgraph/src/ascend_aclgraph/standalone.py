"""``ascend_aclgraph.capture``: graph mode for plain PyTorch code, no vLLM needed.

::

    step = ascend_aclgraph.capture(decoder_step, (tokens, positions), batch_sizes=[1, 8, 32])
    logits = step(tokens_for_5_requests, positions_for_5_requests)   # replays the size-8 graph

The returned :class:`CapturedCallable` owns static input buffers sized for the largest capture
size. Each call copies the inputs into them (and fills the padding rows with ``pad_value``),
replays the graph of the next capture size up, and returns the outputs cut back to the real
batch. Batches above the largest size run eagerly and are counted.
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
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ascend_aclgraph import tasks
from ascend_aclgraph.backends import GraphBackend, get_backend
from ascend_aclgraph.capture_sizes import CaptureSizes
from ascend_aclgraph.graph_capture import (
    CapturedGraph,
    CaptureFailures,
    FailurePolicy,
    capture_callable,
)
from ascend_aclgraph.static_inputs import StaticBatchInputs, resolve_batch_dims
from ascend_aclgraph.stats import GraphStats
from ascend_aclgraph.wrapper import update_graph_tasks

__all__ = ["CapturedCallable", "capture"]

logger = logging.getLogger(__name__)


@dataclass
class _SizeEntry:
    size: int
    captured: CapturedGraph | None
    flat_outputs: list[Any]
    spec: TreeSpec | None
    # Per flat output: slice it along the batch dim on return?
    batched: list[bool]


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
        pad_value: float | int | None,
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
        self._inputs = StaticBatchInputs(
            self._sample_args,
            resolve_batch_dims(self._sample_args, dynamic_dim),
            max_size=self.sizes.max_size,
            device=self.backend.device,
            pad_value=pad_value,
        )
        self._entries: dict[int, _SizeEntry] = {}
        # Output views per batch size, made once: slicing a tensor costs as much as a small
        # kernel launch, and these are on every call's path.
        self._output_views: dict[int, list[Any]] = {}
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
            return _SizeEntry(size, None, [], None, [])
        flat, spec = tree_flatten(captured.outputs)
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size for t in flat]
        self.stats.record_capture(size, captured.seconds)
        return _SizeEntry(size, captured, flat, spec, batched)

    # --- calls ------------------------------------------------------------------------------

    @property
    def graphs(self) -> dict[int, Any]:
        """Captured graph per batch size (sizes whose capture failed are absent)."""
        return {s: e.captured.graph for s, e in self._entries.items() if e.captured is not None}

    def _outputs_for(self, n: int, entry: _SizeEntry) -> list[Any]:
        outs = self._output_views.get(n)
        if outs is None:
            outs = self._output_views[n] = [
                t.narrow(0, 0, n) if b else t
                for t, b in zip(entry.flat_outputs, entry.batched, strict=True)
            ]
        return outs

    def __call__(self, *args: Any, task_args: dict[str, Any] | None = None) -> Any:
        """Run one batch: replay the graph of the next capture size up, or run eagerly.

        ``task_args`` rewrite host-side arguments of the updatable tasks (see
        :func:`ascend_aclgraph.updatable`): list values of the real batch length are padded to
        the graph's size by repeating their last element.
        """
        n = self._inputs.batch_size(args)
        size = self.sizes.pad(n)
        with self._lock:
            entry = self._entries.get(size) if size is not None else None
            if entry is None or entry.captured is None:
                if size is None:
                    self.stats.eager_fallbacks += 1
                with torch.no_grad(), tasks.task_overrides(task_args or {}):
                    return self.fn(*args)
            assert size is not None
            self._inputs.copy_in(args, n, size)
            graph = entry.captured.graph
            if task_args:
                update_graph_tasks(graph, _pad_task_args(task_args, n, entry.size))
            graph.replay()
            self.stats.replays += 1
            outs = self._outputs_for(n, entry)
            if self.clone_outputs:
                outs = [t.clone() if isinstance(t, torch.Tensor) else t for t in outs]
            assert entry.spec is not None
            return tree_unflatten(outs, entry.spec)


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
    pad_value: float | int | None = 0,
    clone_outputs: bool = True,
    on_capture_failure: FailurePolicy = "raise",
    progress: bool | None = None,
) -> CapturedCallable:
    """Capture ``fn`` for every batch size and return a callable that replays them.

    Args:
        fn: a function or module; called positionally with tensors shaped like ``sample_args``.
        sample_args: example arguments. Tensors with a batch dim are copied into static
            buffers of the largest size; other tensors are captured by address (a call that
            passes a different tensor has it copied in); host values are baked in.
        batch_sizes: capture sizes (validated, deduplicated, sorted); default vLLM's list up to 512.
        dynamic_dim: batch dim of every tensor argument, or one entry (int or None) per argument.
        backend: "auto" (npu, then cuda, then cpu), "npu", "cuda" or "cpu".
        num_warmups: eager runs before each capture. Capture runs ``fn`` on the sample data, so
            its side effects (a KV-cache write, say) happen then.
        pad_value: fills the padding rows of batched inputs; ``None`` leaves stale rows.
        clone_outputs: return fresh tensors (default). ``False`` returns views of the static
            outputs, valid until the next call; faster, but not safe to keep across calls.
        on_capture_failure: "raise" (default) or "eager" (warn once, run that size eagerly).
        progress: show a tqdm bar while capturing; ``None`` shows it only on a terminal.

    Outputs whose first dim equals the padded size are cut back to the real batch along dim 0.
    Calls are serialized by a lock, so concurrent callers never see each other's outputs.
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
        clone_outputs=clone_outputs,
        on_capture_failure=on_capture_failure,
        progress=progress,
    )
    logger.debug("capture() finished in %.3fs", time.perf_counter() - start)
    return captured
