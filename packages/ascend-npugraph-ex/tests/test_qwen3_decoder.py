"""Fusions on ascend_aclgraph.testing's Qwen3-shaped decoder (decode step over a KV cache)."""

from __future__ import annotations

import ascend_npugraph_ex as nx
import pytest
import torch

testing = pytest.importorskip(
    "ascend_aclgraph.testing", reason="needs ascend-aclgraph with its testing module"
)

PER_LAYER = {"add_rms_norm": 2, "rms_norm": 2, "swiglu": 1, "rotary": 1, "qk_norm_rope": 1}


def _step(layers: int, backend: object | None) -> tuple[list[torch.Tensor], torch.nn.Module]:
    cfg = testing.Qwen3Config.small(num_layers=layers, vocab_size=256)
    model = testing.Qwen3Decoder(cfg, seed=0).eval()
    fn = model if backend is None else torch.compile(model, backend=backend, dynamic=False)
    outs = []
    with torch.no_grad():
        for pos in range(3):  # three decode steps: the KV cache carries state between them
            tokens = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(pos))
            outs.append(fn(tokens, torch.full((4,), pos, dtype=torch.int64)))
    return outs, model


def test_qwen3_decoder_fuses_per_layer_and_matches_eager() -> None:
    reports = {}
    for layers in (1, 2):
        torch._dynamo.reset()
        backend = nx.make_backend(force_eager=True)
        got, model = _step(layers, backend)
        want, ref_model = _step(layers, None)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.layers[0].self_attn.k_cache, ref_model.layers[0].self_attn.k_cache
        )
        reports[layers] = backend.reports[0]
    per_layer = {k: reports[2].counts[k] - reports[1].counts[k] for k in PER_LAYER}
    assert per_layer == PER_LAYER
    launches = reports[2].launches_before - reports[1].launches_before
    launches_after = reports[2].launches_after - reports[1].launches_after
    assert launches_after < launches
