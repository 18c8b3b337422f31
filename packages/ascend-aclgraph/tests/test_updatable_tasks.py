"""Updatable tasks: host-side arguments baked into a graph, rewritten before each replay.

The attention-like op below takes per-request key lengths as a host ``int[]``, like
``npu_fused_infer_attention_score``'s ``actual_seq_lengths_kv``. A replay without an update
attends over the lengths of the captured step (wrong); with the update it is right.

Every op used as a task writes a preallocated output (a mutable schema), as an NPU task update
requires (it re-issues the op into the captured buffer); the twin refuses functional ones.
"""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch
from aclgraph_helpers import assert_same, rand
from ascend_aclgraph.backends import GraphBackend


@torch.library.custom_op("aclgraph_test::length_attention_out", mutates_args=("out",))
def length_attention_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], out: torch.Tensor
) -> None:
    """q, out: [B, D]; k, v: [B, S, D]; request b attends to its first seq_lens[b] keys."""
    for b, n in enumerate(seq_lens):  # host loop over host lengths: why it must be "updatable"
        scores = (k[b, :n] @ q[b]) / q.shape[-1] ** 0.5
        out[b] = torch.softmax(scores, -1) @ v[b, :n]


@torch.library.custom_op("aclgraph_test::length_attention_dev_out", mutates_args=("out",))
def length_attention_dev_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor
) -> None:
    """Device-buffer variant: lengths in a device tensor, read by the kernel (CUDA's way)."""
    positions = torch.arange(k.shape[1], device=k.device)
    mask = positions[None, :] < seq_lens[:, None]
    scores = torch.einsum("bsd,bd->bs", k, q) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    out.copy_(torch.einsum("bs,bsd->bd", torch.softmax(scores, -1), v))


@torch.library.custom_op("aclgraph_test::length_attention", mutates_args=())
def length_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]
) -> torch.Tensor:
    """The functional form: fine in eager code, refused as an updatable task."""
    out = torch.empty_like(q)
    length_attention_out(q, k, v, seq_lens, out)
    return out


@length_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    return torch.empty_like(q)


ATTENTION = torch.ops.aclgraph_test.length_attention_out.default


def _reference(q, k, v, lens):  # type: ignore[no-untyped-def]
    return length_attention(q.cpu(), k.cpu(), v.cpu(), list(lens))


def _model(q, k, v, lens):  # type: ignore[no-untyped-def]
    h = q * 2.0
    out = torch.empty_like(h)
    ag.updatable(ATTENTION, h, k, v, seq_lens=lens, out=out)
    return out + 1


def test_host_lengths_need_the_update_on_the_twin() -> None:
    backend = ag.get_backend("cpu")
    q, k, v = rand(backend, 3, 8), rand(backend, 3, 10, 8), rand(backend, 3, 10, 8)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = _model(q, k, v, [2, 3, 4])
        graph.declare_outputs([out])
    assert len(graph.tasks) == 1

    new_lens = [9, 1, 6]
    graph.replay()  # no update: the captured lengths [2, 3, 4] are still baked in
    stale = out.clone()
    expected = _reference(q * 2.0, k, v, new_lens) + 1
    assert not torch.allclose(stale, expected)
    assert torch.equal(stale, _reference(q * 2.0, k, v, [2, 3, 4]) + 1)

    graph.tasks[0].update(seq_lens=new_lens)
    graph.replay()
    assert torch.equal(out, expected)
    assert graph.tasks[0].current("seq_lens") == new_lens


