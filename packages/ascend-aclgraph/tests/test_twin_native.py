"""The cpu twin's native replay loop (twin/native.py): same results as the generated Python
function, bit for bit, and the Python function whenever the loop is unavailable."""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder
from ascend_aclgraph.twin import native
from ascend_aclgraph.twin.recorder import OpRecord
from test_updatable_tasks import _model, _reference

PAD = dict(Qwen3Decoder.PAD_VALUES)

needs_native = pytest.mark.skipif(
    not native.enabled() or native.load() is None,
    reason="native replay disabled or not buildable here",
)


def _capture(cfg: Qwen3Config, batch: int = 4):  # type: ignore[no-untyped-def]
    model = Qwen3Decoder(cfg)
    x = torch.randn(batch, cfg.hidden_size)
    positions = torch.full((batch,), 40)
    step = ag.capture(model, (x, positions), batch_sizes=[batch], backend="cpu", pad_value=PAD)
    return model, step, x, positions


@needs_native
@pytest.mark.parametrize(
    "cfg",
    [
        Qwen3Config.small(),
        Qwen3Config.small(hidden_size=96, num_layers=3, head_dim=24, intermediate_size=192),
    ],
    ids=["h64", "h96"],
)
def test_native_replay_matches_eager_bitwise(cfg: Qwen3Config) -> None:
    model, step, x, positions = _capture(cfg)
    program = step.graphs[4].native.program
    assert program.replay is not program.python_replay  # the native loop is in use
    for seed in range(3):  # new inputs each time: nothing may replay captured values
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(x.shape, generator=gen)
        positions = torch.randint(0, 60, positions.shape, generator=gen)
        out = step(x, positions).clone()
        with torch.no_grad():
            expected = model(x, positions)
        assert torch.equal(out, expected)


@needs_native
def test_native_and_python_replays_write_the_same_bits() -> None:
    cfg = Qwen3Config.small()
    model = Qwen3Decoder(cfg)
    x, positions = torch.randn(4, cfg.hidden_size), torch.full((4,), 40)
    backend = ag.get_backend("cpu")
    graph = backend.new_graph(backend.new_pool())
    with torch.no_grad(), backend.capture(graph):
        out = model(x, positions)
        graph.declare_outputs([out])
    program = graph.native.program
    x.copy_(torch.randn(x.shape))
    out.zero_()  # neither replay can pass on what the other left
    program.python_replay()
    python_out = out.clone()
    out.zero_()
    program.replay()
    assert torch.equal(out, python_out)
    assert python_out.abs().sum() > 0


@needs_native
def test_grad_mode_and_dispatch_keys_are_restored() -> None:
    step = _capture(Qwen3Config.small())[1]
    program = step.graphs[4].native.program
    keys = torch._C._dispatch_tls_local_exclude_set()
    with torch.enable_grad():
        program.replay()
        assert torch.is_grad_enabled()
    assert torch._C._dispatch_tls_local_exclude_set() == keys


@needs_native
def test_updatable_task_segments_run_from_the_native_loop() -> None:
    backend = ag.get_backend("cpu")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((3, 8), (3, 10, 8), (3, 10, 8)))
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = _model(q, k, v, [2, 3, 4])
        graph.declare_outputs([out])
    program = graph.native.program
    assert program.replay is not program.python_replay
    graph.replay()
    assert torch.equal(out, _reference(q * 2.0, k, v, [2, 3, 4]) + 1)
    graph.tasks[0].update(seq_lens=[9, 1, 6])  # recorded again from inside the native loop
    graph.replay()
    assert torch.equal(out, _reference(q * 2.0, k, v, [9, 1, 6]) + 1)
    graph.replay()  # and the new segment replays
    assert torch.equal(out, _reference(q * 2.0, k, v, [9, 1, 6]) + 1)


def test_the_env_var_falls_back_to_the_python_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV_DISABLE, "1")
    model, step, x, positions = _capture(Qwen3Config.small())
    program = step.graphs[4].native.program
    assert program.replay is program.python_replay
    x = torch.randn(x.shape)
    out = step(x, positions)
    with torch.no_grad():
        assert torch.equal(out, model(x, positions))


def test_a_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def broken(**kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.delenv(native.ENV_DISABLE, raising=False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert native.load() is None
    assert native.load() is None  # not built again, not warned again
    _, step, _, _ = _capture(Qwen3Config.small())
    program = step.graphs[4].native.program
    assert program.replay is program.python_replay


@needs_native
def test_a_result_nested_in_a_list_stays_python() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    out = torch.empty(3, 5)

    def record(path: tuple[int, ...]) -> OpRecord:
        # matmul is CompositeImplicitAutograd: replayed as itself, its result copied.
        return OpRecord(
            func=torch.ops.aten.matmul.default,
            args=(a, b),
            kwargs={},
            outputs=[out],
            fresh=[0],
            written=[],
            extra={"result_paths": [path]},
        )

    assert native.native_replay([record((0, 0))]) is None
    run = native.native_replay([record(())])
    assert run is not None
    run()
    assert torch.equal(out, a @ b)


@needs_native
def test_a_number_where_a_tensor_goes_promotes_like_a_scalar() -> None:
    # As a wrapped number 0.1 leaves int + float in float32; as a plain 0-dim float64 tensor
    # it would compute in float64 and round differently (18 of these 300 elements).
    x = torch.arange(16777000, 16777300, dtype=torch.int32) * 7 + 3
    out = torch.empty(300)
    rec = OpRecord(
        func=torch.ops.aten.add.Tensor,
        args=(x, 0.1),
        kwargs={},
        outputs=[out],
        fresh=[0],
        written=[],
        extra={"result_paths": [()]},
    )
    run = native.native_replay([rec])
    assert run is not None
    run()
    assert torch.equal(out, x + 0.1)


@needs_native
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load() -> None:
    # A build killed mid-way leaves cpp_extension's lock file; without the flock that proves
    # nobody holds it, every later load waited on it forever. A fresh process loads with a
    # leftover lock in place, within a timeout.
    import subprocess
    import sys
    from pathlib import Path

    module = native.load()
    build_dir = Path(module.__file__).parent
    stale = build_dir / "lock"
    stale.write_text("")
    code = (
        "from ascend_aclgraph.twin import native\n"
        "assert native.load() is not None\n"
        "print('loaded')\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    finally:
        stale.unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded" in result.stdout
    assert "left by a native replay build that was killed" in result.stderr
