"""Splitting FX graphs at splitting ops, and PIECEWISE capture of the pieces (cpu twin)."""

from __future__ import annotations

import operator

import ascend_aclgraph as ag
import pytest
import torch
import torch.nn.functional as F
from ascend_aclgraph.splitting import SplittingOps, split_graph
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder
from torch.fx.experimental.proxy_tensor import make_fx

CALLS = {"attn": 0}


@torch.library.custom_op("aclgraph_test::attn", mutates_args=())
def _attn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    CALLS["attn"] += 1
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ k


@_attn.register_fake
def _attn_fake(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _toy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ w)
    h = torch.ops.aclgraph_test.attn(h, h) + 1
    h = torch.tanh(h @ w)
    h = torch.ops.aclgraph_test.attn(h, x)
    return h * 2


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _toy_graph() -> torch.fx.GraphModule:
    return make_fx(_toy)(torch.randn(4, 8), torch.randn(8, 8))


def _targets(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_split_puts_each_splitting_op_alone_between_pieces() -> None:
    gm = _toy_graph()
    split, items = split_graph(gm, ["aclgraph_test::attn"])
    assert [i.is_splitting for i in items] == [False, True, False, True, False]
    for item in items:
        has_attn = torch.ops.aclgraph_test.attn.default in _targets(item.module)
        assert has_attn == item.is_splitting
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    assert torch.equal(split(x, w), _toy(x, w))


@pytest.mark.parametrize(
    "spec",
    [
        "aclgraph_test::attn",
        "aclgraph_test::attn.default",
        torch.ops.aclgraph_test.attn,
        torch.ops.aclgraph_test.attn.default,
    ],
    ids=["name", "overload-name", "packet", "overload"],
)
def test_splitting_op_spec_forms_match(spec: object) -> None:
    _, items = split_graph(_toy_graph(), [spec])  # type: ignore[list-item]
    assert sum(i.is_splitting for i in items) == 2


def test_no_match_leaves_one_piece_and_bad_specs_are_refused() -> None:
    _, items = split_graph(_toy_graph(), ["aclgraph_test::other", "aten::mm.out"])
    assert [i.is_splitting for i in items] == [False]
    with pytest.raises(ValueError, match="importable dotted path"):
        SplittingOps(["no_such_module.attention"])
    with pytest.raises(ValueError, match="must be an op name"):
        SplittingOps([42])  # type: ignore[list-item]


def test_default_ops_split_aten_sdpa_and_keep_getitems_with_it() -> None:
    def attn(q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q) * 2

    q = torch.randn(1, 2, 4, 8)
    gm = make_fx(attn, pre_dispatch=False)(q)
    split, items = split_graph(gm, None)
    splitting = [i for i in items if i.is_splitting]
    assert len(splitting) == 1
    # Whatever aten variant the CPU picked, its tuple unpacking stays in the eager submodule.
    for item in items:
        if not item.is_splitting:
            assert operator.getitem not in _targets(item.module)
    assert torch.equal(split(q), attn(q))


def test_default_ops_split_dynamo_graph_of_qwen3_per_layer() -> None:
    model = Qwen3Decoder(Qwen3Config.small())
    graphs: list[torch.fx.GraphModule] = []

    def grab(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab, dynamic=True)(torch.randn(3, 64), torch.arange(3))
    _, items = split_graph(graphs[0], None)
    # Two layers: three captured pieces around two eager attentions.
    assert [i.is_splitting for i in items] == [False, True, False, True, False]
    for item in items:
        sdpa = F.scaled_dot_product_attention in _targets(item.module)
        assert sdpa == item.is_splitting


def test_piecewise_graph_replays_pieces_and_runs_splitting_ops_eagerly() -> None:
    backend = ag.get_backend("cpu")
    gm = _toy_graph()
    pw = ag.PiecewiseGraph(
        gm, splitting_ops=["aclgraph_test::attn"], backend=backend, pool=backend.new_pool()
    )
    assert len(pw.pieces) == 3
    assert len(pw.splitting_items) == 2
    w = torch.randn(8, 8)
    x = torch.zeros(4, 8)  # the static input buffer, as a runner would keep it
    desc = ag.BatchDescriptor(4)
    for step in range(4):  # warm-up, capture, two replays
        x.copy_(torch.randn(4, 8))
        CALLS["attn"] = 0
        with ag.graph_context(ag.GraphMode.PIECEWISE, desc):
            got = pw(x, w).clone()
        assert CALLS["attn"] == 2, "splitting ops must run on every call, replay or not"
        assert torch.equal(got, _toy(x, w)), step
    stats = pw.stats
    assert stats.captures == 3
    assert stats.replays == 6
    # Outside a PIECEWISE context the pieces pass through.
    with ag.graph_context(ag.GraphMode.FULL, desc):
        assert torch.equal(pw(x, w), _toy(x, w))
    assert pw.stats.replays == 6
