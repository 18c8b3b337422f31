"""Internals of the cpu twin: what re-runs, what is folded, where memory goes, what is refused."""

from __future__ import annotations

from collections.abc import Callable

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.backends.cpu import CpuTwinBackend
from ascend_aclgraph.twin.codegen import fast_binding, find_out_overload

backend = ag.get_backend("cpu")


def _capture(fn, *args, pool=None):  # type: ignore[no-untyped-def]
    graph = backend.new_graph(pool or backend.new_pool())
    with backend.capture(graph):
        out = fn(*args)
        graph.declare_outputs(list(out if isinstance(out, tuple) else (out,)))
    return graph, out


def test_constants_are_folded_and_mutated_factories_rerun() -> None:
    x = torch.randn(4)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ramp = torch.arange(4, dtype=torch.float32) * 2  # constant: folded
        acc = torch.zeros(4)  # later written by a dynamic op: must re-run
        acc.add_(x)
        return x + ramp, acc

    graph, (a, acc) = _capture(f, x)
    program = graph.native.program
    assert "arange" not in program.source
    assert "mul" not in program.source.split("add")[0]
    assert program.num_replayed < program.num_recorded
    x.copy_(torch.ones(4))
    graph.replay()
    graph.replay()  # zeros re-runs each replay, so acc does not accumulate across replays
    assert torch.equal(a, torch.ones(4) + torch.arange(4) * 2)
    assert torch.equal(acc, torch.ones(4))


