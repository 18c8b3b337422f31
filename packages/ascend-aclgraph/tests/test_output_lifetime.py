"""Output lifetime as vLLM has it: valid until the next replay in the pool, held weakly.

vLLM's ``CUDAGraphWrapper`` keeps each entry's output through ``weak_ref_tensors`` and, with
``weak_ref_output`` (its piecewise backend sets it for the last piece only), drops even the
strong output at capture. The graph pool's allocator then reuses the memory of outputs nobody
holds for later captures, so graphs of all sizes share one working set, and an output read
after another graph of the pool replays shows that graph's data. The cpu twin models that
memory exactly (a pool block holding outputs is reusable once no tensor outside the twin's own
programs views them), so these tests check it bitwise here; device allocators place blocks
their own way, so the exact overlap is a twin-only assertion.
"""

from __future__ import annotations

import ascend_aclgraph as ag
import torch
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder
from torch.fx.experimental.proxy_tensor import make_fx

backend = ag.get_backend("cpu")
FULL = ag.GraphMode.FULL


def _wrapper(fn: object, **options: object) -> ag.GraphWrapper:
    return ag.GraphWrapper(
        fn,  # type: ignore[arg-type]
        FULL,
        backend=backend,
        pool=backend.new_pool(),
        options=ag.GraphOptions(num_warmups=0, **options),  # type: ignore[arg-type]
    )


def _run(wrapper: ag.GraphWrapper, x: torch.Tensor) -> torch.Tensor:
    with ag.graph_context(FULL, ag.BatchDescriptor(x.shape[0])):
        out: torch.Tensor = wrapper(x)
    return out


def test_weak_outputs_are_stale_after_another_graph_of_the_pool_replays() -> None:
    wrapper = _wrapper(lambda x: x * 2, weak_ref_outputs=True)
    x8, x4 = torch.ones(8, 16), torch.full((4, 16), 3.0)
    _run(wrapper, x8)  # capture the size-8 graph; its output is not kept
    _run(wrapper, x4)  # capture the size-4 graph: the allocator reuses that free memory
    a = _run(wrapper, x8)  # replay: a view of the size-8 graph's output
    assert torch.equal(a, x8 * 2)
    b = _run(wrapper, x4)
    assert torch.equal(b, x4 * 2)
    # Valid until the next replay in the pool, as on a device: a now shows the size-4 result.
    assert a.data_ptr() == b.data_ptr()
    assert not torch.equal(a, x8 * 2)
    assert torch.equal(a[:4], x4 * 2)


def test_the_entry_never_keeps_outputs_alive() -> None:
    # Without weak_ref_outputs the capture call returns the real output; once the caller drops
    # it, nothing holds that memory (the entry keeps only a non-owning view).
    wrapper = _wrapper(lambda x: x * 2)
    x8, x4 = torch.ones(8, 16), torch.full((4, 16), 3.0)
    _run(wrapper, x8)
    size_8_alone = wrapper.pool.nbytes
    _run(wrapper, x4)
    assert wrapper.pool.nbytes == size_8_alone
    a, b = _run(wrapper, x8), _run(wrapper, x4)
    assert a.data_ptr() == b.data_ptr()


def test_a_held_output_keeps_its_memory_like_on_a_device() -> None:
    wrapper = _wrapper(lambda x: x * 2)
    x8, x4 = torch.ones(8, 16), torch.full((4, 16), 3.0)
    kept = _run(wrapper, x8)  # the caller holds the capture's output
    _run(wrapper, x4)
    _run(wrapper, x8)
    _run(wrapper, x4)
    assert torch.equal(kept, x8 * 2)


def test_any_view_of_an_output_keeps_its_memory() -> None:
    # Liveness is the memory's, not one tensor object's: a view made after capture holds it.
    wrapper = _wrapper(lambda x: x * 2)
    x8, x4 = torch.ones(8, 16), torch.full((4, 16), 3.0)
    head = _run(wrapper, x8)[:4]
    _run(wrapper, x4)
    _run(wrapper, x8)
    _run(wrapper, x4)
    assert torch.equal(head, x8[:4] * 2)


def test_a_temporary_seen_through_views_shares_the_pool() -> None:
    # A view's base gets one more Python reference, from C++: that is the twin's own view, not
    # a holder outside the graph, so the temporary still goes into the shared blocks.
    w = torch.randn(16, 16)
    graph = backend.new_graph(backend.new_pool())
    x = torch.randn(8, 16)
    with backend.capture(graph):
        graph.declare_outputs([((x @ w).view(8, 4, 4) * 2).sum(-1)])
    program = graph.native.program
    assert program.own_bytes == 0
    assert program.planned_bytes == (8 * 16 + 8 * 16 + 8 * 4) * 4  # mm, mul, sum


