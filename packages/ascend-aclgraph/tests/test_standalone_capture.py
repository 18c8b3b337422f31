"""ascend_aclgraph.capture(): padding, cut-back, eager fallback, input checks, KV-cache decoding."""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch
from aclgraph_helpers import assert_same
from ascend_aclgraph.backends import GraphBackend
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SIZES = [1, 2, 4, 8]


def _padded(x: torch.Tensor, size: int, value: float = 0) -> torch.Tensor:
    pad = torch.full((size - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


@pytest.fixture(scope="module")
def decoder() -> Qwen3Decoder:
    return Qwen3Decoder(Qwen3Config.small(vocab_size=256))


def _decode_reference(model: Qwen3Decoder, tokens, positions, size):  # type: ignore[no-untyped-def]
    """Eager on the same padded batch the graph runs (what bitwise equality is defined against)."""
    with torch.no_grad():
        return model(_padded(tokens, size), _padded(positions, size))[: tokens.shape[0]]


def test_decoder_step_with_kv_cache_matches_eager(backend: GraphBackend) -> None:
    model = Qwen3Decoder(Qwen3Config.small(vocab_size=256)).to(backend.device)
    tokens = torch.randint(0, 256, (8,), device=backend.device)
    positions = torch.zeros(8, dtype=torch.long, device=backend.device)
    step = ag.capture(model, (tokens, positions), batch_sizes=SIZES, backend=backend)
    model.reset_cache()
    gen = torch.Generator().manual_seed(1)
    for n, pos in [(3, 0), (3, 1), (5, 2), (8, 3), (1, 4)]:
        tok = torch.randint(0, 256, (n,), generator=gen).to(backend.device)
        positions = torch.full((n,), pos, dtype=torch.long, device=backend.device)
        before = model.cache_state()
        size = step.sizes.pad(n)
        expected = _decode_reference(model, tok, positions, size)
        expected_cache = model.cache_state()
        model.load_cache_state(before)
        got = step(tok, positions)
        assert got.shape == (n, 256)
        assert_same(got, expected, backend)
        for a, b in zip(model.cache_state(), expected_cache, strict=True):
            assert_same(a[:n], b[:n], backend)
        # Against eager on the unpadded batch: equal up to GEMM blocking differences.
        model.load_cache_state(before)
        with torch.no_grad():
            unpadded = model(tok, positions)
        torch.testing.assert_close(got, unpadded, rtol=1e-4, atol=1e-5)
        model.load_cache_state(expected_cache)
    assert step.stats.replays == 5
    assert step.stats.captures == len(SIZES)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(min_value=1, max_value=12), seed=st.integers(0, 2**16))
def test_property_graph_equals_eager_below_and_above_max(
    decoder: Qwen3Decoder, n: int, seed: int
) -> None:
    step = _cached_step(decoder)
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 256, (n,), generator=gen)
    positions = torch.randint(0, 60, (n,), generator=gen)
    decoder.reset_cache()
    size = step.sizes.pad(n)
    expected = _decode_reference(decoder, tok, positions, size or n)
    decoder.reset_cache()
    fallbacks = step.stats.eager_fallbacks
    got = step(tok, positions)
    assert torch.equal(got, expected)  # bitwise on the cpu twin
    assert step.stats.eager_fallbacks == fallbacks + (size is None)


_steps: dict[int, ag.CapturedCallable] = {}


def _cached_step(model: Qwen3Decoder) -> ag.CapturedCallable:
    if id(model) not in _steps:
        _steps[id(model)] = ag.capture(
            model,
            (torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)),
            batch_sizes=SIZES,
            backend="cpu",
        )
    return _steps[id(model)]


def test_stats_and_pool_accounting() -> None:
    w = torch.randn(16, 16)
    step = ag.capture(
        lambda x: (x @ w).relu() @ w, (torch.randn(4, 16),), batch_sizes=[4, 1, 2, 2], backend="cpu"
    )
    assert step.sizes == [1, 2, 4]
    assert step.stats.captures == 3
    assert set(step.stats.capture_seconds_by_size) == {1, 2, 4}
    assert step.stats.pool_bytes == step.pool.nbytes > 0
    step(torch.randn(3, 16))
    step(torch.randn(9, 16))
    assert (step.stats.replays, step.stats.eager_fallbacks) == (1, 1)


