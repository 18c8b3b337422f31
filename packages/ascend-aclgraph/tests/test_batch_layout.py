"""The one batch-layout rule: batched inputs, pad values, state, cut-back, rows that mix.

Each test here is a defect that made a graph differ from eager (or write state eager does not)
before :mod:`ascend_aclgraph.batch_layout` decided these things once for every runner.
"""

from __future__ import annotations

import logging

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.batch_layout import layout_for_callable, resolve_pad_values
from ascend_aclgraph.row_analysis import Rows
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder

# --- outputs are cut back along the dims that carry the batch, and only those -----------------


def test_flattened_output_is_cut_to_the_real_rows_elements() -> None:
    step = ag.capture(lambda x: (x * 2).reshape(-1), (torch.randn(8, 3),), batch_sizes=[8])
    x = torch.randn(5, 3)
    out = step(x)
    assert out.shape == (15,)  # was 24: dim 0 of the flat output is not "the batch"
    assert torch.equal(out, (x * 2).reshape(-1))


def test_weight_shaped_output_is_returned_whole_even_when_its_dim0_equals_the_size() -> None:
    w = torch.randn(4, 4)
    step = ag.capture(lambda x: (x @ w, w * 2), (torch.randn(4, 4),), batch_sizes=[4])
    x = torch.randn(3, 4)
    out, scaled = step(x)
    assert out.shape == (3, 4)
    assert scaled.shape == (4, 4)  # was cut to (3, 4)
    assert torch.equal(scaled, w * 2)


def test_concatenation_along_the_batch_is_captured_at_exact_sizes_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x * 2])  # padding rows would land between the two halves

    with caplog.at_level(logging.WARNING, logger="ascend_aclgraph"):
        step = ag.capture(f, (torch.randn(8, 2),), batch_sizes=[4, 8])
    assert step.exact_sizes
    assert "aten::cat" in caplog.text
    assert "test_batch_layout.py" in caplog.text
    x = torch.randn(5, 2)
    out = step(x)  # no graph of size 5: eager, never 16 rows of interleaved padding
    assert out.shape == (10, 2)
    assert torch.equal(out, f(x))
    assert (step.stats.replays, step.stats.eager_fallbacks) == (0, 1)
    x4 = torch.randn(4, 2)
    assert torch.equal(step(x4), f(x4))
    assert step.stats.replays == 1


# --- rows that see each other -------------------------------------------------------------------


def _batch_attention(x: torch.Tensor) -> torch.Tensor:
    scores = torch.softmax(x @ x.T, dim=-1)  # a B x B score matrix: every row sees every row
    return scores @ x


def _batch_centering(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("fn", [_batch_attention, _batch_centering], ids=["softmax", "mean"])
def test_functions_mixing_rows_equal_eager_at_every_size(
    fn, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="ascend_aclgraph"):
        step = ag.capture(fn, (torch.randn(8, 4),), batch_sizes=[2, 4, 8])
    # One line naming the op and the user's source line.
    assert "test_batch_layout.py" in caplog.text
    assert "exact batch size" in caplog.text
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 11):
        x = torch.randn(n, 4, generator=gen)
        # Same shape as eager, so bitwise: a graph replays only at its own size.
        assert torch.equal(step(x), fn(x)), n
    assert step.stats.replays == 3  # sizes 2, 4 and 8 replayed, every other size ran eagerly