# --- a decoder, PIECEWISE and FULL, captured at several sizes into one pool -----------------

SIZES = [16, 8, 4, 2, 1]  # largest first, as vLLM captures


def _decoder() -> tuple[Qwen3Decoder, torch.fx.GraphModule]:
    model = Qwen3Decoder(Qwen3Config.small())
    with torch.no_grad():
        gm = make_fx(model, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            torch.randn(12, 64), torch.arange(12)
        )
    return model, gm


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.randn(n, 64, generator=gen), torch.randint(0, 30, (n,), generator=gen)


Inputs = dict[int, tuple[torch.Tensor, torch.Tensor]]


def _capture_piecewise(sizes: list[int]) -> tuple[Qwen3Decoder, ag.PiecewiseGraph, Inputs]:
    model, gm = _decoder()
    pool = backend.new_pool()
    pw = ag.PiecewiseGraph(gm, backend=backend, pool=pool, options=ag.GraphOptions(num_warmups=0))
    # The runner's persistent input buffers, one set per size.
    static = {n: _inputs(n) for n in sizes}
    with torch.no_grad():
        for n in sizes:
            with ag.graph_context(ag.GraphMode.PIECEWISE, ag.BatchDescriptor(n)):
                pw(*static[n])
    return model, pw, static


def _shared_bytes(pool: ag.GraphPool) -> int:
    """Bytes of the twin's blocks, which all graphs of the pool share.

    Besides them, each twin graph keeps the constants it folded (a device graph recomputes
    those in pool memory instead): a small amount per graph, counted in ``pool.nbytes`` too.
    """
    blocks: int = pool.handle.nbytes
    return blocks


def test_piecewise_pool_is_one_working_set_for_all_sizes() -> None:
    _, largest_only, _ = _capture_piecewise(SIZES[:1])
    _, all_sizes, _ = _capture_piecewise(SIZES)
    assert all_sizes.stats.captures == 3 * len(SIZES)  # two layers: three pieces per size
    # Every smaller size fits in the memory the largest one used: nothing outlives a forward.
    assert _shared_bytes(_pool(all_sizes)) == _shared_bytes(_pool(largest_only))
    assert all_sizes.stats.pool_bytes < 1.1 * largest_only.stats.pool_bytes


def _pool(pw: ag.PiecewiseGraph) -> ag.GraphPool:
    return pw.pieces[0].wrapper.pool


def test_piecewise_replays_still_equal_eager_with_the_shared_memory() -> None:
    model, pw, static = _capture_piecewise(SIZES)
    for _ in range(2):
        for n in [1, 16, 4, 2, 8]:  # any order: each forward replays its pieces in order
            x, pos = static[n]
            x.copy_(torch.randn(n, 64))
            before = model.cache_state()
            with torch.no_grad():
                expected = model(x, pos)
            expected_cache = model.cache_state()
            model.load_cache_state(before)
            with torch.no_grad(), ag.graph_context(ag.GraphMode.PIECEWISE, ag.BatchDescriptor(n)):
                got = pw(x, pos).clone()
            assert torch.equal(got, expected), n
            for a, b in zip(model.cache_state(), expected_cache, strict=True):
                assert torch.equal(a, b)


def test_full_graphs_of_all_sizes_share_one_working_set() -> None:
    def pool(sizes: list[int]) -> ag.GraphPool:
        model, _ = _decoder()
        wrapper = ag.GraphWrapper(
            model, FULL, backend=backend, options=ag.GraphOptions(num_warmups=0)
        )
        with torch.no_grad():
            for n in sizes:
                with ag.graph_context(FULL, ag.BatchDescriptor(n)):
                    wrapper(*_inputs(n))
        return wrapper.pool

    all_sizes, largest_only = pool(SIZES), pool(SIZES[:1])
    assert _shared_bytes(all_sizes) == _shared_bytes(largest_only)
    assert all_sizes.nbytes < 1.1 * largest_only.nbytes


def test_capture_api_pool_is_one_working_set_for_all_sizes() -> None:
    def pool(sizes: list[int]) -> ag.GraphPool:
        model = Qwen3Decoder(Qwen3Config.small())
        return ag.capture(model, _inputs(max(sizes)), batch_sizes=sizes, backend="cpu").pool

    assert _shared_bytes(pool(SIZES)) == _shared_bytes(pool(SIZES[:1]))
