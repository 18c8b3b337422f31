"""The graph paths of the stack, end to end, on a Qwen3-shaped decoder with a KV cache.

Each graph mode is wired the way the user guide describes:

* FULL / FULL_DECODE_ONLY: npugraph_ex optimizes the FX graph (``force_eager``, fusions only)
  and ACLGraph captures the optimized callable, one graph per capture size;
* PIECEWISE / FULL_AND_PIECEWISE: the ``aclgraph`` torch.compile backend splits the graph at
  attention and captures the pieces (npugraph_ex is off in these modes);
* NONE: eager.

Every mode decodes the same requests as eager; logits agree within float32 rounding of the
fused kernels (1e-5), greedy tokens are identical, and each mode captured what it should.
"""

from __future__ import annotations

import ascend_aclgraph as ag
import ascend_npugraph_ex as nx
import pytest
import torch
from ascend_aclgraph.backends import GraphBackend
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder

SIZES = [1, 2, 4, 8]
STEPS = 4
MODES = ["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]


def _decode(step, model: Qwen3Decoder, batch: int, device: torch.device):  # type: ignore[no-untyped-def]
    """Greedy decode ``batch`` requests for STEPS tokens; returns (logits per step, tokens)."""
    model.reset_cache()
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, 512, (batch,), generator=gen).to(device)
    logits_seen, tokens_seen = [], []
    for pos in range(STEPS):
        positions = torch.full((batch,), pos, dtype=torch.long, device=device)
        with torch.no_grad(), ag.batch_hint(uniform_decode=True):
            logits = step(tokens, positions)
        tokens = logits.argmax(-1)
        logits_seen.append(logits.float().cpu())
        tokens_seen.append(tokens.cpu())
    return logits_seen, torch.stack(tokens_seen)


def _graph_step(mode: str, model: Qwen3Decoder, backend: GraphBackend):  # type: ignore[no-untyped-def]
    """The callable each mode runs, and a function returning how many graphs it captured."""
    torch._dynamo.reset()
    if mode == "NONE":
        return model, lambda: 0
    if mode in ("FULL", "FULL_DECODE_ONLY"):
        fused = torch.compile(model, backend=nx.make_backend(force_eager=True), dynamic=False)
        sample = (
            torch.zeros(max(SIZES), dtype=torch.long, device=backend.device),
            torch.zeros(max(SIZES), dtype=torch.long, device=backend.device),
        )
        captured = ag.capture(fused, sample, batch_sizes=SIZES, backend=backend, progress=False)
        return captured, lambda: captured.stats.captures
    compiler = ag.make_compile_backend(mode=mode, batch_sizes=SIZES, backend=backend.name)
    compiled = torch.compile(model, backend=compiler, dynamic=True)
    return compiled, lambda: compiler.stats.captures


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [3, 8])
def test_every_mode_decodes_like_eager(mode: str, batch: int, backend: GraphBackend) -> None:
    model = Qwen3Decoder(Qwen3Config.small(vocab_size=512)).to(backend.device)
    want_logits, want_tokens = _decode(model, model, batch, backend.device)
    step, graphs = _graph_step(mode, model, backend)
    got_logits, got_tokens = _decode(step, model, batch, backend.device)
    assert torch.equal(got_tokens, want_tokens)
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mode == "NONE":
        assert graphs() == 0
    else:
        assert graphs() > 0, f"{mode} captured no graph"


def test_full_path_fuses_before_capture(backend: GraphBackend) -> None:
    """In FULL mode the captured graph runs the fused ops, not the unfused aten sequence."""
    model = Qwen3Decoder(Qwen3Config.small(vocab_size=512)).to(backend.device)
    torch._dynamo.reset()
    fuser = nx.make_backend(force_eager=True)
    fused = torch.compile(model, backend=fuser, dynamic=False)
    sample = (
        torch.zeros(4, dtype=torch.long, device=backend.device),
        torch.zeros(4, dtype=torch.long, device=backend.device),
    )
    ag.capture(fused, sample, batch_sizes=[4], backend=backend, progress=False)
    counts = fuser.reports[-1].counts
    assert counts["add_rms_norm"] > 0
    assert counts["swiglu"] > 0
