"""The torch.compile backend: entry point, options plumbing, force_eager and capture modes."""

from __future__ import annotations

import importlib.metadata

import ascend_npugraph_ex as nx
import pytest
import torch
from ascend_npugraph_ex import NpugraphExOptionsError
from conftest import tiny_model


def test_entry_point_registers_backend() -> None:
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert eps["npugraph_ex"].value == "ascend_npugraph_ex.backend:npugraph_ex_backend"
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "npugraph_ex" in list_backends(exclude_tags=())
    assert lookup_backend("npugraph_ex") is nx.npugraph_ex_backend


def test_torch_compile_with_string_backend_and_options() -> None:
    torch._dynamo.reset()
    model = tiny_model("qwen3", 1)
    ids = torch.randint(0, 256, (2, 3))
    compiled = torch.compile(
        model, backend="npugraph_ex", options={"force_eager": True}, dynamic=False
    )
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(ids, use_cache=False).logits,
            model(ids, use_cache=False).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_unknown_option_through_torch_compile_is_an_error() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + 1, backend="npugraph_ex", options={"bogus": 1})
    with pytest.raises(
        Exception,
        match=r"unknown npugraph_ex option\(s\) \['bogus'\]; accepted options: force_eager",
    ):
        compiled(torch.ones(2))


def test_mode_is_rejected() -> None:
    with pytest.raises(NpugraphExOptionsError, match=r"takes no torch\.compile mode"):
        nx.npugraph_ex_backend(
            torch.fx.symbolic_trace(torch.nn.Identity()), [torch.ones(1)], mode="max-autotune"
        )


def test_make_backend_validates_eagerly() -> None:
    with pytest.raises(NpugraphExOptionsError):
        nx.make_backend(static_kernel=True, optimize=False)


def test_capture_mode_replays_through_ascend_aclgraph() -> None:
    """Default mode: optimize, then capture with ascend_aclgraph (CPU twin here)."""
    torch._dynamo.reset()
    model = tiny_model("qwen3", 2)
    backend = nx.make_backend(capture_backend="cpu")
    compiled = torch.compile(
        lambda i: model(i, use_cache=False).logits, backend=backend, dynamic=False
    )
    with torch.no_grad():
        for seed in range(3):  # new data each call: stale static inputs would show here
            ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(
                compiled(ids), model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5
            )
    assert backend.reports
    assert backend.reports[0].counts["qk_norm_rope"] == 2


def test_fusion_report_and_pass_hash() -> None:
    pm = nx.PassManager()
    assert pm.uuid() == nx.PassManager().uuid()
    assert pm.uuid() != nx.PassManager(("rms_norm",)).uuid()
    with pytest.raises(ValueError, match="unknown fusions"):
        nx.PassManager(("layer_norm",))


class _Counter(torch.nn.Module):
    """A step counter buffer next to a batched computation: module state the graph writes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.weight = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        return x @ self.weight


def test_capture_mode_writes_module_buffers_not_private_copies() -> None:
    """Buffers are module state: the captured graph must write the module's own tensors."""
    torch._dynamo.reset()
    module = _Counter().requires_grad_(False)
    compiled = torch.compile(module, backend=nx.make_backend(capture_backend="cpu"), dynamic=False)
    with torch.no_grad():
        for step in range(1, 5):  # warm-up, capture, then replays
            x = torch.randn(4, 8)
            assert torch.equal(compiled(x), x @ module.weight)
            assert int(module.steps) == step


def test_capture_mode_decoder_with_kv_cache_matches_eager_every_step() -> None:
    """The KV cache is a buffer: a private copy of it would drift from eager from step 2."""
    testing = pytest.importorskip("ascend_aclgraph.testing", reason="needs ascend-aclgraph")
    torch._dynamo.reset()
    cfg = testing.Qwen3Config.small(num_layers=2, vocab_size=256, max_batch=4)
    graph_model = testing.Qwen3Decoder(cfg, seed=0).eval()
    eager_model = testing.Qwen3Decoder(cfg, seed=0).eval()
    backend = nx.make_backend(capture_backend="cpu")
    compiled = torch.compile(graph_model, backend=backend, dynamic=False)
    with torch.no_grad():
        for pos in range(5):  # batch == max_batch: every KV row is a real request's
            tokens = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(pos))
            positions = torch.full((4,), pos, dtype=torch.int64)
            got = compiled(tokens, positions)
            want = eager_model(tokens, positions)
            # Fused kernels round differently from the unfused ops: a tolerance, not bitwise.
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for g, w in zip(graph_model.cache_state(), eager_model.cache_state(), strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert backend.reports[0].counts["add_rms_norm"] > 0