def test_compiled_function_mixing_rows_runs_other_sizes_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch._dynamo.reset()
    proj = torch.nn.Linear(4, 4)  # a parameter pins the feature dim: only the batch varies

    def f(x: torch.Tensor) -> torch.Tensor:
        return _batch_attention(proj(x))

    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=[2, 4, 8], num_warmups=0)
    compiled = torch.compile(f, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ascend_aclgraph"):
        for n in (3, 4, 5, 4, 8, 8):
            x = torch.randn(n, 4, generator=gen)
            torch.testing.assert_close(compiled(x), f(x), rtol=1e-6, atol=1e-6)
    assert "test_batch_layout.py" in caplog.text
    assert compiler.stats.replays == 2  # sizes 4 and 8 replayed at their own size


def test_row_wise_models_keep_padding() -> None:
    model = Qwen3Decoder(Qwen3Config.small(vocab_size=64))
    layout = layout_for_callable(
        model, (torch.zeros(4, dtype=torch.long),) * 2, [0, 0], Qwen3Decoder.PAD_VALUES
    )
    assert not layout.exact_reasons
    assert layout.outputs is not None
    assert [(o.kind, o.dim) for o in layout.outputs] == [("batched", 0)]
    assert [s.pad_value for s in layout.inputs] == [0, -1]


# --- state: parameters and buffers are never batched; their writes stay the module's ---------


class _CacheWriter(torch.nn.Module):
    """Writes row ``i`` of a state buffer whose dim 0 happens to equal the batch size."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(rows, 3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0])
        cache[rows] = cache[rows] + x
        self.steps.add_(1)
        return cache[rows] * 2


def test_a_buffer_passed_as_an_argument_is_state_even_when_its_dim0_is_the_batch() -> None:
    graph_module, eager_module = _CacheWriter(4), _CacheWriter(4)
    step = ag.capture(
        graph_module, (torch.zeros(4, 3), graph_module.cache), batch_sizes=[4], num_warmups=0
    )
    graph_module.cache.zero_()
    graph_module.steps.zero_()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(4, 3, generator=gen)
        assert torch.equal(step(x, graph_module.cache), eager_module(x, eager_module.cache))
        assert torch.equal(graph_module.cache, eager_module.cache)
        assert torch.equal(graph_module.steps, eager_module.steps)


def test_a_state_tensor_at_a_new_address_is_refused_and_never_written() -> None:
    def f(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        state.add_(1)
        return x + state

    captured_state = torch.zeros(3)
    step = ag.capture(
        f, (torch.zeros(2, 3), captured_state), batch_sizes=[2], dynamic_dim=[0, None]
    )
    before = captured_state.clone()
    other = torch.zeros(3)
    with pytest.raises(ag.GraphInputError, match="must keep their address"):
        step(torch.ones(2, 3), other)
    assert torch.equal(captured_state, before)  # the caller's old tensor was not written
    assert torch.equal(other, torch.zeros(3))
    out = step(torch.ones(2, 3), captured_state)
    assert torch.equal(captured_state, before + 1)
    assert torch.equal(out, torch.ones(2, 3) + captured_state)


def test_a_batched_input_written_in_place_reaches_the_caller() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1

    step = ag.capture(f, (torch.zeros(8, 3),), batch_sizes=[4, 8])
    assert [s.written for s in step.layout.inputs] == [True]
    x = torch.randn(5, 3)
    expected_x = x * 2
    out = step(x)
    assert torch.equal(x, expected_x)  # the caller's rows, written as eagerly
    assert torch.equal(out, expected_x + 1)


# --- padding never writes real state -----------------------------------------------------------


def _touched(positions: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape[0], shape[2], dtype=torch.bool)
    mask[rows, positions] = True
    return mask[:, None, :, None].expand(shape)


@pytest.mark.parametrize("flat", [False, True], ids=["decode", "flat-seq-ids"])
def test_padded_graph_calls_write_exactly_the_kv_slots_eager_writes(flat: bool) -> None:
    cfg = Qwen3Config.small(vocab_size=64, max_batch=8)
    graph_model, eager_model = Qwen3Decoder(cfg), Qwen3Decoder(cfg)
    sample = [torch.zeros(8, dtype=torch.long)] * (3 if flat else 2)
    step = ag.capture(
        graph_model, sample, batch_sizes=[4, 8], pad_value=Qwen3Decoder.PAD_VALUES, num_warmups=0
    )
    graph_model.reset_cache()
    gen = torch.Generator().manual_seed(3)
    ever = [torch.zeros_like(c, dtype=torch.bool) for c in graph_model.cache_state()]
    for call, n in enumerate((3, 5, 1, 6, 2)):
        tokens = torch.randint(0, 64, (n,), generator=gen)
        positions = torch.full((n,), call, dtype=torch.long)
        rows = torch.randperm(8, generator=gen)[:n] if flat else torch.arange(n)
        args = (tokens, positions, rows) if flat else (tokens, positions)
        before = graph_model.cache_state()
        with torch.no_grad():
            got = step(*args)
            want = eager_model(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for old, new, ref, written in zip(
            before, graph_model.cache_state(), eager_model.cache_state(), ever, strict=True
        ):
            touched = _touched(positions, rows, new.shape)
            written |= touched
            # Every slot no real token wrote in this call is byte for byte what it was, and
            # every slot no real token ever wrote is what eager has there.
            assert torch.equal(new[~touched], old[~touched]), f"call {call}: padding wrote"
            assert torch.equal(new[~written], ref[~written])
            # Written slots hold eager's values (GEMMs of 5 and 8 rows round differently).
            torch.testing.assert_close(new[written], ref[written], rtol=1e-5, atol=1e-6)
    assert step.stats.replays == 5


# --- pad values -----------------------------------------------------------------------------


def test_pad_values_by_name_index_or_list_and_clear_errors() -> None:
    names = ["tokens", "positions", "seq_ids"]
    assert resolve_pad_values(-1, names) == [-1, -1, -1]
    assert resolve_pad_values({"positions": -1, 2: -1}, names) == [0, -1, -1]
    assert resolve_pad_values([0, -1, None], names) == [0, -1, None]
    with pytest.raises(ag.GraphInputError, match="'slot_mapping', which is not an input"):
        resolve_pad_values({"slot_mapping": -1}, names)
    with pytest.raises(ag.GraphInputError, match="3 inputs"):
        resolve_pad_values([0, -1], names)
    with pytest.raises(ag.GraphInputError, match="must be a number"):
        resolve_pad_values({"tokens": "x"}, names)


def test_each_input_is_padded_with_its_own_value() -> None:
    seen: list[torch.Tensor] = []

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * 10 + b

    step = ag.capture(f, (torch.zeros(4), torch.zeros(4)), batch_sizes=[4], pad_value={"b": -1})
    out = step(torch.ones(2), torch.ones(2))
    seen.append(step._inputs.args_for(4)[1].clone())
    assert torch.equal(out, torch.full((2,), 11.0))
    assert torch.equal(seen[0], torch.tensor([1.0, 1.0, -1.0, -1.0]))
    assert torch.equal(step._inputs.args_for(4)[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_row_analysis_tracks_flattened_batches() -> None:
    layout = layout_for_callable(
        lambda x: x.reshape(-1, 2).permute(1, 0), (torch.randn(4, 6),), [0], 0
    )
    assert layout.outputs is not None
    (out,) = layout.outputs
    assert (out.kind, out.dim, out.factor) == ("batched", 1, 3)
    assert Rows(1, 3) == Rows(out.dim, out.factor)


def test_compiled_in_place_write_of_a_batched_input_reaches_the_caller() -> None:
    torch._dynamo.reset()
    proj = torch.nn.Linear(3, 3)

    def f(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return proj(x)

    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=[4, 8], num_warmups=0)
    compiled = torch.compile(f, backend=compiler)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in (3, 5, 6, 3):
            x = torch.randn(n, 3, generator=gen)
            torch._dynamo.mark_dynamic(x, 0)
            expected_x = x * 2
            out = compiled(x)
            assert torch.equal(x, expected_x)
            torch.testing.assert_close(out, proj(expected_x), rtol=1e-6, atol=1e-6)
    assert compiler.stats.replays >= 1


def test_compiled_state_tensor_at_a_new_address_runs_eagerly_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch._dynamo.reset()
    proj = torch.nn.Linear(3, 3)

    def f(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        state.add_(1)
        return proj(x) + state

    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=[4], num_warmups=0)
    compiled = torch.compile(f, backend=compiler)

    def batch(n: int) -> torch.Tensor:
        x = torch.randn(n, 3)
        torch._dynamo.mark_dynamic(x, 0)  # only the batch dim varies
        return x

    state = torch.zeros(3)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ascend_aclgraph"):
        compiled(batch(3), state)  # captured with this state
        compiled(batch(3), state)  # replayed
        assert compiler.stats.replays == 1
        assert torch.equal(state, torch.full((3,), 2.0))
        other = torch.zeros(3)
        for _ in range(2):
            x = batch(3)
            expected = proj(x) + other + 1
            torch.testing.assert_close(compiled(x, other), expected)
        assert torch.equal(other, torch.full((3,), 2.0))  # written, as eagerly
        assert torch.equal(state, torch.full((3,), 2.0))  # the captured one left alone
    assert caplog.text.count("must keep their address") == 1


def test_without_dynamos_module_guards_a_replaced_parameter_still_runs_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PyTorch's guard_filter_fn may drop the guards on module attributes (the docs show it):
    the runner's own address check still keeps a replay off a replaced parameter."""
    torch._dynamo.reset()
    model = torch.nn.Linear(5, 2)
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=[4], num_warmups=0)
    compiled = torch.compile(
        model,
        backend=compiler,
        dynamic=True,
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="ascend_aclgraph"):
        for _ in range(2):  # capture, then replay
            x = torch.randn(3, 5, generator=gen)
            torch.testing.assert_close(compiled(x), model(x))
        assert compiler.stats.replays == 1
        model.weight = torch.nn.Parameter(torch.randn(2, 5, generator=gen))
        for _ in range(2):
            x = torch.randn(3, 5, generator=gen)
            torch.testing.assert_close(compiled(x), x @ model.weight.T + model.bias)
        assert compiler.stats.replays == 1  # the captured weight is not the model's any more
    assert caplog.text.count("must keep their address") == 1


def test_padding_rows_are_refilled_after_a_larger_batch_left_real_rows_there() -> None:
    step = ag.capture(lambda a: a + 0, (torch.zeros(8),), batch_sizes=[4, 8], pad_value=-1)
    static = step._inputs.static[0]
    for n, size in [(7, 8), (2, 4), (3, 4), (3, 4), (6, 8), (1, 4)]:
        out = step(torch.arange(1.0, n + 1))
        assert torch.equal(out, torch.arange(1.0, n + 1))
        # What the graph read: the real rows, then pad values up to its size.
        assert torch.equal(static[:n], torch.arange(1.0, n + 1))
        assert torch.equal(static[n:size], torch.full((size - n,), -1.0)), (n, size)
