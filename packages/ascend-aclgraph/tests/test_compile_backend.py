"""The ``aclgraph`` torch.compile backend on the cpu twin: every mode equals eager, bitwise."""

from __future__ import annotations

import importlib.metadata
import logging
import tomllib
import warnings
from pathlib import Path

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph import compile_runner
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder

SIZES = [1, 4, 8]
HIDDEN = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


PAD = dict(Qwen3Decoder.PAD_VALUES)


def _pad(x: torch.Tensor, size: int, value: float = 0) -> torch.Tensor:
    return torch.cat([x, x.new_full((size - x.shape[0], *x.shape[1:]), value)])


def _pad_step_args(
    args: tuple[torch.Tensor, ...], size: int, pad: dict[str, int] = PAD
) -> list[torch.Tensor]:
    """Pad (hidden, positions[, seq_ids]) as the runner does with ``pad``."""
    values = [pad.get("tokens", 0), pad.get("positions", 0), pad.get("seq_ids", 0)]
    return [_pad(a, size, v) for a, v in zip(args, values, strict=False)]


def _mixed_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` tokens: a prefill chunk of request 0 (positions 0..), then single-token decodes."""
    prefill = max(1, n // 2)
    seq_ids = torch.tensor([0] * prefill + list(range(1, n - prefill + 1)))
    positions = torch.tensor(
        list(range(prefill)) + [int(p) for p in torch.randint(1, 20, (n - prefill,), generator=gen)]
    )
    return torch.randn(n, HIDDEN, generator=gen), positions, seq_ids


def _decode_batch(
    n: int, gen: torch.Generator, *, seq_ids: bool = False
) -> tuple[torch.Tensor, ...]:
    """One token per request; with ``seq_ids`` in the flat-batch form a mixed batch takes."""
    args = (torch.randn(n, HIDDEN, generator=gen), torch.randint(0, 30, (n,), generator=gen))
    return (*args, torch.arange(n) + 1) if seq_ids else args


def _check_against_padded_eager(
    model: Qwen3Decoder,
    compiled: object,
    args: tuple[torch.Tensor, ...],
    size: int,
    uniform: bool,
    pad: dict[str, int] = PAD,
) -> None:
    n = args[0].shape[0]
    before = model.cache_state()
    with torch.no_grad():
        expected = model(*_pad_step_args(args, size, pad))[:n]
    expected_cache = model.cache_state()
    model.load_cache_state(before)
    with torch.no_grad(), ag.batch_hint(uniform_decode=uniform):
        got = compiled(*args)  # type: ignore[operator]
    assert got.shape == (n, HIDDEN)
    assert torch.equal(got, expected), (got - expected).abs().max()
    for a, b in zip(model.cache_state(), expected_cache, strict=True):
        assert torch.equal(a, b)


# Graphs captured after three rounds over n in (1, 3, 6, 12): sizes 1, 4, 8 (12 is eager).
# Two layers give three pieces per PIECEWISE descriptor.
EXPECTED_GRAPHS = {
    ("FULL", True): 3,
    ("FULL", False): 3,
    ("PIECEWISE", True): 9,
    ("PIECEWISE", False): 9,
    ("FULL_AND_PIECEWISE", True): 3,  # FULL uniform-decode graphs
    ("FULL_AND_PIECEWISE", False): 9,  # PIECEWISE graphs
    ("FULL_DECODE_ONLY", True): 3,
    ("FULL_DECODE_ONLY", False): 0,  # mixed batches run eagerly
}


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform-decode", "mixed"])
@pytest.mark.parametrize("mode", ["FULL", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_modes_equal_eager_on_the_padded_batch(mode: str, uniform: bool) -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    compiler = ag.make_compile_backend(mode=mode, batch_sizes=SIZES, backend="cpu", pad_value=PAD)
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # warm-up, capture, replay per descriptor
        for n in (1, 3, 6, 12):
            args = _mixed_batch(n, gen) if not uniform else _decode_batch(n, gen)
            eager = n > max(SIZES) or (mode == "FULL_DECODE_ONLY" and not uniform)
            size = n if eager else next(s for s in SIZES if s >= n)
            _check_against_padded_eager(model, compiled, args, size, uniform)
    # Dynamo specialises size 1 even with dynamic=True: a static graph of its own, captured at
    # exactly that size; every other size shares the dynamic graph.
    assert sorted(r.static_size or 0 for r in compiler.runners) == [0, 1]
    stats = compiler.stats
    graphs = EXPECTED_GRAPHS[(mode, uniform)]
    assert stats.captures == graphs
    assert stats.replays == graphs  # the third round replays each graph once
    assert stats.eager_fallbacks == 3  # n=12 above the largest size, three times
    for runner in compiler.runners:
        assert (runner.piecewise is not None) == (mode in ("PIECEWISE", "FULL_AND_PIECEWISE"))
        assert (runner.full is not None) == (mode != "PIECEWISE")


def test_full_and_piecewise_nests_full_around_pieces_and_picks_by_hint() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    compiler = ag.make_compile_backend(
        mode="FULL_AND_PIECEWISE", batch_sizes=SIZES, num_warmups=0, pad_value=PAD
    )
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(1)
    # Same signature for both kinds of batch, so one compiled graph serves both.
    _check_against_padded_eager(model, compiled, _decode_batch(3, gen, seq_ids=True), 4, True)
    (runner,) = compiler.runners
    assert runner.full is not None
    assert runner.piecewise is not None
    assert runner.full.runnable is runner.piecewise
    assert runner.full.stats.captures == 1
    assert runner.piecewise.stats.captures == 0
    _check_against_padded_eager(model, compiled, _mixed_batch(3, gen), 4, False)
    assert runner.full.stats.captures == 1
    assert runner.piecewise.stats.captures == 3
    assert set(runner.full.entries) == {ag.BatchDescriptor(4, uniform_decode=True, num_reqs=4)}


def test_graph_break_gives_each_graph_its_own_runner() -> None:
    first, second = Qwen3Decoder(Qwen3Config.small()), Qwen3Decoder(Qwen3Config.small(), seed=1)

    def step(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = first(x, positions)
        torch._dynamo.graph_break()
        return second(h, positions)

    compiler = ag.make_compile_backend(
        mode="PIECEWISE", batch_sizes=SIZES, num_warmups=0, pad_value=PAD
    )
    compiled = torch.compile(step, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(2)
    for n in (3, 3, 7):
        x, positions = _decode_batch(n, gen)
        caches = first.cache_state(), second.cache_state()
        got = compiled(x, positions)
        after = first.cache_state(), second.cache_state()
        first.load_cache_state(caches[0])
        second.load_cache_state(caches[1])
        size = next(s for s in SIZES if s >= n)
        # Each graph pads its own inputs: the second one sees zeros in the padding rows.
        h = first(*_pad_step_args((x, positions), size))[:n]
        expected = second(*_pad_step_args((h, positions), size))[:n]
        assert torch.equal(got, expected)
        for a, b in zip(
            first.cache_state() + second.cache_state(), after[0] + after[1], strict=True
        ):
            assert torch.equal(a[:n], b[:n])
        first.load_cache_state(after[0])
        second.load_cache_state(after[1])
    assert len(compiler.runners) == 2
    assert [r.stats.captures for r in compiler.runners] == [6, 6]  # sizes 4 and 8, 3 pieces
    assert compiler.stats.captures == 12
    assert compiler.stats.replays == 6


def test_recompile_for_a_new_size_shares_the_compiler_pool_and_stats() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES, num_warmups=0, pad_value=PAD)
    compiled = torch.compile(model, backend=compiler)  # dynamic=None: static first, then dynamic
    gen = torch.Generator().manual_seed(3)
    # The first call compiles a graph specialised to n=3, captured at exactly that size. n=5
    # recompiles with a dynamic batch dim; dynamo tries its newest graph first, so from then on
    # every size, 3 included, is padded to a capture size by the dynamic graph's runner.
    for n, size in [(3, 3), (5, 8), (3, 4), (6, 8), (5, 8)]:
        _check_against_padded_eager(model, compiled, _decode_batch(n, gen), size, True)
    static, dynamic = compiler.runners
    assert static.static_size == 3
    assert static.full is not None
    assert set(static.full.entries) == {ag.BatchDescriptor(3)}
    assert dynamic.static_size is None
    assert dynamic.layout is not None
    assert any(spec.role == "size" for spec in dynamic.layout.inputs)
    assert dynamic.full is not None
    assert set(dynamic.full.entries) == {ag.BatchDescriptor(8), ag.BatchDescriptor(4)}
    assert static.pools() == dynamic.pools() == [compiler.pool]
    assert compiler.stats.captures == 3
    assert compiler.stats.replays == 2


def test_changed_float_attribute_runs_eagerly_instead_of_replaying_a_stale_constant() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES, num_warmups=0, pad_value=PAD)
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(4)
    _check_against_padded_eager(model, compiled, _decode_batch(2, gen), 4, True)
    runner = compiler.runners[0]
    assert runner.baked, "dynamic=True lifts every RMSNorm eps to a tensor input"
    model.norm.variance_epsilon = 1e-3
    x, positions = _decode_batch(2, gen)
    before = model.cache_state()
    with torch.no_grad():
        expected = model(x, positions)
    model.load_cache_state(before)
    with torch.no_grad():  # as the first call: no recompile for a grad-mode change
        got = compiled(x, positions)
    assert compiler.runners == [runner]
    # Not bitwise: dynamo hands the graph eps through a float32 tensor, eager uses the float.
    # A replay with the stale eps (1e-6) would be off by ~1e-4 and fail here.
    torch.testing.assert_close(got, expected)
    assert runner.eager_calls == 1
    assert runner.stats.replays == 0


def test_specialized_floats_are_graph_constants_and_a_changed_one_recompiles() -> None:
    """With torch._dynamo.config.specialize_float (docs/graph-modes.md), eps is a constant of
    the graph, not a 0-d tensor input: nothing is baked per call, and a changed value is dynamo's
    guard failure, so a new graph is compiled and captured rather than a stale one replayed."""
    torch._dynamo.reset()
    model = Qwen3Decoder(Qwen3Config.small())
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES, num_warmups=0, pad_value=PAD)
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(4)
    with torch._dynamo.config.patch(specialize_float=True):
        for n in (2, 3):  # capture at 4, then replay
            _check_against_padded_eager(model, compiled, _decode_batch(n, gen), 4, True)
        (runner,) = compiler.runners
        assert not runner.baked, "no float reaches the graph as a tensor"
        assert runner.stats.replays == 1
        model.norm.variance_epsilon = 1e-3
        for n in (2, 3):
            _check_against_padded_eager(model, compiled, _decode_batch(n, gen), 4, True)
    assert len(compiler.runners) == 2, "the new eps is a new graph"
    assert compiler.runners[1].eager_calls == 0
    assert compiler.stats.captures == 2
    assert compiler.stats.replays == 2


def test_floats_passed_as_tensors_bring_a_hint_to_specialize_them_said_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compile_runner, "_hinted_specialize_float", False)
    gen = torch.Generator().manual_seed(4)
    with caplog.at_level(logging.INFO, logger="ascend_aclgraph"):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(specialize_float=True):
            model = Qwen3Decoder(Qwen3Config.small())
            compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES, pad_value=PAD)
            compiled = torch.compile(model, backend=compiler, dynamic=True)
            _check_against_padded_eager(model, compiled, _decode_batch(2, gen), 4, True)
        assert "specialize_float" not in caplog.text  # no float reached the graph
        for _ in range(2):  # two compiles, each with nine floats as tensors
            torch._dynamo.reset()
            model = Qwen3Decoder(Qwen3Config.small())
            compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES, pad_value=PAD)
            compiled = torch.compile(model, backend=compiler, dynamic=True)
            _check_against_padded_eager(model, compiled, _decode_batch(2, gen), 4, True)
            assert compiler.runners[0].baked
    assert caplog.text.count("torch._dynamo.config.specialize_float = True") == 1


def test_non_batch_dynamic_dim_runs_eagerly_with_a_warning() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1)

    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES)
    compiled = torch.compile(f, backend=compiler, dynamic=True)
    with pytest.warns(RuntimeWarning, match="runs eagerly: input 1 is a symbolic size"):
        out = compiled(torch.ones(2, 5))
    assert torch.equal(out, torch.full((2,), 5.0))
    assert compiler.eager_calls == 1
    assert compiler.num_graphs == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"mdoe": "FULL"},
            r"unknown aclgraph option\(s\) 'mdoe'; accepted keys: mode, batch_sizes",
        ),
        ({"mode": "HALF"}, r"'mode'='HALF' is invalid.*accepted values: NONE, PIECEWISE"),
        ({"batch_sizes": [4, 0]}, r"'batch_sizes'.*positive int"),
        ({"num_warmups": -1}, r"'num_warmups'=-1 is invalid.*an int >= 0"),
        ({"splitting_ops": "vllm::unified_attention"}, r"'splitting_ops'.*wrap it in a list"),
        ({"clone_outputs": 1}, r"'clone_outputs'=1 is invalid.*a bool"),
        ({"backend": "tpu"}, r"'backend'='tpu' is invalid"),
    ],
)
def test_bad_options_are_refused_with_the_accepted_values(options: dict, match: str) -> None:
    with pytest.raises(ag.CompileOptionsError, match=match):
        ag.make_compile_backend(**options)


def test_bad_options_through_torch_compile_fail_at_compile_time() -> None:
    compiled = torch.compile(lambda x: x + 1, backend=ag.aclgraph_backend, options={"sizes": [1]})
    with pytest.raises(Exception, match="unknown aclgraph option") as info:
        compiled(torch.ones(2))
    assert isinstance(info.value.__cause__ or info.value, ag.CompileOptionsError) or (
        "CompileOptionsError" in repr(info.value)
    )
    configured = ag.make_compile_backend(mode="FULL")
    compiled = torch.compile(lambda x: x + 1, backend=configured, options={"mode": "FULL"})
    with pytest.raises(Exception, match="configured by make_compile_backend"):
        compiled(torch.ones(2))


def test_options_and_mode_reach_the_registered_backend_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    entry_points = tomllib.loads(pyproject.read_text())["project"]["entry-points"]
    value = entry_points["torch_dynamo_backends"]["aclgraph"]
    assert value == "ascend_aclgraph.compile_backend:aclgraph_backend"
    # What torch does for an installed distribution: find the entry point, load it by name.
    from torch._dynamo.backends import registry

    ep = importlib.metadata.EntryPoint("aclgraph", value, "torch_dynamo_backends")
    assert ep.load() is ag.aclgraph_backend
    monkeypatch.setitem(registry._BACKENDS, "aclgraph", ep)
    try:
        model = Qwen3Decoder(Qwen3Config.small())
        options = {"mode": "PIECEWISE", "batch_sizes": [2, 4], "num_warmups": 0, "pad_value": PAD}
        compiled = torch.compile(model, backend="aclgraph", options=dict(options), dynamic=True)
        gen = torch.Generator().manual_seed(5)
        _check_against_padded_eager(model, compiled, _mixed_batch(3, gen), 4, False)
        assert ag.shared_compiler(options).stats.captures == 3
        torch._dynamo.reset()
        by_mode = torch.compile(model, backend="aclgraph", mode="full", dynamic=True)
        _check_against_padded_eager(model, by_mode, _decode_batch(3, gen), 4, True, pad={})
        assert ag.shared_compiler({"mode": "FULL"}).runners[-1].full is not None
    finally:
        registry._COMPILER_FNS.pop("aclgraph", None)


def test_batch_hint_is_scoped_and_typed() -> None:
    assert ag.current_uniform_decode() is False
    with ag.batch_hint(uniform_decode=True):
        assert ag.current_uniform_decode() is True
        with ag.batch_hint(uniform_decode=False):
            assert ag.current_uniform_decode() is False
        assert ag.current_uniform_decode() is True
    assert ag.current_uniform_decode() is False
    with pytest.raises(TypeError), ag.batch_hint(uniform_decode=1):  # type: ignore[arg-type]
        pass


def test_grad_mode_with_trainable_parameters_runs_eagerly() -> None:
    layer = torch.nn.Linear(4, 4)
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=SIZES)
    compiled = torch.compile(layer, backend=compiler, dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compiled(torch.ones(3, 4))
    out.sum().backward()
    assert layer.weight.grad is not None
    assert compiler.num_graphs == 0
    assert compiler.eager_calls == 1
    with torch.no_grad():
        # Against eager on the same padded batch (4 rows): BLAS rounds 3-row and 4-row matmuls
        # differently on some CPUs, so only equal shapes compare bitwise.
        expected = layer(torch.ones(4, 4))[:3]
        for _ in range(3):
            assert torch.equal(compiled(torch.ones(3, 4)), expected)
        torch.testing.assert_close(compiled(torch.ones(3, 4)), layer(torch.ones(3, 4)))
    assert compiler.num_graphs == 1


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8), requires_grad=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.w + y, y - 1


def test_replays_of_a_captured_size_still_check_every_argument() -> None:
    # After capture, a size replays its graph straight from the runner's per-size plan (the
    # batch size comes from the first batched argument): the others, their shapes and dtypes
    # are still checked, with the same errors as before the capture, and outputs are fresh.
    model = _TwoInputs()
    compiler = ag.make_compile_backend(mode="FULL", batch_sizes=[4], num_warmups=0)
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(3):  # capture, then replays
            x, y = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
            got = compiled(x, y)
            assert all(torch.equal(g, w) for g, w in zip(got, model(x, y), strict=True))
        again = compiled(x, y)
        assert again[0] is not got[0]  # clone_outputs
        assert torch.equal(again[0], got[0])
        runner = compiler.runners[-1]
        assert runner.stats.replays >= 2
        plan = runner._plans[(3, False)]  # the plan of size 3 replays directly
        assert plan is not None
        assert plan.replay is not None
        roles = [s.role for s in runner.inputs.specs]
        batched = [i for i, r in enumerate(roles) if r == "batched"]
        assert len(batched) == 2
        good: list[object] = [None] * len(roles)
        for i, role in enumerate(roles):
            good[i] = 3 if role == "size" else runner.inputs.static[i]
        good[batched[0]], good[batched[1]] = x, y
        bad = list(good)
        bad[batched[1]] = torch.randn(2, 8)
        with pytest.raises(ag.GraphInputError, match="disagree on the batch size: 3 vs 2"):
            runner(*bad)
        bad[batched[1]] = torch.randn(3, 7)
        with pytest.raises(ag.GraphInputError, match=r"non-batch shape \(8,\)"):
            runner(*bad)
        bad[batched[1]] = y.double()
        with pytest.raises(ag.GraphInputError, match=r"torch\.float64"):
            runner(*bad)
        bad[batched[1]] = 1.5
        with pytest.raises(ag.GraphInputError, match="must be a tensor"):
            runner(*bad)
        with pytest.raises(ag.GraphInputError, match="called with"):
            runner(*good[:-1])
        out = runner(*good)
        assert all(torch.equal(g, w) for g, w in zip(out, model(x, y), strict=True))
