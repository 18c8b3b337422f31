"""The host-side capture guard (``Tensor.tolist``/``numpy``, ``torch.manual_seed``) refuses in
the capturing thread only: a serving process may capture on one thread while another one runs
eagerly. Threads are interleaved with events, so every run takes the same path."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import ascend_aclgraph as ag
import numpy as np
import pytest
import torch

backend = ag.get_backend("cpu")
_TIMEOUT_S = 30


def _wait(event: threading.Event) -> None:
    assert event.wait(_TIMEOUT_S), "the other thread never got there"


class _Worker:
    """Runs ``body`` on its own thread; ``join`` re-raises what it raised."""

    def __init__(self, body: Callable[[], None]) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                body()
            except BaseException as exc:  # handed to the test thread
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(_TIMEOUT_S)
        assert not self.thread.is_alive(), "worker thread hung"
        if self.error is not None:
            raise self.error


@pytest.fixture
def restores_torch() -> Iterator[None]:
    """After the test, the shadowed functions are torch's own again."""
    import torch._dynamo  # its first import wraps torch.manual_seed, once

    def current() -> tuple[object, ...]:
        return (
            torch.Tensor.tolist,
            torch.Tensor.numpy,
            torch.manual_seed,
            torch.random.manual_seed,
            torch.seed,
            torch.random.seed,
        )

    originals = current()
    yield
    assert current() == originals
    assert "tolist" not in vars(torch.Tensor)
    assert "numpy" not in vars(torch.Tensor)


def test_other_threads_keep_host_reads_and_seeding_while_one_captures(restores_torch: None) -> None:
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def eager_thread() -> None:
        _wait(inside)  # runs while the main thread is inside its capture
        try:
            t = torch.arange(3)
            seen["tolist"] = t.tolist()
            seen["numpy"] = t.numpy().tolist()
            seen["asarray"] = np.asarray(t).tolist()
            torch.manual_seed(7)
            seen["seeded"] = torch.initial_seed()
        finally:
            done.set()

    worker = _Worker(eager_thread)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        x = torch.ones(3)
        inside.set()
        _wait(done)
        graph.declare_outputs([x + 1])
    worker.join()
    assert seen == {"tolist": [0, 1, 2], "numpy": [0, 1, 2], "asarray": [0, 1, 2], "seeded": 7}


def _tolist(x: torch.Tensor) -> object:
    return x.tolist()


def _numpy(x: torch.Tensor) -> object:
    return np.asarray(x)


def _manual_seed(x: torch.Tensor) -> object:
    return torch.manual_seed(0)


def _random_manual_seed(x: torch.Tensor) -> object:
    return torch.random.manual_seed(0)


def _seed(x: torch.Tensor) -> object:
    return torch.seed()


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (_tolist, r"Tensor\.tolist\(\).*host sync"),
        (_numpy, r"Tensor\.numpy\(\).*host sync"),
        (_manual_seed, r"torch\.manual_seed\(\).*reseeds"),
        (_random_manual_seed, r"torch\.manual_seed\(\).*reseeds"),
        (_seed, r"torch\.seed\(\).*reseeds"),
    ],
)
def test_the_capturing_thread_is_refused_at_its_line(
    call: Callable[[torch.Tensor], object], what: str, restores_torch: None
) -> None:
    line = call.__code__.co_firstlineno + 1
    graph = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(
            ag.CaptureError,
            match=rf"cannot capture {what.split('.*')[0]} at \S*test_capture_guard_threads\.py:"
            rf"{line} .*{what.split('.*')[1]}",
        ),
        backend.capture(graph),
    ):
        call(torch.ones(2))
    assert not graph.captured


def test_overlapping_captures_in_two_threads_each_refuse_only_their_own(
    restores_torch: None,
) -> None:
    """Thread A captures, B starts capturing, A finishes: B is still guarded, A is not."""
    b_inside, a_done, b_may_finish = threading.Event(), threading.Event(), threading.Event()
    refused_in_b: list[str] = []

    def capture_in_b() -> None:
        graph = backend.new_graph(backend.new_pool())
        with backend.capture(graph):
            b_inside.set()
            _wait(a_done)
            for call in (lambda: torch.ones(2).tolist(), lambda: torch.manual_seed(1)):
                with pytest.raises(ag.CaptureError) as info:
                    call()
                refused_in_b.append(str(info.value).split(" at ")[0])
            _wait(b_may_finish)
            graph.declare_outputs([torch.ones(2) * 2])

    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        worker = _Worker(capture_in_b)
        _wait(b_inside)
        graph.declare_outputs([torch.ones(2) + 1])
    a_done.set()
    # A's capture has ended while B's goes on: A may read and seed again.
    assert torch.arange(2).tolist() == [0, 1]
    torch.manual_seed(3)
    b_may_finish.set()
    worker.join()
    assert refused_in_b == ["cannot capture Tensor.tolist()", "cannot capture torch.manual_seed()"]
