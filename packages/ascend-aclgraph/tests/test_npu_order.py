"""Replay and task-update order, checked against a stand-in ``torch.npu`` that records calls.

No NPU exists here, so the npu backend runs over a small stand-in for torch_npu's public graph
API (``torch_npu/npu/graphs.py``, ``streams.py``) that logs every call in order. vllm-ascend's
order for a FULL graph with updatable tasks (``ACLGraphWrapper.__call__``, then
``update_full_graph_params``) is: synchronize the current stream (the previous replay must be
done before its tasks are rewritten), enqueue the replay (it waits on-device at each task's
``ExternalEvent``), then per task, on the update stream: ``graph_task_update_begin``, re-issue
the op with the new host arguments, ``graph_task_update_end``, and ``event.record``, which
releases the graph. A task nobody changed still gets its event recorded. Nothing may touch a
task before the replay is enqueued: that would race the previous replay.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.backends.npu import NpuGraphBackend
from ascend_aclgraph.wrapper import update_graph_tasks

Call = tuple[Any, ...]


class _Stream:
    def __init__(self, log: list[Call], name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name))


class _ExternalEvent:
    def __init__(self, log: list[Call], name: str) -> None:
        self.log, self.name = log, name

    def wait(self, stream: _Stream) -> None:
        self.log.append(("event.wait", self.name, stream.name))

    def reset(self, stream: _Stream) -> None:
        self.log.append(("event.reset", self.name, stream.name))

    def record(self, stream: _Stream) -> None:
        self.log.append(("event.record", self.name, stream.name))


class _NPUGraph:
    def __init__(self, log: list[Call], name: str) -> None:
        self.log, self.name = log, name

    def capture_begin(self, pool: object = None, capture_error_mode: str = "global") -> None:
        self.log.append(("capture_begin", self.name))

    def capture_end(self) -> None:
        self.log.append(("capture_end", self.name))

    def replay(self) -> None:
        self.log.append(("replay", self.name))

    def reset(self) -> None:
        self.log.append(("reset", self.name))


class FakeNpu:
    """``torch.npu`` as torch_npu defines it, reduced to what the backend calls, logging calls."""

    def __init__(self) -> None:
        self.log: list[Call] = []
        self._counts: dict[str, int] = {}
        self._current = _Stream(self.log, "default")
        # torch.npu.graph captures on a side stream of its own when given none.
        self._capture_stream = _Stream(self.log, "capture")
        self._capturing = False

    def _name(self, kind: str) -> str:
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        return f"{kind}{n}"

    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def synchronize(self, device: object = None) -> None:
        self.log.append(("device.synchronize",))

    def memory_reserved(self, device: object = None) -> int:
        return 0

    def current_stream(self) -> _Stream:
        return self._current

    def Stream(self) -> _Stream:
        return _Stream(self.log, self._name("stream"))

    @contextlib.contextmanager
    def stream(self, s: _Stream) -> Iterator[None]:
        previous, self._current = self._current, s
        try:
            yield
        finally:
            self._current = previous

    def ExternalEvent(self) -> _ExternalEvent:
        return _ExternalEvent(self.log, self._name("event"))

    def NPUGraph(self) -> _NPUGraph:
        return _NPUGraph(self.log, self._name("graph"))

    def graph_pool_handle(self) -> tuple[int, int]:
        return (0, 1)

    def is_current_stream_capturing(self) -> bool:
        return self._capturing

    @contextlib.contextmanager
    def graph(
        self,
        npu_graph: _NPUGraph,
        pool: object = None,
        stream: _Stream | None = None,
        auto_dispatch_capture: bool = False,
        capture_error_mode: str = "global",
    ) -> Iterator[None]:
        with self.stream(stream or self._capture_stream):
            npu_graph.capture_begin(pool, capture_error_mode=capture_error_mode)
            self._capturing = True
            try:
                yield
            finally:
                self._capturing = False
                npu_graph.capture_end()

    def graph_task_group_begin(self, stream: _Stream) -> None:
        self.log.append(("graph_task_group_begin", stream.name))

    def graph_task_group_end(self, stream: _Stream) -> str:
        handle = self._name("handle")
        self.log.append(("graph_task_group_end", stream.name, handle))
        return handle

    def graph_task_update_begin(self, stream: _Stream, handle: str) -> None:
        self.log.append(("graph_task_update_begin", stream.name, handle))

    def graph_task_update_end(self, stream: _Stream) -> None:
        self.log.append(("graph_task_update_end", stream.name))


@torch.library.custom_op("aclgraph_test::npu_order_attention", mutates_args=("out",))
def _attention(q: torch.Tensor, seq_lens: list[int], out: torch.Tensor) -> None:
    """Stands in for ``npu_fused_infer_attention_score.out``: host lengths, preallocated out.

    A launch goes to the current stream, as a real kernel launch does; the log says which.
    """
    npu: Any = torch.npu  # type: ignore[attr-defined]
    npu.log.append(("launch", npu.current_stream().name, list(seq_lens)))
    out.copy_(q * sum(seq_lens))


ATTENTION = torch.ops.aclgraph_test.npu_order_attention.default


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch) -> FakeNpu:
    """Installs the stand-in as torch_npu would: an importable module plus ``torch.npu``."""
    fake = FakeNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    return fake


def _captured_with_two_tasks(npu: FakeNpu) -> tuple[NpuGraphBackend, ag.Graph]:
    backend = NpuGraphBackend()
    graph = backend.new_graph(backend.new_pool())
    q = torch.ones(2, 4)
    with backend.capture(graph):
        ag.updatable(ATTENTION, q, seq_lens=[1, 2], out=torch.empty(2, 4))
        ag.updatable(ATTENTION, q, seq_lens=[3, 4], out=torch.empty(2, 4))
    return backend, graph


def test_capture_puts_each_task_in_a_group_behind_its_event(npu: FakeNpu) -> None:
    _captured_with_two_tasks(npu)
    # The update stream exists from the start; everything else happens on the capture stream.
    assert npu.log == [
        ("capture_begin", "graph0"),
        ("event.wait", "event0", "capture"),
        ("event.reset", "event0", "capture"),
        ("graph_task_group_begin", "capture"),
        ("launch", "capture", [1, 2]),
        ("graph_task_group_end", "capture", "handle0"),
        ("event.wait", "event1", "capture"),
        ("event.reset", "event1", "capture"),
        ("graph_task_group_begin", "capture"),
        ("launch", "capture", [3, 4]),
        ("graph_task_group_end", "capture", "handle1"),
        ("capture_end", "graph0"),
    ]


UPDATE = "stream0"  # the update stream: the only stream the backend creates


def _updated_then_released(handle: str, event: str, lens: list[int]) -> list[Call]:
    return [
        ("graph_task_update_begin", UPDATE, handle),
        ("launch", UPDATE, lens),
        ("graph_task_update_end", UPDATE),
        ("event.record", event, UPDATE),
    ]


def test_update_is_staged_and_applied_after_the_replay_is_enqueued(npu: FakeNpu) -> None:
    _, graph = _captured_with_two_tasks(npu)
    first, second = graph.tasks
    npu.log.clear()
    first.update(seq_lens=[5, 6])
    assert npu.log == [], "an update before the replay is enqueued races the previous replay"
    assert first.current("seq_lens") == [1, 2]  # staged, not applied yet
    graph.replay()
    assert npu.log == [
        ("synchronize", "default"),
        ("replay", "graph0"),
        *_updated_then_released("handle0", "event0", [5, 6]),
        ("event.record", "event1", UPDATE),  # unchanged task: only released
    ]
    assert first.current("seq_lens") == [5, 6]

    # A rewritten task keeps its new arguments: the next replay without changes only releases.
    npu.log.clear()
    graph.replay()
    assert npu.log == [
        ("synchronize", "default"),
        ("replay", "graph0"),
        ("event.record", "event0", UPDATE),
        ("event.record", "event1", UPDATE),
    ]
    assert (first.current("seq_lens"), second.current("seq_lens")) == ([5, 6], [3, 4])


def test_replay_with_updates_and_by_name_give_the_same_order(npu: FakeNpu) -> None:
    _, graph = _captured_with_two_tasks(npu)
    second = graph.tasks[1]
    npu.log.clear()
    graph.replay({second: {"seq_lens": [7, 8]}})
    assert npu.log == [
        ("synchronize", "default"),
        ("replay", "graph0"),
        ("event.record", "event0", UPDATE),
        *_updated_then_released("handle1", "event1", [7, 8]),
    ]

    # One value for every task that takes it (vLLM updates every attention layer per step).
    npu.log.clear()
    assert update_graph_tasks(graph, {"seq_lens": [9, 9]}) == 2
    assert npu.log == []
    graph.replay()
    assert npu.log == [
        ("synchronize", "default"),
        ("replay", "graph0"),
        *_updated_then_released("handle0", "event0", [9, 9]),
        *_updated_then_released("handle1", "event1", [9, 9]),
    ]
    npu.log.clear()
    graph.replay(graph.updates_for({"seq_lens": [1, 1]}))
    assert [c for c in npu.log if c[0] == "launch"] == [("launch", UPDATE, [1, 1])] * 2
    assert npu.log[:2] == [("synchronize", "default"), ("replay", "graph0")]


def test_graph_wrapper_replays_before_it_updates(npu: FakeNpu) -> None:
    backend = NpuGraphBackend()
    q, out = torch.ones(2, 4), torch.empty(2, 4)

    def step(q: torch.Tensor) -> torch.Tensor:
        ag.updatable(ATTENTION, q, seq_lens=[1, 2], out=out)
        return out

    wrapper = ag.GraphWrapper(
        step, ag.GraphMode.FULL, backend=backend, options=ag.GraphOptions(num_warmups=0)
    )
    desc = ag.BatchDescriptor(2)
    with ag.graph_context(ag.GraphMode.FULL, desc):
        wrapper(q)  # capture, then one replay (a device capture does not execute)
        npu.log.clear()
        assert wrapper.update_tasks(desc, seq_lens=[4, 4]) == 1
        assert npu.log == []
        wrapper(q)
    assert npu.log == [
        ("synchronize", "default"),
        ("replay", "graph0"),
        *_updated_then_released("handle0", "event0", [4, 4]),
    ]


def test_a_graph_without_tasks_just_replays(npu: FakeNpu) -> None:
    backend = NpuGraphBackend()
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        pass
    npu.log.clear()
    graph.replay()
    assert npu.log == [("replay", "graph0")]


def test_updates_for_a_task_of_another_graph_are_refused(npu: FakeNpu) -> None:
    _, graph = _captured_with_two_tasks(npu)
    _, other = _captured_with_two_tasks(npu)
    npu.log.clear()
    with pytest.raises(ag.TaskUpdateError, match="another graph"):
        graph.replay({other.tasks[0]: {"seq_lens": [1, 1]}})
    assert npu.log == []


# --- the same staging on the cpu twin: rewrite the recorded op, then run it ----------------


@torch.library.custom_op("aclgraph_test::scale_rows_by_lengths", mutates_args=("out",))
def _scale_rows(q: torch.Tensor, seq_lens: list[int], out: torch.Tensor) -> None:
    out.copy_(q * torch.tensor(seq_lens, dtype=q.dtype)[:, None])


def test_twin_rewrites_the_recorded_op_at_replay() -> None:
    backend = ag.get_backend("cpu")
    q, out = torch.ones(2, 3), torch.empty(2, 3)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        ag.updatable(
            torch.ops.aclgraph_test.scale_rows_by_lengths.default, q, seq_lens=[1, 2], out=out
        )
    task = graph.tasks[0]
    task.update(seq_lens=[5, 6])
    assert task.handle.kwargs["seq_lens"] == [1, 2], "staged: the replay records the op again"
    graph.replay()
    assert torch.equal(out, torch.tensor([[5.0] * 3, [6.0] * 3]))
    graph.replay({task: {"seq_lens": [7, 1]}})
    assert torch.equal(out, torch.tensor([[7.0] * 3, [1.0] * 3]))
    out.zero_()
    graph.replay()  # the rewrite stays, as a rewritten device task does
    assert torch.equal(out, torch.tensor([[7.0] * 3, [1.0] * 3]))
