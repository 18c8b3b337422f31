"""Updatable tasks on the twin: the recorded ops of one task, recorded again by each update.

On the NPU an updatable op is captured inside a task group. Between updates the group's kernels
replay as captured: the host values the op's Python body read (its arguments, a forward context)
stay baked. A task update re-issues the op while the replay waits at the task: its body runs
again on the host with the new arguments, reading host state as it is then, and the kernels it
launches replace the group's, writing the buffers the graph captured.

A :class:`TaskSegment` is that on the twin. At capture the task's ops (the op itself if its
kernel is C++, else the ops of its Python body) are recorded like any others; the graph's replay
function calls the segment's own small replay function at the task's place. An update stages
the new arguments, and when the replay reaches the task the op runs again under a fresh recorder
(for real: its results are this replay's), whose ops become the segment. Later replays run them
without calling the body.

The rest of the graph reads the memory the capture gave the task's outputs, so a new segment
must write that memory: the tensors the op writes are the captured ones, passed in again, and
must keep their storage and shape; the tensors it returns are copied into those it returned at
capture, and must keep their shapes and dtypes. An update that breaks this, or whose body now
syncs with the host, is refused with a :class:`~ascend_aclgraph.errors.TaskUpdateError`; the
task keeps the arguments and the segment of its last successful update.

A task whose segment is the op itself (a C++ kernel) writing only its arguments needs none of
the recording machinery to update: its body is the kernel, which cannot read Python host state
or sync, and its writes are its schema's. Such an update runs the op directly and swaps the new
arguments into the segment's one record (the same layout checks apply): vLLM's attention
kernels are such tasks, updated at every step of every layer.

The memory plan keeps a task's arguments and results, and whatever its ops read at capture,
alive at the task's step. A tensor that the body reaches only through a global, and reads at an
update but did not at capture, is taken as it is: should it be a temporary of the same graph,
the plan did not reserve it there (vLLM's forward context holds persistent buffers, made before
any capture, which the plan never touches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ascend_aclgraph.capture_guard import host_sync_methods_refused
from ascend_aclgraph.errors import CaptureError, TaskUpdateError
from ascend_aclgraph.twin.codegen import generate_segment, segment_replay
from ascend_aclgraph.twin.program import check_untracked_writes
from ascend_aclgraph.twin.recorder import OpRecord, Recorder, freeze, iter_tensors, written_args

if TYPE_CHECKING:
    from ascend_aclgraph.tasks import UpdatableTask

__all__ = ["TaskSegment"]


def _layout(t: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    # Same first element, shape and strides (and dtype, checked apart): the very same bytes.
    # ``data_ptr()`` rather than the storage's address plus the offset: ``untyped_storage()``
    # builds a Python object per call, and this runs for every written tensor at every update.
    return (t.data_ptr(), tuple(t.shape), t.stride())


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and _layout(a) == _layout(b)


def _writes_the_same(record: OpRecord, written: list[torch.Tensor]) -> bool:
    """Whether a call writing ``written`` writes exactly the buffers ``record``'s call wrote.

    Then the op's results are the captured ones (they are those buffers) and an update can
    skip the recorder; otherwise it records, and lands its results with recorded copies.
    """
    return len(written) == len(record.written) and all(
        _same_memory(a, b) for a, b in zip(written, record.written, strict=True)
    )


class TaskSegment:
    """The ops an updatable task replays, and what an update needs to record them again.

    ``start`` is where the task's records begin among the capture's records (the segment may be
    empty, and still has its place in the replay). Until :meth:`install` the segment holds all
    its capture records; afterwards, the ones its replay function runs.
    """

    def __init__(
        self,
        task: UpdatableTask,
        op: torch._ops.OpOverload,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        result: Any,
        records: Sequence[OpRecord],
        start: int,
    ) -> None:
        self.task = task
        self.op = op
        # The arguments as the graph's memory plan sees them (it rebinds their tensors); an
        # update replaces host values in them.
        self.args: tuple[Any, ...] = freeze(tuple(args))
        self.kwargs: dict[str, Any] = {k: freeze(v) for k, v in kwargs.items()}
        # The tensors the op returned at capture: later graph ops read them, so the result of
        # every update lands in them.
        self.targets: list[torch.Tensor] = list(iter_tensors(result))
        self.records: list[OpRecord] = list(records)
        self.start = start
        # What the graph's replay calls: the segment's replay function, or, while an update is
        # staged, the method that records the task again.
        self.run: Callable[[], None] = self._not_installed
        self._replay: Callable[[], None] = self._not_installed
        self._staged: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        # The installed segment's one record when it is the op itself writing its arguments
        # in place (see the module docstring): updates then skip the recorder.
        self._direct: OpRecord | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        """The graph tensors the segment holds: its arguments and the captured results."""
        yield from iter_tensors(self.args)
        yield from iter_tensors(self.kwargs)
        yield from self.targets

    def containers(self) -> list[Any]:
        """The containers through which the segment holds those tensors."""
        return [self.args, self.kwargs, self.targets]

    def rebind(self, swap: Callable[[Any], Any]) -> None:
        """Pass every tensor the segment holds through ``swap`` (memory planning's views)."""
        self.args = swap(self.args)
        self.kwargs = swap(self.kwargs)
        self.targets = swap(self.targets)

    def install(self, records: Sequence[OpRecord]) -> None:
        """Replay ``records`` (the capture's, after memory planning) from now on."""
        self._set(list(records))
        (only,) = records if len(records) == 1 else (None,)
        if (
            only is not None
            and only.func == self.op
            and not only.fresh
            and all(any(_same_memory(t, w) for w in only.written) for t in self.targets)
        ):
            self._direct = only

    def stage(self, changes: Mapping[str, Any]) -> None:
        """Record the task again with ``changes`` when the replay next reaches it.

        ``changes`` holds every host-side change since the last update (the task's pending
        ones), so each staging starts from the arguments of the last update.
        """
        self._staged = self.task._with_changes(
            self.args, self.kwargs, {k: freeze(v) for k, v in changes.items()}
        )
        self.run = self._update_and_run

    def _set(self, records: list[OpRecord]) -> None:
        self._replay = segment_replay(records)
        self.records = records
        self.run = self._replay

    @property
    def source(self) -> str:
        """The Python source that replays the segment's records (generated on demand)."""
        return generate_segment(self.records)[1]

    def _not_installed(self) -> None:
        raise RuntimeError(f"{self.task.describe()}: its segment was never installed")

    def _update_and_run(self) -> None:
        assert self._staged is not None
        args, kwargs = self._staged
        self._staged = None
        self.run = self._replay  # if recording fails, the last segment stands
        try:
            direct = self._direct
            written = written_args(self.op, args, kwargs)
            if direct is not None and _writes_the_same(direct, written):
                records = [self._run_direct(direct, args, kwargs, written)]
            else:
                records = self._record(args, kwargs, written)
        except (CaptureError, TaskUpdateError) as exc:
            # Refused, so not pending any more: the next replay runs the last segment.
            self.task.pending.clear()
            raise TaskUpdateError(
                f"update of {self.task.describe()} refused: {exc}. The task keeps the "
                "arguments of its last update (or its capture)."
            ) from exc
        self.args, self.kwargs = args, kwargs
        self._set([rec for rec in records if rec.computes()])
        if self._direct is not None:
            # The recorder may have replaced the op's call (landing copies into the captured
            # results): only a segment that is still the op alone stays direct.
            one = records[0] if len(records) == 1 else None
            self._direct = one if one is not None and one.func == self.op else None
        self.task._applied()

    def _run_direct(
        self,
        captured: OpRecord,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        written: list[torch.Tensor],
    ) -> OpRecord:
        """Run the op with ``args`` (writing ``written``) outside any recorder; the record that
        replays that call."""
        before = [_layout(t) for t in written]
        result = self.op(*args, **kwargs)
        self._check_written_in_place(written, before)
        outputs = list(iter_tensors(result))
        self._land(outputs)
        return dataclasses.replace(
            captured,
            args=args,
            kwargs=kwargs,
            outputs=outputs,
            written=written,
        )

    @staticmethod
    def _check_written_in_place(
        written: list[torch.Tensor],
        before: list[tuple[int, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        for i, (t, layout) in enumerate(zip(written, before, strict=True)):
            if _layout(t) != layout:
                raise TaskUpdateError(
                    f"written tensor {i} of the op moved or changed shape (data at "
                    f"{layout[0]:#x}, shape {layout[1]} before the body ran; {t.data_ptr():#x}, "
                    f"{tuple(t.shape)} after): the graph reads the captured buffers, so a task "
                    "must write them in place"
                )

    def _record(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], written: list[torch.Tensor]
    ) -> list[OpRecord]:
        """Run the op with ``args`` (writing ``written``) under a new recorder, its result
        landing in the targets."""
        before = [_layout(t) for t in written]
        recorder = Recorder()
        with host_sync_methods_refused(), recorder:
            result, _ = recorder.run_task(self.op, args, kwargs, self.task.describe())
            self._check_written_in_place(written, before)
            self._land(list(iter_tensors(result)))
        check_untracked_writes(recorder.records, self.targets)
        return recorder.records

    def _land(self, results: list[torch.Tensor]) -> None:
        """Copy ``results`` into the captured ones (recorded: the copies replay too)."""
        if len(results) != len(self.targets):
            raise TaskUpdateError(
                f"it returned {len(results)} tensor(s) where the capture returned "
                f"{len(self.targets)}, which the rest of the graph reads"
            )
        for i, (value, target) in enumerate(zip(results, self.targets, strict=True)):
            if value.shape != target.shape or value.dtype != target.dtype:
                raise TaskUpdateError(
                    f"its result {i} has shape {tuple(value.shape)} and dtype {value.dtype} "
                    f"where the captured result, which the rest of the graph reads, has "
                    f"{tuple(target.shape)} and {target.dtype}; an update must keep the shapes "
                    "and dtypes of what the op returns (pad to the captured size)"
                )
            if not _same_memory(value, target):
                target.copy_(value)
