"""The backend contract, checked on every backend that can run here (see conftest)."""

from __future__ import annotations

import threading

import ascend_aclgraph as ag
import pytest
import torch
from aclgraph_helpers import assert_same, rand
from ascend_aclgraph.backends import GraphBackend


def _mlp(w1: torch.Tensor, w2: torch.Tensor):  # type: ignore[no-untyped-def]
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x @ w1) @ w2 + x

    return f


def _capture(backend: GraphBackend, fn, *args):  # type: ignore[no-untyped-def]
    pool = backend.new_pool()
    graph = backend.new_graph(pool)
    with backend.capture(graph):
        out = fn(*args)
        graph.declare_outputs([out])
    if not backend.capture_executes:
        graph.replay()
    return graph, out


def test_replay_equals_eager_after_copying_new_inputs(backend: GraphBackend) -> None:
    w1, w2 = rand(backend, 32, 64), rand(backend, 64, 32)
    fn = _mlp(w1, w2)
    static = rand(backend, 8, 32)
    graph, out = _capture(backend, fn, static)
    for _ in range(3):
        new = rand(backend, 8, 32)
        static.copy_(new)
        graph.replay()
        assert_same(out, fn(new), backend)


def test_stale_input_is_what_a_device_computes(backend: GraphBackend) -> None:
    """Passing a *new* tensor instead of copying into the captured one changes nothing: the
    graph reads the captured address. The twin must reproduce that bug, not hide it."""
    fn = _mlp(rand(backend, 16, 16), rand(backend, 16, 16))
    static = rand(backend, 4, 16)
    graph, out = _capture(backend, fn, static)
    captured_result = out.clone()
    fresh = rand(backend, 4, 16)  # never copied into `static`
    graph.replay()
    assert_same(out, captured_result, backend)
    assert not torch.allclose(out, fn(fresh))


def test_wrapper_debug_mode_catches_new_input_tensor(backend: GraphBackend) -> None:
    fn = _mlp(rand(backend, 16, 16), rand(backend, 16, 16))
    wrapper = ag.GraphWrapper(
        fn, ag.GraphMode.FULL, backend=backend, options=ag.GraphOptions(num_warmups=0, debug=True)
    )
    desc = ag.BatchDescriptor(4)
    static = rand(backend, 4, 16)
    with ag.graph_context(ag.GraphMode.FULL, desc):
        wrapper(static)
        static.copy_(rand(backend, 4, 16))
        assert_same(wrapper(static), fn(static), backend)
        with pytest.raises(ag.GraphInputError, match="captured with input addresses"):
            wrapper(rand(backend, 4, 16))


def test_host_item_in_capture_names_user_line(backend: GraphBackend) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        scale = x.sum().item()  # the offending line
        return x * scale

    graph = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(ag.CaptureError, match=r"_local_scalar_dense.*test_conformance\.py:\d+"),
        backend.capture(graph),
    ):
        f(rand(backend, 4))
    assert not graph.captured
    with pytest.raises(RuntimeError, match="never captured"):
        graph.replay()


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (lambda x: x.tolist(), "tolist"),
        (lambda x: torch.nonzero(x), "nonzero"),
        (lambda x: x[x > 0], "index"),
        (lambda x: bool(x.sum() > 0), "_local_scalar_dense"),
        (lambda x: torch.equal(x, x), "equal"),
        (lambda x: x.numpy(), "numpy"),
    ],
)
def test_host_syncs_are_refused(backend: GraphBackend, body, what: str) -> None:  # type: ignore[no-untyped-def]
    graph = backend.new_graph(backend.new_pool())
    with pytest.raises(ag.CaptureError, match=what), backend.capture(graph):
        body(rand(backend, 8))
    # The patch on Tensor.tolist/numpy is gone once capture ends.
    assert isinstance(rand(backend, 2).cpu().tolist(), list)


def test_integer_indexing_is_allowed(backend: GraphBackend) -> None:
    table = rand(backend, 10, 4)
    idx = torch.tensor([3, 1, 7], device=backend.device)
    graph, out = _capture(backend, lambda i: table[i] * 2, idx)
    idx.copy_(torch.tensor([0, 9, 2]))
    graph.replay()
    assert_same(out, table[torch.tensor([0, 9, 2], device=backend.device)] * 2, backend)


def test_in_place_write_to_external_buffer_replays(backend: GraphBackend) -> None:
    cache = torch.zeros(6, 3, device=backend.device)
    pos = torch.tensor([1], device=backend.device)
    val = rand(backend, 1, 3)

    def write(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.index_copy_(0, p, v)
        return cache.sum(0)

    graph, out = _capture(backend, write, pos, val)
    pos.fill_(4)
    val.copy_(torch.ones(1, 3))
    graph.replay()
    assert torch.equal(cache[4].cpu(), torch.ones(3))
    assert_same(out, cache.sum(0), backend)


def test_graphs_in_one_pool_share_memory_largest_first(backend: GraphBackend) -> None:
    if backend.name != "cpu":
        pytest.skip("pool bytes are only exact on the cpu twin; devices round to allocator blocks")
    w = rand(backend, 64, 64)

    def deep(x: torch.Tensor) -> torch.Tensor:
        for _ in range(6):
            x = torch.relu(x @ w)
        return x

    def pool_bytes(order: list[int], shared: bool) -> int:
        pool = backend.new_pool()
        total = 0
        for n in order:
            p = pool if shared else backend.new_pool()
            g = backend.new_graph(p)
            with backend.capture(g):
                g.declare_outputs([deep(rand(backend, n, 64))])
            total += p.nbytes if not shared else 0
        return pool.nbytes if shared else total

    shared = pool_bytes([32, 16, 8], shared=True)
    separate = pool_bytes([32, 16, 8], shared=False)
    assert shared < separate
    # Largest first: the smaller graphs fit in the blocks the largest one made.
    assert pool_bytes([32, 16, 8], shared=True) <= pool_bytes([8, 16, 32], shared=True)


def test_concurrent_callers_never_see_each_others_outputs(backend: GraphBackend) -> None:
    w = rand(backend, 16, 16)
    step = ag.capture(
        lambda x: torch.tanh(x @ w), (rand(backend, 8, 16),), batch_sizes=[1, 4, 8], backend=backend
    )
    errors: list[str] = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(50):
            n = int(torch.randint(1, 9, (1,), generator=gen))
            x = torch.randn(n, 16, generator=gen).to(backend.device)
            got = step(x)
            expected = torch.tanh(x @ w)
            if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
                errors.append(f"seed {seed} batch {n}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert step.stats.replays == 200
