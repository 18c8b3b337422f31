"""Static input buffers with padding: how a variable-size batch meets a fixed-address graph.

A captured graph reads its inputs from the addresses it saw at capture. Every runner that lets
callers pass fresh tensors of any batch size (``ascend_aclgraph.capture`` and the ``aclgraph``
compile backend) keeps one buffer per batched argument, sized for the largest capture size;
each call copies the real rows in, fills the padding rows, and hands the graph views of the
padded size. Arguments without a batch dim are captured by address; a call that passes a
different tensor for one of them has its data copied in.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

from ascend_aclgraph.errors import GraphInputError

__all__ = ["StaticBatchInputs", "resolve_batch_dims"]


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
                f"(argument {i})"
            )
    if batch is None:
        raise GraphInputError("no tensor argument has a batch dim: nothing to pad")
    return dims


class StaticBatchInputs:
    """Persistent, padded input buffers for a family of graphs captured at several sizes.

    Args:
        sample_args: one call's arguments; they fix dtypes, non-batch shapes and the values of
            host arguments.
        dims: per argument, its batch dim, or ``None`` for arguments captured as they are.
        max_size: the largest size a graph is captured at.
        device: where the buffers live (the graph backend's device).
        pad_value: what padding rows are filled with; ``None`` leaves stale rows.
        owned: per argument, whether an unbatched tensor gets a private copy instead of being
            captured by address (for tensors the caller does not expect to be written into).
        size_slots: indices of host int arguments that carry the batch size (a dynamic-shape
            graph's SymInt inputs): graphs see the padded size there.
    """

    def __init__(
        self,
        sample_args: Sequence[Any],
        dims: Sequence[int | None],
        *,
        max_size: int,
        device: torch.device,
        pad_value: float | int | None,
        owned: Sequence[bool] | None = None,
        size_slots: Collection[int] = (),
    ) -> None:
        self.dims = list(dims)
        self.pad_value = pad_value
        self.size_slots = frozenset(size_slots)
        self.max_size = max_size
        self._batched = [i for i, d in enumerate(self.dims) if d is not None]
        self.static: list[Any] = []
        for i, (arg, dim) in enumerate(zip(sample_args, self.dims, strict=True)):
            if dim is None:
                if owned is not None and owned[i] and isinstance(arg, torch.Tensor):
                    arg = arg.detach().clone()
                self.static.append(arg)
                continue
            shape = list(arg.shape)
            shape[dim] = max_size
            buf = torch.zeros(shape, dtype=arg.dtype, device=device)
            n = min(arg.shape[dim], max_size)
            buf.narrow(dim, 0, n).copy_(arg.narrow(dim, 0, n))
            self.static.append(buf)
        # Views per size, made once: slicing costs as much as a small kernel launch and these
        # are on every call's path; graphs also need the *same* view objects each replay.
        self._args: dict[int, tuple[Any, ...]] = {}
        self._input_views: dict[int, list[torch.Tensor | None]] = {}
        self._pad_views: dict[tuple[int, int], list[torch.Tensor | None]] = {}

    def args_for(self, size: int) -> tuple[Any, ...]:
        """The arguments a graph of ``size`` is captured and replayed with."""
        args = self._args.get(size)
        if args is None:
            args = self._args[size] = tuple(
                size if i in self.size_slots else (s if dim is None else s.narrow(dim, 0, size))
                for i, (s, dim) in enumerate(zip(self.static, self.dims, strict=True))
            )
        return args

    def batch_size(self, args: Sequence[Any]) -> int:
        """The real batch size of a call, checking that batched arguments agree."""
        if len(args) != len(self.static):
            raise GraphInputError(
                f"captured with {len(self.static)} arguments, called with {len(args)}"
            )
        n = None
        for i in self._batched:
            arg, dim = args[i], self.dims[i]
            assert dim is not None
            if not isinstance(arg, torch.Tensor):
                raise GraphInputError(f"argument {i} must be a tensor, got {type(arg).__name__}")
            if n is None:
                n = arg.shape[dim]
            elif arg.shape[dim] != n:
                raise GraphInputError(
                    f"batched arguments disagree on the batch size: {n} vs {arg.shape[dim]} "
                    f"(argument {i})"
                )
        if n is None:
            raise GraphInputError("no argument has a batch dim")
        return int(n)

    def copy_in(self, args: Sequence[Any], n: int, size: int) -> tuple[Any, ...]:
        """Copy a batch of ``n`` into the buffers, pad to ``size``; return the graph's args."""
        for i, (arg, static, dim) in enumerate(zip(args, self.static, self.dims, strict=True)):
            if dim is None:
                if i not in self.size_slots:
                    self._copy_unbatched(i, arg, static)
                continue
            expected = static.shape[:dim] + static.shape[dim + 1 :]
            got = arg.shape[:dim] + arg.shape[dim + 1 :]
            if got != expected or arg.dtype != static.dtype:
                raise GraphInputError(
                    f"argument {i}: captured non-batch shape {tuple(expected)} and dtype "
                    f"{static.dtype}, got {tuple(got)} and {arg.dtype}"
                )
            self._input_view(n, i).copy_(arg)
            if size > n and self.pad_value is not None:
                self._pad_view(n, size, i).fill_(self.pad_value)
        return self.args_for(size)

    @staticmethod
    def _copy_unbatched(i: int, arg: Any, static: Any) -> None:
        if isinstance(static, torch.Tensor):
            if arg is static:
                return
            if not isinstance(arg, torch.Tensor) or arg.shape != static.shape:
                raise GraphInputError(
                    f"argument {i} was captured as a tensor of shape "
                    f"{tuple(static.shape)}; got {getattr(arg, 'shape', type(arg))}"
                )
            if arg.data_ptr() != static.data_ptr():
                static.copy_(arg)
        elif arg != static:
            raise GraphInputError(
                f"argument {i} is a host value baked into the graphs ({static!r}); "
                f"got {arg!r}. Pass it as a tensor, or capture again."
            )

    def _input_view(self, n: int, i: int) -> torch.Tensor:
        views = self._input_views.get(n)
        if views is None:
            views = self._input_views[n] = [
                None if d is None else s.narrow(d, 0, n)
                for s, d in zip(self.static, self.dims, strict=True)
            ]
        view = views[i]
        assert view is not None
        return view

    def _pad_view(self, n: int, size: int, i: int) -> torch.Tensor:
        views = self._pad_views.get((n, size))
        if views is None:
            views = self._pad_views[(n, size)] = [
                None if d is None else s.narrow(d, n, size - n)
                for s, d in zip(self.static, self.dims, strict=True)
            ]
        view = views[i]
        assert view is not None
        return view