def test_a_python_custom_op_task_is_a_segment_of_its_recorded_ops() -> None:
    """A task's Python body is recorded like any Python custom op's (its ops, not the op): the
    graph calls the task's segment, and an update records the body again into a new one."""
    backend = ag.get_backend("cpu")
    q, k, v = rand(backend, 2, 8), rand(backend, 2, 6, 8), rand(backend, 2, 6, 8)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = torch.empty_like(q)
        ag.updatable(ATTENTION, q, k, v, seq_lens=[1, 1], out=out)
        graph.declare_outputs([out])
    segment = graph.tasks[0].handle
    source = graph.native.program.source
    assert source.count(".run()") == 1, source  # the graph calls the task's segment
    assert graph.native.program.num_replayed == len(segment.records)  # all of them its ops
    ops = {str(rec.func) for rec in segment.records}
    assert "aten.softmax.int" in ops, ops  # the body's ops, recorded at capture
    assert str(ATTENTION) not in ops

    def shapes() -> list[tuple[int, ...]]:
        return [tuple(t.shape) for rec in segment.records for t in rec.read_tensors()]

    captured = shapes()
    for lens in ([6, 2], [3, 5], [2, 6]):
        graph.tasks[0].update(seq_lens=lens)
        q.copy_(rand(backend, 2, 8))
        graph.replay()
        assert torch.equal(out, _reference(q, k, v, lens))
        assert graph.tasks[0].handle is segment
        assert shapes() != captured  # recorded again, reading the new lengths of k and v
    q.copy_(rand(backend, 2, 8))
    graph.replay()  # no update: the last recorded segment replays
    assert torch.equal(out, _reference(q, k, v, [2, 6]))


# Host state a task's body reads, as vLLM's attention ops read the forward context, and how
# many times the body ran.
FORWARD_CONTEXT = {"scale": 1.0}
BODY_RUNS = [0]


@torch.library.custom_op("aclgraph_test::context_attention_out", mutates_args=("out",))
def context_attention_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], out: torch.Tensor
) -> None:
    """length_attention_out with a softmax scale read from a global, not an argument."""
    BODY_RUNS[0] += 1
    scale = FORWARD_CONTEXT["scale"]
    for b, n in enumerate(seq_lens):
        out[b] = torch.softmax((k[b, :n] @ q[b]) * scale, -1) @ v[b, :n]


def _context_reference(q, k, v, lens, scale):  # type: ignore[no-untyped-def]
    out = torch.empty_like(q)
    for b, n in enumerate(lens):
        out[b] = torch.softmax((k[b, :n] @ q[b]) * scale, -1) @ v[b, :n]
    return out


def test_a_python_task_bakes_what_its_body_reads_until_the_next_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the NPU a task replays with what the capture, or its last update, computed on the
    host; only an update runs the op's Python body again. So a global the body reads is baked
    between updates, and an update sees it as it is then."""
    backend = ag.get_backend("cpu")
    op = torch.ops.aclgraph_test.context_attention_out.default
    q, k, v = rand(backend, 2, 8), rand(backend, 2, 6, 8), rand(backend, 2, 6, 8)
    monkeypatch.setitem(FORWARD_CONTEXT, "scale", 0.5)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = torch.empty_like(q)
        ag.updatable(op, q * 1, k, v, seq_lens=[2, 3], out=out)
        graph.declare_outputs([out])
    runs = BODY_RUNS[0]

    monkeypatch.setitem(FORWARD_CONTEXT, "scale", 3.0)
    for _ in range(2):
        q.copy_(rand(backend, 2, 8))
        graph.replay()  # no update: the captured lengths and scale stand
        assert torch.equal(out, _context_reference(q, k, v, [2, 3], 0.5))
    assert BODY_RUNS[0] == runs, "a replay without an update ran the task's Python body"

    graph.replay(graph.updates_for({"seq_lens": [5, 1]}))
    assert torch.equal(out, _context_reference(q, k, v, [5, 1], 3.0))
    assert BODY_RUNS[0] == runs + 1

    monkeypatch.setitem(FORWARD_CONTEXT, "scale", 7.0)
    q.copy_(rand(backend, 2, 8))
    graph.replay()  # the update's lengths and scale stand
    assert torch.equal(out, _context_reference(q, k, v, [5, 1], 3.0))
    assert BODY_RUNS[0] == runs + 1


@torch.library.custom_op("aclgraph_test::prefix_sums_out", mutates_args=("out",))
def prefix_sums_out(x: torch.Tensor, lens: list[int], out: torch.Tensor) -> torch.Tensor:
    """Writes each row's sum over its first lens[b] entries; also returns a new tensor."""
    for b, n in enumerate(lens):
        out[b] = x[b, :n].sum()
    return out * 2


