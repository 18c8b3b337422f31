"""Static input buffers with padding: how a variable-size batch meets a fixed-address graph.

A captured graph reads its inputs from the addresses it saw at capture. Every runner that lets
callers pass fresh tensors of any batch size (``ascend_aclgraph.capture`` and the ``aclgraph``
compile backend) keeps one buffer per batched input, sized for the largest capture size; each
call copies the real rows in, fills the padding rows with that input's pad value, and hands the
graph views of the padded size. A batched input the graph writes in place gets its real rows
copied back to the caller's tensor after the replay.

State inputs (parameters, buffers, KV caches, any unbatched tensor) are captured by address:
the graph writes them where they live, so a call must pass the very same tensor. Copying another
tensor into the captured one would make the graph write the caller's *old* tensor and never the
new one, so that is refused (:meth:`StaticBatchInputs.moved_state`).

Which input is which is decided once, by :mod:`ascend_aclgraph.batch_layout`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ascend_aclgraph.batch_layout import InputSpec, OutputSpec
from ascend_aclgraph.errors import GraphInputError

__all__ = ["CutOutputs", "OutputCutter", "StaticBatchInputs", "resolve_batch_dims"]


def resolve_batch_dims(
    args: Sequence[Any], dynamic_dim: int | Sequence[int | None]
) -> list[int | None]:
    """Normalize ``dynamic_dim`` to one non-negative batch dim (or ``None``) per argument.

    An int means "this dim of every tensor argument"; a sequence gives one entry per argument.

    Raises:
        GraphInputError: the spec does not fit the arguments, batched arguments disagree on the
            batch size, or no argument has a batch dim.
    """
    if isinstance(dynamic_dim, int) and not isinstance(dynamic_dim, bool):
        dims: list[int | None] = [
            dynamic_dim if isinstance(a, torch.Tensor) else None for a in args
        ]
    elif isinstance(dynamic_dim, Sequence) and len(dynamic_dim) == len(args):
        dims = list(dynamic_dim)
    else:
        raise GraphInputError(
            "dynamic_dim must be an int (the batch dim of every tensor argument) or a list "
            f"with one entry (int or None) per sample argument ({len(args)}), "
            f"got {dynamic_dim!r}"
        )
    batch = None
    for i, (arg, dim) in enumerate(zip(args, dims, strict=True)):
        if dim is None:
            continue
        if not isinstance(arg, torch.Tensor):
            raise GraphInputError(f"argument {i} has a batch dim but is not a tensor: {arg!r}")
        if not -arg.dim() <= dim < arg.dim():
            raise GraphInputError(
                f"argument {i} has shape {tuple(arg.shape)}; batch dim {dim} is out of range"
            )
        dims[i] = dim % arg.dim()
        if batch is None:
            batch = arg.shape[dim]
        elif arg.shape[dim] != batch:
            raise GraphInputError(
                f"batched arguments disagree on the batch size: {batch} vs {arg.shape[dim]} "
                f"(argument {i}); mark unbatched tensors with None in dynamic_dim"
            )
    if batch is None:
        raise GraphInputError("no tensor argument has a batch dim: nothing to pad")
    return dims


def _label(i: int, spec: InputSpec) -> str:
    return f"argument {i} ({spec.name!r})" if spec.name else f"argument {i}"


class StaticBatchInputs:
    """Persistent, padded input buffers for a family of graphs captured at several sizes.

    Args:
        sample_args: one call's arguments; they fix dtypes, non-batch shapes, the state tensors
            (by address) and the values of host arguments.
        specs: per argument, its role, batch dim and pad value (from a ``BatchLayout``).
        max_size: the largest size a graph is captured at.
        device: where the buffers live (the graph backend's device).
    """

    def __init__(
        self,
        sample_args: Sequence[Any],
        specs: Sequence[InputSpec],
        *,
        max_size: int,
        device: torch.device,
    ) -> None:
        self.specs = list(specs)
        self.max_size = max_size
        self._batched = [i for i, s in enumerate(self.specs) if s.role == "batched"]
        self._state = [i for i, s in enumerate(self.specs) if s.role == "state"]
        self._host = [i for i, s in enumerate(self.specs) if s.role == "host"]
        self._written = [i for i in self._batched if self.specs[i].written]
        # (argument index, batch dim) of each batched input: batch_size() runs on every call.
        self._batch_dims = [
            (i, dim) for i in self._batched if (dim := self.specs[i].dim) is not None
        ]
        self._nargs = len(self.specs)
        self._first = self._batch_dims[0] if self._batch_dims else None
        self.has_host = bool(self._host)
        self.has_written = bool(self._written)
        # A compiled model lifts every parameter and buffer to an input: checking that they are
        # the captured objects must not be a Python loop per call.
        self._state_args = operator.itemgetter(*self._state) if self._state else None
        self.static: list[Any] = []
        for arg, spec in zip(sample_args, self.specs, strict=True):
            if spec.role != "batched":
                self.static.append(arg)
                continue
            assert spec.dim is not None
            shape = list(arg.shape)
            shape[spec.dim] = max_size
            # Rows past the sample's are padding from the start: captures run on them.
            fill = spec.pad_value if spec.pad_value is not None else 0
            buf = torch.full(shape, fill, dtype=arg.dtype, device=device)
            n = min(arg.shape[spec.dim], max_size)
            buf.narrow(spec.dim, 0, n).copy_(arg.narrow(spec.dim, 0, n))
            self.static.append(buf)
        self._state_static = [self.static[i] for i in self._state]
        # Per batched input: rows [0, dirty) may hold real data (the rest hold padding). A graph
        # that writes the input may dirty any row, so such inputs count as dirty everywhere.
        self._dirty = [
            max_size
            if self.specs[i].written
            else min(sample_args[i].shape[self.specs[i].dim], max_size)
            for i in self._batched
        ]
        # Views per size, made once: slicing costs as much as a small kernel launch and these
        # are on every call's path; graphs also need the *same* view objects each replay.
        self._args: dict[int, tuple[Any, ...]] = {}
        self._input_views: dict[int, list[torch.Tensor]] = {}
        self._pad_views: dict[tuple[int, int], list[torch.Tensor]] = {}

    @property
    def dims(self) -> list[int | None]:
        return [s.dim if s.role == "batched" else None for s in self.specs]

    def args_for(self, size: int) -> tuple[Any, ...]:
        """The arguments a graph of ``size`` is captured and replayed with."""
        args = self._args.get(size)
        if args is None:
            parts: list[Any] = []
            for s, spec in zip(self.static, self.specs, strict=True):
                if spec.role == "size":
                    parts.append(size)
                elif spec.role == "batched":
                    assert spec.dim is not None
                    parts.append(s.narrow(spec.dim, 0, size))
                else:
                    parts.append(s)
            args = self._args[size] = tuple(parts)
        return args

    def batch_size(self, args: Sequence[Any]) -> int:
        """The real batch size of a call, checking that batched arguments agree."""
        if len(args) != len(self.static):
            raise GraphInputError(
                f"captured with {len(self.static)} arguments, called with {len(args)}"
            )
        n = -1
        for i, dim in self._batch_dims:
            arg = args[i]
            if not isinstance(arg, torch.Tensor):
                raise GraphInputError(
                    f"{_label(i, self.specs[i])} must be a tensor, got {type(arg).__name__}"
                )
            m = arg.shape[dim]
            if n < 0:
                n = m
            elif m != n:
                raise GraphInputError(
                    f"batched arguments disagree on the batch size: {n} vs {m} "
                    f"({_label(i, self.specs[i])})"
                )
        if n < 0:
            raise GraphInputError("no argument has a batch dim")
        return n

    def first_batch_size(self, args: Sequence[Any]) -> int:
        """The batch size of the first batched argument: :meth:`fill` checks every other one
        against it (their shapes must be those of the buffer views of that size), and raises
        what :meth:`batch_size` would. Callers that do not fill call :meth:`batch_size`."""
        first = self._first
        if first is not None and len(args) == self._nargs:
            arg = args[first[0]]
            if isinstance(arg, torch.Tensor):
                n: int = arg.shape[first[1]]
                return n
        return self.batch_size(args)  # raises, for the reason it gives

    def moved_state(self, args: Sequence[Any]) -> str | None:
        """Why this call cannot replay because a state input is not the captured one, or None.

        State tensors are captured by address; the graph reads and writes them there. A tensor
        at another address would be neither read nor written by a replay.
        """
        get = self._state_args
        if get is None:
            return None
        got = get(args)
        if len(self._state) == 1:
            got = (got,)
        if all(map(operator.is_, got, self._state_static)):
            return None
        for i in self._state:
            arg, static = args[i], self.static[i]
            if arg is static:
                continue
            if (
                not isinstance(arg, torch.Tensor)
                or arg.data_ptr() != static.data_ptr()
                or arg.shape != static.shape
                or arg.stride() != static.stride()
                or arg.dtype != static.dtype
            ):
                return (
                    f"{_label(i, self.specs[i])} is a state tensor captured by address "
                    f"(shape {tuple(static.shape)}, at 0x{static.data_ptr():x}); this call "
                    f"passes another tensor. State tensors (weights, buffers, caches, every "
                    "unbatched tensor) must keep their address: pass the captured tensor and "
                    "update it in place, or give the argument a batch dim"
                )
        return None

    def check_host(self, args: Sequence[Any]) -> None:
        for i in self._host:
            if args[i] != self.static[i]:
                raise GraphInputError(
                    f"{_label(i, self.specs[i])} is a host value baked into the graphs "
                    f"({self.static[i]!r}); got {args[i]!r}. Pass it as a tensor, or capture "
                    "again."
                )

    def copy_in(self, args: Sequence[Any], n: int, size: int) -> tuple[Any, ...]:
        """Copy a batch of ``n`` into the buffers, pad to ``size``; return the graph's args.

        Callers check :meth:`moved_state` and :meth:`check_host` first.
        """
        self.fill(args, n, size, self._views(n))
        return self.args_for(size)

    def fill(self, args: Sequence[Any], n: int, size: int, views: Sequence[torch.Tensor]) -> None:
        """:meth:`copy_in` without building the graph's arguments: ``views`` are
        ``batch_views(n)`` (a caller that replays a captured graph keeps them per size)."""
        dirty = self._dirty
        for k, i in enumerate(self._batched):
            arg = args[i]
            view = views[k]
            if (
                not isinstance(arg, torch.Tensor)
                or arg.shape != view.shape
                or arg.dtype != view.dtype
            ):
                self.batch_size(args)  # batched arguments that disagree, or not a tensor
                self._raise_shape(i, arg)
            view.copy_(arg)
            # Rows [n, dirty[k]) may hold an earlier call's real rows: pad them again. Rows past
            # that still hold padding, unless the graph itself writes this input.
            d = dirty[k]
            if d > n:
                if size > n:
                    pad = self.specs[i].pad_value
                    if pad is not None:
                        self._pad_view(n, min(size, d), k).fill_(pad)
                    if d <= size and not self.specs[i].written:
                        dirty[k] = n
            elif n > d:
                dirty[k] = n

    def batch_views(self, n: int) -> list[torch.Tensor]:
        """The first ``n`` rows of each batched input's buffer (made once per ``n``)."""
        return self._views(n)

    def _raise_shape(self, i: int, arg: Any) -> None:
        spec, static = self.specs[i], self.static[i]
        dim = spec.dim
        assert dim is not None
        expected = static.shape[:dim] + static.shape[dim + 1 :]
        got = arg.shape[:dim] + arg.shape[dim + 1 :]
        raise GraphInputError(
            f"{_label(i, spec)}: captured non-batch shape {tuple(expected)} and dtype "
            f"{static.dtype}, got {tuple(got)} and {arg.dtype}"
        )

    def copy_back(self, args: Sequence[Any], n: int) -> None:
        """Copy the real rows of batched inputs the graph wrote back into the caller's tensors."""
        if not self._written:
            return
        views = self._views(n)
        for k, i in enumerate(self._batched):
            if self.specs[i].written and args[i] is not views[k]:
                args[i].copy_(views[k])

    def _views(self, n: int) -> list[torch.Tensor]:
        views = self._input_views.get(n)
        if views is None:
            views = self._input_views[n] = [
                self.static[i].narrow(self.specs[i].dim, 0, n) for i in self._batched
            ]
        return views

    def _pad_view(self, n: int, size: int, k: int) -> torch.Tensor:
        views = self._pad_views.get((n, size))
        if views is None:
            views = self._pad_views[(n, size)] = [
                self.static[i].narrow(self.specs[i].dim, n, size - n) for i in self._batched
            ]
        return views[k]


class OutputCutter:
    """Cuts a graph's flat outputs back to the real batch, along the dims that carry it only."""

    def __init__(self, specs: Sequence[OutputSpec] | None) -> None:
        self.specs = list(specs) if specs is not None else None

    def __call__(self, flat: Sequence[Any], n: int, size: int) -> list[Any]:
        specs = self.specs
        if specs is None or n == size:
            return list(flat)
        if len(specs) != len(flat):
            raise AssertionError(f"{len(flat)} outputs but a layout for {len(specs)}")
        out: list[Any] = []
        for value, spec in zip(flat, specs, strict=True):
            if spec.kind == "batched" and isinstance(value, torch.Tensor):
                value = value.narrow(spec.dim, 0, n * spec.factor)
            elif spec.kind == "size":
                value = n * spec.factor
            out.append(value)
        return out

    def structure(self, out: Any, n: int, size: int) -> CutOutputs:
        """``out`` (any pytree) cut back to ``n``, ready to hand over on every later call."""
        flat, spec = tree_flatten(out)
        return CutOutputs(self(flat, n, size), spec)


class CutOutputs:
    """A graph's outputs cut back to the real batch: views made once, handed over per call.

    A replay rewrites the same output tensors, so the cut views stay valid; each call returns
    them (or clones of them) in the caller's structure, without a pytree round trip for the
    common shapes (one tensor; dynamo's flat tuple).
    """

    def __init__(self, flat: list[Any], spec: TreeSpec) -> None:
        self.flat = flat
        self.spec = spec
        self.single = spec.is_leaf()
        self.flat_tuple = spec.type is tuple and all(c.is_leaf() for c in spec.children())

    def returner(self, clone: bool) -> Callable[[], Any]:
        """A function of no arguments doing :meth:`result`, for a caller that hands the same
        cut outputs over on every call: one tensor is its bound ``clone`` (or the tensor)."""
        if self.single:
            t = self.flat[0]
            if clone and isinstance(t, torch.Tensor):
                return t.clone
            return lambda: t
        flat = self.flat
        if self.flat_tuple and not clone:
            same = tuple(flat)
            return lambda: same
        if self.flat_tuple and all(isinstance(t, torch.Tensor) for t in flat):
            if len(flat) == 1:  # dynamo's usual graph: a 1-tuple
                clone_one = flat[0].clone
                return lambda: (clone_one(),)
            return lambda: tuple(map(torch.Tensor.clone, flat))
        return functools.partial(self.result, clone)

    def result(self, clone: bool) -> Any:
        if self.single:
            t = self.flat[0]
            return t.clone() if clone and isinstance(t, torch.Tensor) else t
        flat = self.flat
        if clone:
            flat = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
        if self.flat_tuple:
            return tuple(flat)
        return tree_unflatten(flat, self.spec)
