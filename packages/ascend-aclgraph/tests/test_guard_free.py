"""GuardFreeModule: compiled once, then dispatched to dynamo's bytecode without guards."""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder

PAD = dict(Qwen3Decoder.PAD_VALUES)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _pad(x: torch.Tensor, size: int, value: float) -> torch.Tensor:
    return torch.cat([x, x.new_full((size - x.shape[0], *x.shape[1:]), value)])


def test_every_size_equals_eager_on_the_padded_batch_with_one_compile() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    step = ag.GuardFreeModule(
        model, mode="FULL", batch_sizes=[1, 2, 4, 8], num_warmups=0, pad_value=PAD, backend="cpu"
    )
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for n in (4, 4, 3, 1, 8, 5, 2, 3):
                x, pos = torch.randn(n, 64, generator=gen), torch.randint(0, 30, (n,))
                size = next(s for s in (1, 2, 4, 8) if s >= n)
                before = model.cache_state()
                expected = model(_pad(x, size, 0), _pad(pos, size, PAD["positions"]))[:n]
                expected_cache = model.cache_state()
                model.load_cache_state(before)
                assert torch.equal(step(x, pos), expected), n
                for a, b in zip(model.cache_state(), expected_cache, strict=True):
                    assert torch.equal(a, b)
    finally:
        step.close()
    # One compile (the batch dim dynamic from the start), one runner, every later call replayed.
    assert len(step.compiled_codes) == 1
    assert len(step.compiler.runners) == 1
    assert step.compiler.stats.captures == 4
    assert step.compiler.stats.replays == 4


def test_later_calls_do_not_enter_dynamo() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    step = ag.GuardFreeModule(model, mode="FULL", batch_sizes=[4], num_warmups=0, backend="cpu")
    x, pos = torch.randn(4, 64), torch.arange(4)
    try:
        with torch.no_grad():
            step(x, pos)
            frames = torch._dynamo.utils.counters["frames"]["total"]
            model.norm.variance_epsilon = 1e-6  # same value: nothing a guard would see anyway
            for _ in range(3):
                step(x, pos)
            assert torch._dynamo.utils.counters["frames"]["total"] == frames
    finally:
        step.close()
    assert step.compiler.stats.replays == 3


def test_only_the_wrapped_instance_records_bytecode() -> None:
    first, second = Qwen3Decoder(Qwen3Config.small()), Qwen3Decoder(Qwen3Config.small(), seed=1)
    step = ag.GuardFreeModule(first, mode="FULL", batch_sizes=[4], num_warmups=0, backend="cpu")
    other = torch.compile(second, backend="eager")
    x, pos = torch.randn(4, 64), torch.arange(4)
    try:
        with torch.no_grad():
            other(x, pos)  # same class, same code object: not ours
            assert step.compiled_codes == []
            step(x, pos)
            assert len(step.compiled_codes) == 1
            # While dispatching, the class's forward runs compiled code; afterwards its source.
            assert type(first).forward.__code__ is step.original_code
            torch.testing.assert_close(second(x, pos), other(x, pos))
    finally:
        step.close()


def test_a_batched_input_with_another_feature_size_is_an_error_not_a_wrong_answer() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    step = ag.GuardFreeModule(model, mode="FULL", batch_sizes=[4], num_warmups=0, backend="cpu")
    try:
        with torch.no_grad():
            step(torch.randn(4, 64), torch.arange(4))
            with pytest.raises(ag.GraphInputError, match="non-batch shape"):
                step(torch.randn(4, 32), torch.arange(4))
    finally:
        step.close()


def test_forward_must_be_a_python_function() -> None:
    with pytest.raises(TypeError, match="plain Python function"):
        ag.GuardFreeModule(_Odd())


class _Odd(torch.nn.Module):
    forward = staticmethod(torch.relu)  # type: ignore[assignment]
