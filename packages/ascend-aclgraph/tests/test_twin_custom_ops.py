"""The cpu twin records inside custom ops with a Python body, as a device graph captures the
kernels such an op launches: host values the body reads (globals, a forward context) are baked
in, and host syncs in the body are refused. C++ kernels stay single recorded ops."""

from __future__ import annotations

from collections.abc import Callable

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.twin.python_body import has_python_body

backend = ag.get_backend("cpu")

# Host state a body reads, as vLLM's attention ops read the forward context.
CONTEXT = {"scale": 2.0}


@torch.library.custom_op("aclgraph_twin_test::scaled", mutates_args=())
def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * CONTEXT["scale"]


@torch.library.custom_op("aclgraph_twin_test::scaled_into", mutates_args=("out",))
def scaled_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(scaled(x) + 1)  # nested: a Python custom op calling another one


# vLLM's direct_register_custom_op path: a schema, then Library.impl with a Python function.
_LIB = torch.library.Library("aclgraph_twin_test", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIB.define("shifted(Tensor x) -> Tensor")  # type: ignore[no-untyped-call]
_LIB.define("python_then_cpp(Tensor x) -> Tensor")  # type: ignore[no-untyped-call]


def _shifted(x: torch.Tensor) -> torch.Tensor:
    return x + CONTEXT["scale"]


_LIB.impl("shifted", _shifted, "CPU")  # type: ignore[no-untyped-call]
# A C++ kernel registered over a Python one for the same key, as ascend_npugraph_ex registers
# its C++ CPU kernels: the C++ kernel is the one that runs, so the op is a single kernel.
_LIB.impl("python_then_cpp", _shifted, "CPU")  # type: ignore[no-untyped-call]
_LIB.m.impl_t_t("python_then_cpp", "CPU")  # a precanned C++ kernel (identity)
# An op defined and implemented in C++ only.
_LIB.m.def_name_t_t("cpp_only", "CPU")


def _read_scale(x: torch.Tensor) -> torch.Tensor:
    return x * x.abs().max().item()  # a host sync inside the body


torch.library.custom_op("aclgraph_twin_test::read_scale", mutates_args=())(_read_scale)


def _to_list(x: torch.Tensor) -> torch.Tensor:
    return x * len([v for v in x.tolist() if v > 0])


torch.library.custom_op("aclgraph_twin_test::to_list", mutates_args=())(_to_list)


@torch.library.custom_op("aclgraph_twin_test::promoted", mutates_args=())
def promoted(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Composites returning host values from dtypes and shapes, or from no tensor at all: inside
    # a custom op's body (autograd keys excluded) they reach the recorder as themselves.
    dtype = torch.promote_types(x.dtype, torch.result_type(y, 2.0))
    assert x.is_floating_point()
    assert torch.is_same_size(x, y)
    return x.to(dtype) * y


def _capture(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[ag.Graph, torch.Tensor]:
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = fn(x)
        graph.declare_outputs([out])
    return graph, out


def _scaled_into(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.aclgraph_twin_test.scaled_into(x, out)
    return out


MODELS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[..., torch.Tensor]]] = {
    # name: (model, expected(x, scale))
    "custom_op": (lambda x: scaled(x) - 1, lambda x, s: x * s - 1),
    "library_impl": (
        lambda x: torch.ops.aclgraph_twin_test.shifted(x) * 3,
        lambda x, s: (x + s) * 3,
    ),
    "mutable_nested": (_scaled_into, lambda x, s: x * s + 1),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_host_values_read_by_a_python_body_are_baked_at_capture(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, expected = MODELS[name]
    monkeypatch.setitem(CONTEXT, "scale", 2.0)
    x = torch.randn(6)
    graph, out = _capture(model, x)
    monkeypatch.setitem(CONTEXT, "scale", 5.0)  # a device graph never sees this
    for _ in range(3):
        x.copy_(torch.randn(6))
        graph.replay()
        assert torch.equal(out, expected(x, 2.0))  # new inputs flow, the captured scale stays
        assert not torch.equal(out, expected(x, 5.0))


def test_the_ops_inside_a_python_body_are_recorded_not_the_op() -> None:
    x = torch.randn(6)
    graph, out = _capture(_scaled_into, x)
    source = graph.native.program.source
    assert "scaled" not in source  # neither custom op: their aten ops are replayed
    assert source.count("_op") >= 3  # mul, add and copy_
    x.copy_(torch.randn(6))
    graph.replay()
    assert torch.equal(out, x * CONTEXT["scale"] + 1)


@pytest.mark.parametrize(
    ("op", "line", "what"),
    [
        (torch.ops.aclgraph_twin_test.read_scale.default, _read_scale, "item"),
        (torch.ops.aclgraph_twin_test.to_list.default, _to_list, "tolist"),
    ],
)
def test_host_syncs_inside_a_python_body_are_refused_at_its_line(
    op: torch._ops.OpOverload, line: Callable[..., object], what: str
) -> None:
    body_line = line.__code__.co_firstlineno + 1
    graph = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(
            ag.CaptureError,
            match=rf"{what}.* at \S*test_twin_custom_ops\.py:{body_line} .*host sync",
        ),
        backend.capture(graph),
    ):
        op(torch.randn(4))
    assert not graph.captured


def test_host_values_from_metadata_inside_a_python_body_are_not_host_syncs() -> None:
    x, y = torch.randn(4), torch.randn(4, dtype=torch.float64)
    graph, out = _capture(lambda x: promoted(x, y), x)
    x.copy_(torch.randn(4))
    graph.replay()
    assert torch.equal(out, x.double() * y)


def test_python_bodies_are_told_apart_from_cpp_kernels() -> None:
    ops = torch.ops.aclgraph_twin_test
    assert has_python_body(ops.scaled.default)
    assert has_python_body(ops.scaled_into.default)
    assert has_python_body(ops.shifted.default)
    assert not has_python_body(ops.python_then_cpp.default)  # C++ registered over Python
    assert not has_python_body(ops.cpp_only.default)
    assert not has_python_body(torch.ops.aten.add.Tensor)
    assert not has_python_body(torch.ops.aten.add.out)


@pytest.mark.parametrize("op_name", ["python_then_cpp", "cpp_only"])
def test_ops_with_a_cpp_kernel_stay_single_recorded_ops(op_name: str) -> None:
    op = getattr(torch.ops.aclgraph_twin_test, op_name).default
    x = torch.randn(4)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        recorder = graph.native.recorder
        op(x * 2)
        recorded = [rec.func for rec in recorder.records]
        graph.declare_outputs([])
    assert recorded == [torch.ops.aten.mul.Tensor, op]


@torch.library.custom_op("aclgraph_twin_test::weighted_row", mutates_args=())
def weighted_row(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1) @ m  # aten.matmul itself: composites reach the recorder here


def test_composite_ops_inside_a_python_body_replay_as_computed(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """``matmul.out`` of a vector and a matrix resizes its output to 2-D and back, warning at
    every call; the twin replays composites through the op itself, not their out= overload."""
    x, m = torch.randn(5), torch.randn(5, 3)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        recorder = graph.native.recorder
        out = weighted_row(x, m)
        assert torch.ops.aten.matmul.default in [rec.func for rec in recorder.records]
        graph.declare_outputs([out])
    for _ in range(2):
        x.copy_(torch.randn(5))
        graph.replay()
        assert out.shape == (3,)
        assert torch.equal(out, torch.softmax(x, -1) @ m)
    assert "resized" not in capfd.readouterr().err