def test_a_task_that_also_returns_a_new_tensor_updates_it_too() -> None:
    backend = ag.get_backend("cpu")
    x = rand(backend, 2, 5)
    op = torch.ops.aclgraph_test.prefix_sums_out.default
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = torch.empty(2)
        doubled = ag.updatable(op, x, [1, 1], out)
        graph.declare_outputs([out, doubled])
    graph.tasks[0].update(lens=[5, 3])
    graph.replay()
    expected = torch.stack([x[0].sum(), x[1, :3].sum()])
    assert torch.equal(out, expected)
    assert torch.equal(doubled, expected * 2)


@torch.library.custom_op("aclgraph_test::window_out", mutates_args=("out",))
def window_out(x: torch.Tensor, lens: list[int], width: int, out: torch.Tensor) -> torch.Tensor:
    """Writes each row's sum over its first lens[b] entries; returns x[:, :width] doubled."""
    for b, n in enumerate(lens):
        out[b] = x[b, :n].sum()
    window = x[:, :width]
    # Other ops for long lengths, so the result is a storage of other ops than at capture.
    return window * 2 if max(lens) < 3 else torch.add(window, window).neg().neg()


def _window_graph(x: torch.Tensor) -> tuple[ag.Graph, torch.Tensor, torch.Tensor]:
    backend = ag.get_backend("cpu")
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = torch.empty(2)
        doubled = ag.updatable(torch.ops.aclgraph_test.window_out.default, x, [1, 2], 2, out)
        graph.declare_outputs([out, doubled])
    return graph, out, doubled


def test_an_update_computing_the_result_with_other_ops_writes_the_captured_result() -> None:
    x = rand(ag.get_backend("cpu"), 2, 5)
    graph, out, doubled = _window_graph(x)
    where = doubled.data_ptr()
    graph.replay(graph.updates_for({"lens": [4, 3]}))
    assert torch.equal(out, torch.stack([x[0, :4].sum(), x[1, :3].sum()]))
    assert doubled.data_ptr() == where
    assert torch.equal(doubled, x[:, :2] * 2)
    x.copy_(rand(ag.get_backend("cpu"), 2, 5))
    graph.replay()
    assert torch.equal(doubled, x[:, :2] * 2)


def test_an_update_whose_result_changes_shape_is_refused_and_the_task_keeps_its_arguments() -> None:
    """The rest of the graph reads the result the capture returned; an update cannot give it
    another shape (on the NPU a task update re-issues the op into the captured buffers)."""
    x = rand(ag.get_backend("cpu"), 2, 5)
    graph, out, doubled = _window_graph(x)
    task = graph.tasks[0]
    task.update(lens=[3, 3], width=3)
    with pytest.raises(
        ag.TaskUpdateError,
        match=r"window_out.* refused: .*result 0 .*\(2, 3\).*captured .*\(2, 2\)",
    ):
        graph.replay()
    assert task.current("width") == 2
    assert task.current("lens") == [1, 2]
    assert not task.pending
    x.copy_(rand(ag.get_backend("cpu"), 2, 5))
    graph.replay()  # the segment recorded last (here: at capture) still stands
    assert torch.equal(out, torch.stack([x[0, :1].sum(), x[1, :2].sum()]))
    assert torch.equal(doubled, x[:, :2] * 2)


def _sync_when_long(x: torch.Tensor, lens: list[int], out: torch.Tensor) -> None:
    if max(lens) > 4:
        x.sum().item()  # a host sync, on this path only
    out.copy_(x[:, : max(lens)].sum(-1))