def test_outputs_not_batched_are_returned_whole_and_tuples_keep_structure() -> None:
    w = torch.randn(8, 8)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x @ w, {"norm": (w * w).sum(0)}

    step = ag.capture(f, (torch.randn(4, 8),), batch_sizes=[4], backend="cpu")
    x = torch.randn(3, 8)
    out, extra = step(x)
    assert out.shape == (3, 8)
    assert torch.equal(out, (_padded(x, 4) @ w)[:3])
    assert torch.equal(extra["norm"], (w * w).sum(0))


def test_clone_outputs_false_returns_views_overwritten_by_next_call() -> None:
    step = ag.capture(
        lambda x: x * 2, (torch.randn(4, 3),), batch_sizes=[4], backend="cpu", clone_outputs=False
    )
    first = step(torch.ones(4, 3))
    step(torch.zeros(4, 3))
    assert torch.equal(first, torch.zeros(4, 3))  # documented: valid until the next call
    cloning = ag.capture(lambda x: x * 2, (torch.randn(4, 3),), batch_sizes=[4], backend="cpu")
    kept = cloning(torch.ones(4, 3))
    cloning(torch.zeros(4, 3))
    assert torch.equal(kept, torch.full((4, 3), 2.0))


def test_state_tensor_arguments_keep_their_address_and_host_values_are_checked() -> None:
    def f(x: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        return x * scale + bias

    bias = torch.randn(3)
    step = ag.capture(
        f,
        (torch.randn(2, 3), bias, 2.0),
        batch_sizes=[2],
        dynamic_dim=[0, None, None],
        backend="cpu",
    )
    x = torch.randn(2, 3)
    bias.copy_(torch.randn(3))  # state is read where it lives: in-place updates are seen
    assert torch.equal(step(x, bias, 2.0), x * 2.0 + bias)
    with pytest.raises(ag.GraphInputError, match="host value baked"):
        step(x, bias, 3.0)
    with pytest.raises(ag.GraphInputError, match=r"shape \(3,\).*must keep their address"):
        step(x, torch.randn(3), 2.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": [0, 2]}, "positive int"),
        ({"batch_sizes": [2, True]}, "positive int"),
        ({"batch_sizes": []}, "must not be empty"),
        ({"batch_sizes": "1,2"}, "list of positive ints"),
        ({"dynamic_dim": 3}, "out of range"),
        ({"dynamic_dim": [0]}, "one entry"),
        ({"backend": "tpu"}, "accepted values: auto, npu, cuda, cpu"),
        ({"on_capture_failure": "ignore"}, "'raise' or 'eager'"),
        ({"num_warmups": -1}, "num_warmups"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"batch_sizes": [1, 2], "backend": "cpu"}
    with pytest.raises(ValueError, match=match):
        ag.capture(lambda x, y: x + y, (torch.randn(2, 3), torch.randn(2, 3)), **{**base, **kwargs})  # type: ignore[arg-type]


def test_call_errors_name_the_problem() -> None:
    step = ag.capture(
        lambda x, y: x + y, (torch.randn(2, 3), torch.randn(2, 3)), batch_sizes=[2], backend="cpu"
    )
    with pytest.raises(ag.GraphInputError, match="disagree on the batch size: 2 vs 1"):
        step(torch.randn(2, 3), torch.randn(1, 3))
    with pytest.raises(ag.GraphInputError, match="non-batch shape"):
        step(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ag.GraphInputError, match="captured with 2 arguments"):
        step(torch.randn(2, 3))


def test_capture_failure_policy() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 4:
            return x * x.max().item()  # host sync, only in the size-4 graph
        return x * 2

    with pytest.raises(ag.CaptureError, match="_local_scalar_dense"):
        ag.capture(f, (torch.randn(4, 2),), batch_sizes=[2, 4], backend="cpu")
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        step = ag.capture(
            f, (torch.randn(4, 2),), batch_sizes=[2, 4], backend="cpu", on_capture_failure="eager"
        )
    assert step.stats.capture_failures == 1
    assert sorted(step.graphs) == [2]
    x = torch.randn(4, 2)
    assert torch.equal(step(x), x * x.max())  # runs eagerly: the right answer, not a broken graph
    assert torch.equal(step(x[:2]), x[:2] * 2)
    assert step.stats.replays == 1


def test_progress_bar_can_be_forced_on(capsys: pytest.CaptureFixture[str]) -> None:
    ag.capture(
        lambda x: x + 1, (torch.randn(2, 2),), batch_sizes=[1, 2], backend="cpu", progress=True
    )
    assert "capturing graphs (cpu)" in capsys.readouterr().err
    ag.capture(
        lambda x: x + 1, (torch.randn(2, 2),), batch_sizes=[1, 2], backend="cpu", progress=False
    )
    assert capsys.readouterr().err == ""
