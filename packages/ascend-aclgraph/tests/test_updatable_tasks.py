"""Updatable tasks: host-side arguments baked into a graph, rewritten before each replay.

The attention-like op below takes per-request key lengths as a host ``int[]``, like
``npu_fused_infer_attention_score``'s ``actual_seq_lengths_kv``. A replay without an update
attends over the lengths of the captured step (wrong); with the update it is right.
"""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch
from aclgraph_helpers import assert_same, rand
from ascend_aclgraph.backends import GraphBackend


@torch.library.custom_op("aclgraph_test::length_attention", mutates_args=())
def length_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]
) -> torch.Tensor:
    """q: [B, D]; k, v: [B, S, D]; request b attends to its first seq_lens[b] keys."""
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens):  # host loop over host lengths: why it must be "updatable"
        scores = (k[b, :n] @ q[b]) / q.shape[-1] ** 0.5
        out[b] = torch.softmax(scores, -1) @ v[b, :n]
    return out


@length_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("aclgraph_test::length_attention_dev", mutates_args=())
def length_attention_dev(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """Device-buffer variant: lengths in a device tensor, read by the kernel (CUDA's way)."""
    positions = torch.arange(k.shape[1], device=k.device)
    mask = positions[None, :] < seq_lens[:, None]
    scores = torch.einsum("bsd,bd->bs", k, q) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bs,bsd->bd", torch.softmax(scores, -1), v)


@length_attention_dev.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _reference(q, k, v, lens):  # type: ignore[no-untyped-def]
    return length_attention(q.cpu(), k.cpu(), v.cpu(), list(lens))


def _model(q, k, v, lens):  # type: ignore[no-untyped-def]
    h = q * 2.0
    return (
        ag.updatable(torch.ops.aclgraph_test.length_attention.default, h, k, v, seq_lens=lens) + 1
    )


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


def test_updatable_op_must_be_one_operator() -> None:
    backend = ag.get_backend("cpu")
    graph = backend.new_graph(backend.new_pool())
    with pytest.raises(ag.CaptureError, match="single operator"), backend.capture(graph):
        ag.updatable(lambda x: (x + 1) * 2, rand(backend, 3))


def test_device_buffer_update_works_on_every_backend(backend: GraphBackend) -> None:
    q, k, v = rand(backend, 3, 8), rand(backend, 3, 10, 8), rand(backend, 3, 10, 8)
    lens = torch.tensor([2, 3, 4], device=backend.device)
    op = torch.ops.aclgraph_test.length_attention_dev.default
    graph = backend.new_graph(backend.new_pool())
    with backend.capture(graph):
        out = ag.updatable(op, q, k, v, lens)
        graph.declare_outputs([out])
    graph.replay()
    task = graph.tasks[0]
    new = torch.tensor([9, 1, 6], device=backend.device)
    task.update(seq_lens=new)  # a tensor argument: copied into the captured buffer
    graph.replay()
    assert_same(out, op(q, k, v, new), backend)
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