torch.library.custom_op("aclgraph_test::sync_when_long", mutates_args=("out",))(_sync_when_long)


def test_a_host_sync_in_a_task_body_is_refused_when_an_update_reaches_it() -> None:
    x = rand(ag.get_backend("cpu"), 2, 6)
    backend = ag.get_backend("cpu")
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = torch.empty(2)
        ag.updatable(torch.ops.aclgraph_test.sync_when_long.default, x, [1, 2], out)
        graph.declare_outputs([out])
    line = _sync_when_long.__code__.co_firstlineno + 2
    with pytest.raises(
        ag.TaskUpdateError,
        match=rf"refused: .*test_updatable_tasks\.py:{line} .*host sync",
    ):
        graph.replay(graph.updates_for({"lens": [5, 1]}))
    graph.replay(graph.updates_for({"lens": [3, 1]}))
    assert torch.equal(out, x[:, :3].sum(-1))


def test_update_validates_names_lengths_and_kinds() -> None:
    backend = ag.get_backend("cpu")
    q, k, v = rand(backend, 2, 4), rand(backend, 2, 5, 4), rand(backend, 2, 5, 4)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        graph.declare_outputs([_model(q, k, v, [1, 2])])
    task = graph.tasks[0]
    with pytest.raises(ag.TaskUpdateError, match=r"no argument 'lens'.*seq_lens"):
        task.update(lens=[1, 1])
    with pytest.raises(ag.TaskUpdateError, match="keep that length"):
        task.update(seq_lens=[1, 2, 3])
    with pytest.raises(ag.TaskUpdateError, match="host value"):
        task.update(seq_lens=torch.tensor([1, 2]))


def test_a_functional_op_is_refused_as_a_task_as_on_the_npu() -> None:
    """A task update re-issues the op into the captured buffers: an op that allocates its
    output cannot be one, so the twin refuses it with the npu backend's rule."""
    backend = ag.get_backend("cpu")
    q, k, v = rand(backend, 2, 4), rand(backend, 2, 5, 4), rand(backend, 2, 5, 4)
    functional = torch.ops.aclgraph_test.length_attention.default
    for op, got in ((functional, "length_attention"), (lambda x: (x + 1) * 2, "no schema")):

        def model(op=op):  # type: ignore[no-untyped-def]
            return ag.updatable(op, q, k, v, seq_lens=[1, 2])

        line = model.__code__.co_firstlineno + 1
        graph = backend.new_graph(backend.new_pool())
        with (
            pytest.raises(
                ag.CaptureError,
                match=rf"test_updatable_tasks\.py:{line} .*must write preallocated outputs.*"
                rf"\.out overload.*mutable schema.*{got}",
            ),
            backend.capture(graph),
        ):
            model()
        assert not graph.captured