def _ramp_doubled_after_use(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    c = torch.arange(x.shape[-1])
    y = x + c  # reads the ramp ...
    c.mul_(2)  # ... which changes afterwards
    return y, x * c


def _mask_trimmed_after_use(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    mask = torch.ones(x.shape[-1], x.shape[-1])
    full = x @ mask  # reads the full mask ...
    mask.tril_()  # ... before it becomes causal
    return full, x @ mask


def _chain_of_mutated_constants(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a = torch.arange(x.shape[-1], dtype=x.dtype)
    b = a * 2  # folded: a constant computed from a constant
    y = x + b  # reads b as 2a
    b.add_(1)  # b is then rebuilt, which reads a: a must still be arange here
    a.mul_(3)
    return y, x * b, x - a


@pytest.mark.parametrize(
    "fn", [_ramp_doubled_after_use, _mask_trimmed_after_use, _chain_of_mutated_constants]
)
def test_constants_mutated_after_a_read_replay_the_value_read(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
) -> None:
    """A folded constant holds its final value; an op that read it before a later in-place
    change must see the earlier one, on every replay."""
    x = torch.randn(3, 5)
    graph, outs = _capture(fn, x)
    for _ in range(3):
        x.copy_(torch.randn(3, 5))
        graph.replay()
        for got, expected in zip(outs, fn(x), strict=True):
            assert torch.equal(got, expected)


def test_random_ops_redraw_each_replay_like_eager_under_the_same_seed() -> None:
    x = torch.zeros(5)
    graph, out = _capture(lambda x: x + torch.rand(5), x)
    torch.manual_seed(123)
    graph.replay()
    torch.manual_seed(123)
    assert torch.equal(out, torch.rand(5))


def test_ops_without_out_overload_use_call_and_copy() -> None:
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    graph, out = _capture(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    assert "_r = " in graph.native.program.source  # the copy path was generated
    q.copy_(torch.randn(1, 2, 3, 8))
    graph.replay()
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_out_overloads_and_fast_bindings_are_the_same_op() -> None:
    assert find_out_overload(torch.ops.aten.mm.default) is torch.ops.aten.mm.out
    assert find_out_overload(torch.ops.aten.add.Tensor) is torch.ops.aten.add.out
    assert find_out_overload(torch.ops.aten.max.dim) is torch.ops.aten.max.dim_max
    assert find_out_overload(torch.ops.aten.view.default) is None
    a, b, o = torch.randn(2, 3), torch.randn(3, 4), torch.empty(2, 4)
    assert fast_binding(torch.ops.aten.mm.out, (a, b), {"out": o}) is torch._C._VariableFunctions.mm
    # A binding that would reach another overload is not taken.
    binding = fast_binding(torch.ops.aten.add.Scalar, (a, 2), {})
    assert binding is torch.ops.aten.add.Scalar._op or binding(a, 2).equal(a + 2)


def test_intermediates_share_pool_blocks_and_graphs_share_the_pool() -> None:
    w = torch.randn(32, 32)

    def chain(x: torch.Tensor) -> torch.Tensor:
        for _ in range(8):
            x = torch.tanh(x @ w)
        return x

    pool = backend.new_pool()
    big, _ = _capture(chain, torch.randn(16, 32), pool=pool)
    after_big = pool.nbytes
    _capture(chain, torch.randn(8, 32), pool=pool)
    prog = big.native.program
    # 16 intermediates of 2 KiB each were planned, but live ranges let them share a few blocks.
    assert prog.planned_bytes >= 16 * 16 * 32 * 4
    assert after_big < prog.planned_bytes
    # The smaller graph's temporaries fit in the larger one's free blocks; only its output,
    # which must not land on the larger graph's (pinned) output, needs a new block.
    assert pool.nbytes - after_big <= 8 * 32 * 4 + 64


def test_outputs_survive_other_graphs_of_the_pool_like_on_a_device() -> None:
    """A device pool never places a capture's work on memory that earlier outputs still hold;
    a piecewise model relies on it (piece k + 1 reads piece k's outputs)."""
    pool = backend.new_pool()
    x1, x2 = torch.ones(4, 4), torch.full((4, 4), 3.0)
    g1, out1 = _capture(lambda x: (x * 2).sin() + 1, x1, pool=pool)
    g2, out2 = _capture(lambda x: (x * 2).sin() + 1, x2, pool=pool)
    g1.replay()
    g2.replay()
    assert out1.data_ptr() != out2.data_ptr()
    assert torch.equal(out1, (x1 * 2).sin() + 1)
    assert torch.equal(out2, (x2 * 2).sin() + 1)
    # ... while their temporaries did share memory.
    assert pool.nbytes < 2 * 3 * 4 * 4 * 4


def test_tensors_kept_by_the_model_are_not_moved_into_the_pool() -> None:
    class Keeps(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.hidden = torch.relu(x) * 3  # state a later eager step reads
            return self.hidden.sum(-1)

    model = Keeps()
    x = torch.randn(4, 4)
    pool = backend.new_pool()
    graph, _ = _capture(model, x, pool=pool)
    # Same-sized intermediates: without the escape check they would reuse model.hidden's block.
    other, _ = _capture(lambda y: (y * 5).exp(), torch.randn(4, 4), pool=pool)
    x.copy_(torch.randn(4, 4))
    graph.replay()
    other.replay()  # would clobber model.hidden if it had been placed in shared pool blocks
    assert torch.equal(model.hidden, torch.relu(x) * 3)


def test_work_that_bypasses_the_dispatcher_is_refused() -> None:
    def sneaky(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        out.numpy()[:] = 1.0  # a write no dispatcher sees (as inductor's C++ kernels are)
        return out + x

    graph = backend.new_graph(backend.new_pool())
    # .numpy() is refused outright; a direct data_ptr write has the same effect.
    with pytest.raises(ag.CaptureError, match="numpy"), backend.capture(graph):
        sneaky(torch.randn(3))

    import ctypes

    def sneakier(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        ctypes.memset(out.data_ptr(), 0, out.nbytes)
        return out + x

    graph = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(ag.CaptureError, match="bypasses the PyTorch dispatcher"),
        backend.capture(graph),
    ):
        graph.declare_outputs([sneakier(torch.randn(3))])
    assert not graph.captured


def test_nested_capture_is_refused() -> None:
    g1 = backend.new_graph(backend.new_pool())
    g2 = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(ag.CaptureError, match="nested capture"),
        backend.capture(g1),
        backend.capture(g2),
    ):
        pass


def test_pool_of_another_backend_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"CpuTwinBackend\.new_pool"):
        CpuTwinBackend().new_graph(ag.GraphPool())


def test_replay_runs_without_autograd_even_if_weights_require_grad() -> None:
    lin = torch.nn.Linear(4, 4)  # requires_grad=True parameters
    x = torch.randn(2, 4)
    graph, out = _capture(lin, x)
    x.copy_(torch.randn(2, 4))
    graph.replay()
    assert torch.is_grad_enabled()
    with torch.no_grad():
        assert torch.equal(out, lin(x))


def test_a_returned_buffer_nothing_writes_is_accepted_and_stays_unwritten() -> None:
    # vLLM's piecewise graphs return attention's output buffer, allocated in the piece and
    # written by the attention op that runs between pieces.
    def piece(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, torch.empty_like(x)

    x = torch.randn(3)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        doubled, buffer = piece(x)
        graph.declare_outputs([doubled, buffer])
    assert graph.captured
    buffer.fill_(7.0)  # the caller fills it after the graph, as vLLM's attention does
    x.copy_(torch.randn(3))
    graph.replay()
    assert torch.equal(doubled, x * 2)
    assert torch.equal(buffer, torch.full((3,), 7.0))  # a replay does not touch it


def test_a_returned_buffer_written_behind_the_dispatcher_is_refused() -> None:
    import ctypes

    def sneaky(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        ctypes.memset(out.data_ptr(), 0, out.nbytes)  # as an inductor kernel would
        return out

    graph = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(ag.CaptureError, match="returned by the graph"),
        backend.capture(graph),
    ):
        graph.declare_outputs([sneaky(torch.randn(3))])
