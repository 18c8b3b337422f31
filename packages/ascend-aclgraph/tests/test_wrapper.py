"""GraphWrapper: warm-ups, capture per descriptor, replay, nesting by runtime mode, failures."""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch
from aclgraph_helpers import assert_same, rand
from ascend_aclgraph.backends import GraphBackend


class Counting(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # Python side effect: runs eagerly, never on replay
        return torch.relu(self.lin(x))


def test_warmup_then_capture_then_replay(backend: GraphBackend) -> None:
    model = Counting(8).to(backend.device)
    wrapper = ag.GraphWrapper(
        model, ag.GraphMode.FULL, backend=backend, options=ag.GraphOptions(num_warmups=2)
    )
    x = rand(backend, 4, 8)
    desc = ag.BatchDescriptor(4)
    with ag.graph_context(ag.GraphMode.FULL, desc):
        for _ in range(5):
            x.copy_(rand(backend, 4, 8))
            assert_same(wrapper(x), model.forward(x), backend)
    # 2 warm-ups + 1 capture ran Python, the 2 replays did not (plus 5 reference calls).
    assert model.calls == 3 + 5
    assert (wrapper.stats.captures, wrapper.stats.replays) == (1, 2)
    assert wrapper.lin is model.lin  # attribute access is forwarded to the runnable


def test_each_descriptor_gets_its_own_graph(backend: GraphBackend) -> None:
    model = Counting(8).to(backend.device)
    wrapper = ag.GraphWrapper(
        model, ag.GraphMode.PIECEWISE, backend=backend, options=ag.GraphOptions(num_warmups=0)
    )
    for n in (4, 2, 4, 2):
        x = rand(backend, n, 8)
        with ag.graph_context(ag.GraphMode.PIECEWISE, ag.BatchDescriptor(n)):
            wrapper(x)
    assert set(wrapper.entries) == {ag.BatchDescriptor(4), ag.BatchDescriptor(2)}
    assert wrapper.stats.captures == 2
    assert wrapper.stats.replays == 2
    assert wrapper.stats.pool_bytes == wrapper.pool.nbytes


def test_other_runtime_modes_pass_through(backend: GraphBackend) -> None:
    model = Counting(8).to(backend.device)
    wrapper = ag.GraphWrapper(
        model, ag.GraphMode.FULL, backend=backend, options=ag.GraphOptions(num_warmups=0)
    )
    x = rand(backend, 4, 8)
    wrapper(x)  # no context: eager
    with ag.graph_context(ag.GraphMode.PIECEWISE, ag.BatchDescriptor(4)):
        wrapper(x)
    with ag.graph_context(ag.GraphMode.NONE):
        wrapper(x)
    assert model.calls == 3
    assert not wrapper.entries


def test_bad_modes_are_rejected() -> None:
    with pytest.raises(ValueError, match="PIECEWISE or FULL"):
        ag.GraphWrapper(lambda x: x, ag.GraphMode.FULL_AND_PIECEWISE, backend="cpu")
    with (
        pytest.raises(ValueError, match="runtime mode"),
        ag.graph_context(ag.GraphMode.FULL_DECODE_ONLY, ag.BatchDescriptor(1)),
    ):
        pass
    with (
        pytest.raises(ValueError, match="needs a BatchDescriptor"),
        ag.graph_context(ag.GraphMode.FULL),
    ):
        pass
    with pytest.raises(ValueError, match="num_warmups"):
        ag.GraphOptions(num_warmups=-1)


def test_failure_policy_raise_and_eager(backend: GraphBackend) -> None:
    def syncing(x: torch.Tensor) -> torch.Tensor:
        return x * x.max().item()

    desc = ag.BatchDescriptor(3)
    raising = ag.GraphWrapper(
        syncing, ag.GraphMode.FULL, backend=backend, options=ag.GraphOptions(num_warmups=0)
    )
    with ag.graph_context(ag.GraphMode.FULL, desc), pytest.raises(ag.CaptureError):
        raising(rand(backend, 3, 2))
    assert raising.entries[desc].graph is None

    eager = ag.GraphWrapper(
        syncing,
        ag.GraphMode.FULL,
        backend=backend,
        options=ag.GraphOptions(num_warmups=0, on_capture_failure="eager"),
    )
    x = rand(backend, 3, 2)
    with ag.graph_context(ag.GraphMode.FULL, desc):
        with pytest.warns(RuntimeWarning, match="it runs eagerly"):
            first = eager(x)
        second = eager(x)
    assert_same(first, x * x.max(), backend)
    assert_same(second, x * x.max(), backend)
    assert eager.stats.capture_failures == 1
    assert eager.stats.captures == 0


def test_weak_ref_outputs_view_the_same_memory(backend: GraphBackend) -> None:
    model = Counting(8).to(backend.device)
    wrapper = ag.GraphWrapper(
        model,
        ag.GraphMode.FULL,
        backend=backend,
        options=ag.GraphOptions(num_warmups=0, weak_ref_outputs=True),
    )
    x = rand(backend, 2, 8)
    with ag.graph_context(ag.GraphMode.FULL, ag.BatchDescriptor(2)):
        strong = wrapper(x)
        weak = wrapper(x)
    assert weak is not strong
    assert weak.data_ptr() == strong.data_ptr()
    x.copy_(rand(backend, 2, 8))
    with ag.graph_context(ag.GraphMode.FULL, ag.BatchDescriptor(2)):
        wrapper(x)
    assert_same(weak, model.forward(x), backend)