_LIB = torch.library.Library("aclgraph_test", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIB.define("scale_into(Tensor x, float s, Tensor(a!) out) -> ()")  # type: ignore[no-untyped-call]


def _scale_into(x: torch.Tensor, s: float, out: torch.Tensor) -> None:
    out.copy_(x * s)


# A composite: it decomposes before any dispatch mode sees it, so no single task exists.
_LIB.impl("scale_into", _scale_into, "CompositeImplicitAutograd")  # type: ignore[no-untyped-call]


def test_updatable_op_must_reach_the_dispatcher_as_one_operator() -> None:
    backend = ag.get_backend("cpu")
    x = rand(backend, 3)
    graph = backend.new_graph(backend.new_pool())
    with (
        pytest.raises(ag.CaptureError, match=r"single operator.*decomposes"),
        backend.capture(graph),
    ):
        ag.updatable(torch.ops.aclgraph_test.scale_into.default, x, 2.0, torch.empty(3))


def _lengths_from_tensor_out(x: torch.Tensor, lens: torch.Tensor, out: torch.Tensor) -> None:
    n = int(lens.max())  # a host sync: the kernel needs the lengths on the host
    out.copy_(x[:, :n].sum(-1))


torch.library.custom_op("aclgraph_test::lengths_from_tensor_out", mutates_args=("out",))(
    _lengths_from_tensor_out
)


def test_the_body_of_an_updatable_python_op_is_checked_at_capture() -> None:
    backend = ag.get_backend("cpu")
    x, lens = rand(backend, 2, 6), torch.tensor([3, 5])
    graph = backend.new_graph(backend.new_pool())
    line = _lengths_from_tensor_out.__code__.co_firstlineno + 1
    with (
        pytest.raises(ag.CaptureError, match=rf"test_updatable_tasks\.py:{line} .*host sync"),
        backend.capture(graph),
    ):
        ag.updatable(
            torch.ops.aclgraph_test.lengths_from_tensor_out.default, x, lens, torch.empty(2)
        )


def test_device_buffer_update_works_on_every_backend(backend: GraphBackend) -> None:
    q, k, v = rand(backend, 3, 8), rand(backend, 3, 10, 8), rand(backend, 3, 10, 8)
    lens = torch.tensor([2, 3, 4], device=backend.device)
    op = torch.ops.aclgraph_test.length_attention_dev_out.default
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = torch.empty_like(q)
        ag.updatable(op, q, k, v, lens, out)
        graph.declare_outputs([out])
    graph.replay()
    task = graph.tasks[0]
    new = torch.tensor([9, 1, 6], device=backend.device)
    task.update(seq_lens=new)  # a tensor argument: copied into the captured buffer
    graph.replay()
    expected = torch.empty_like(q)
    op(q, k, v, new, expected)
    assert_same(out, expected, backend)
    assert torch.allclose(out.cpu(), _reference(q, k, v, [9, 1, 6]), atol=1e-5)


def test_host_update_on_cuda_explains_the_device_buffer_way(backend: GraphBackend) -> None:
    if backend.name != "cuda":
        pytest.skip("checks the cuda backend's refusal of host-side task updates")
    q, k, v = rand(backend, 2, 4), rand(backend, 2, 5, 4), rand(backend, 2, 5, 4)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        graph.declare_outputs([_model(q, k, v, [1, 2])])
    with pytest.raises(ag.TaskUpdateError, match="device tensor"):
        graph.tasks[0].update(seq_lens=[2, 2])


def test_capture_api_task_args_pad_and_match_eager() -> None:
    backend = ag.get_backend("cpu")
    k, v = rand(backend, 8, 10, 8), rand(backend, 8, 10, 8)

    def step(q: torch.Tensor) -> torch.Tensor:
        return _model(q, k[: q.shape[0]], v[: q.shape[0]], [1] * q.shape[0])

    captured = ag.capture(step, (rand(backend, 4, 8),), batch_sizes=[2, 4], backend="cpu")
    q = rand(backend, 3, 8)
    lens = [5, 2, 7]
    got = captured(q, task_args={"seq_lens": lens})
    expected = _reference(q * 2.0, k[:3], v[:3], lens) + 1
    assert torch.equal(got, expected)
    # Above the largest size the batch runs eagerly; the overrides apply there too.
    q6 = rand(backend, 6, 8)
    lens6 = [1, 2, 3, 4, 5, 6]
    assert torch.equal(
        captured(q6, task_args={"seq_lens": lens6}), _reference(q6 * 2.0, k[:6], v[:6], lens6) + 1
    )
    assert captured.stats.eager_fallbacks == 1


@torch.library.custom_op("aclgraph_test::planned_scale_out", mutates_args=("out",))
def _planned_scale_out(x: torch.Tensor, plan: torch.Tensor, out: torch.Tensor) -> None:
    # ``plan`` is host-side launch data whose length varies per step (like vLLM's CPU attention
    # scheduler metadata): the kernel reads its sum as the scale.
    out.copy_(x * plan.sum())


ag.declare_host_tensor_arguments(torch.ops.aclgraph_test.planned_scale_out.default, "plan")


def test_a_host_tensor_argument_is_replaced_whatever_its_shape() -> None:
    backend = ag.get_backend("cpu")
    op = torch.ops.aclgraph_test.planned_scale_out.default
    x, out = torch.randn(4), torch.empty(4)
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        ag.updatable(op, x, torch.tensor([1.0]), out)
    (task,) = graph.tasks
    new_plan = torch.tensor([1.0, 2.0, 3.0])  # another length: a device buffer could not take it
    graph.replay({task: {"plan": new_plan}})
    assert torch.equal(out, x * 6.0)
    graph.replay()  # the task keeps its last plan
    assert torch.equal(out, x * 6.0)
    with pytest.raises(ag.TaskUpdateError, match="update it with a tensor"):
        task.update(plan=3)


def test_declaring_an_unknown_host_argument_names_the_real_ones() -> None:
    with pytest.raises(ag.TaskUpdateError, match="x, plan, out"):
        ag.declare_host_tensor_arguments(
            torch.ops.aclgraph_test.planned_scale_out.default, "scheduler_metadata"
        )


def _clamp_graph(direct: bool):  # type: ignore[no-untyped-def]
    backend = ag.get_backend("cpu")
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        y = x * 2.0
        out = torch.empty_like(y)
        ag.updatable(torch.ops.aten.clamp.out, y, -0.5, 0.5, out=out)
        z = out + 1.0
        graph.declare_outputs([z])
    segment = graph.tasks[0].handle
    if not direct:
        segment._direct = None  # force the recorder path, for comparison
    return graph, x, z, segment


def test_a_cpp_kernel_task_updates_directly_as_the_recorder_would() -> None:
    # A task whose segment is its C++ kernel writing its out= argument: the update runs the op
    # and swaps the arguments into its record, without re-recording (vLLM's attention case).
    graph, x, z, segment = _clamp_graph(direct=True)
    assert segment._direct is not None
    assert segment._direct.func == torch.ops.aten.clamp.out
    slow_graph, _, slow_z, slow_segment = _clamp_graph(direct=False)
    assert slow_segment._direct is None
    for low, high in ((-0.5, 0.5), (-1.0, 0.25), (0.0, 3.0), (-2.0, -1.0)):
        for g in (graph, slow_graph):
            g.tasks[0].update(min=low, max=high)
            g.replay()
        expected = torch.clamp(x * 2.0, low, high) + 1.0
        assert torch.equal(z, expected)
        assert torch.equal(slow_z, expected)
        # Replays without an update keep the last update's arguments.
        graph.replay()
        assert torch.equal(z, expected)
        assert graph.tasks[0].current("min") == low
    assert segment._direct.args[1:] == (-2.0, -1.0)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "recorder"])
def test_an_update_that_resizes_a_written_buffer_is_refused_and_the_last_one_stands(
    direct: bool,
) -> None:
    # arange.out resizes its out= buffer to the range's length: the graph's later ops read the
    # captured buffer, so an update that changes that length must be refused, on both paths.
    backend = ag.get_backend("cpu")
    graph = backend.new_graph(backend.new_pool())
    buf = torch.empty(64)
    with backend.capture(graph):
        ag.updatable(torch.ops.aten.arange.start_out, 0, 64, 1, out=buf)
        z = buf * 2.0
        graph.declare_outputs([z])
    segment = graph.tasks[0].handle
    assert segment._direct is not None
    if not direct:
        segment._direct = None
    graph.tasks[0].update(start=1, end=65)
    graph.replay()
    expected = torch.arange(1.0, 65.0) * 2.0
    assert torch.equal(z, expected)
    graph.tasks[0].update(end=32)  # 31 values from start=1
    with pytest.raises(
        ag.TaskUpdateError, match=r"written tensor 0 of the op moved or changed shape .*\(31,\)"
    ):
        graph.replay()
    graph.replay()  # the last accepted update's arguments
    assert torch.equal(z, expected)
    assert graph.tasks[0].current("end") == 65
