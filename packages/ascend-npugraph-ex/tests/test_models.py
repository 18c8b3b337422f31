"""Each fusion fires on tiny real HF Llama / Qwen2 / Qwen3 models; outputs equal the unfused model.

Node counts per decoder layer are the difference between a 2-layer and a 1-layer model, so the
embedding, the final norm and the LM head cancel out.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compile_and_run, tiny_model

# Nodes each fusion removes (pattern nodes out, fused op + getitems in): float32 graphs have no
# casts; bf16 graphs add the up-cast and down-cast of each norm.
REMOVED = {
    torch.float32: {
        "add_rms_norm": 7 - 3,
        "rms_norm": 6 - 1,
        "swiglu": 1,
        "rotary": 11,
        "qk_norm_rope": 2,
    },
    torch.bfloat16: {
        "add_rms_norm": 9 - 3,
        "rms_norm": 8 - 1,
        "swiglu": 1,
        "rotary": 11,
        "qk_norm_rope": 2,
    },
}
# Fusions per decoder layer: two residual add+norms, SwiGLU, one q/k RoPE pair; Qwen3 adds the
# q/k norms (two rms_norm fusions, then folded into one qk_norm_rope).
PER_LAYER = {
    "llama": {"add_rms_norm": 2, "rms_norm": 0, "swiglu": 1, "rotary": 1, "qk_norm_rope": 0},
    "qwen2": {"add_rms_norm": 2, "rms_norm": 0, "swiglu": 1, "rotary": 1, "qk_norm_rope": 0},
    "qwen3": {"add_rms_norm": 2, "rms_norm": 2, "swiglu": 1, "rotary": 1, "qk_norm_rope": 1},
}
# Output tolerance vs the unfused model (logits): fp32 within 1e-5; bf16 within a few rounding
# steps of logits of magnitude ~1 propagated through 2 layers.
LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fusions_fire_per_layer_and_outputs_match(arch: str, dtype: torch.dtype) -> None:
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    reports = {}
    for layers in (1, 2):
        model = tiny_model(arch, layers, dtype)
        expected, got, reps = compile_and_run(lambda i, m=model: m(i, use_cache=False).logits, ids)
        assert len(reps) == 1
        reports[layers] = reps[0]
        tol = LOGIT_TOL[dtype]
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    one, two = reports[1], reports[2]
    per_layer = {k: two.counts[k] - one.counts[k] for k in two.counts}
    assert per_layer == PER_LAYER[arch]
    before = two.nodes_before - one.nodes_before
    after = two.nodes_after - one.nodes_after
    removed = sum(n * REMOVED[dtype][k] for k, n in per_layer.items())
    assert after == before - removed, (before, after, per_layer)
    # Model-level: the first input norm is a plain rms_norm; the final norm is an add+norm.
    assert one.counts["add_rms_norm"] == 2


def test_switches_turn_single_fusions_off() -> None:
    model = tiny_model("qwen3", 1)
    ids = torch.randint(0, 256, (1, 4))
    expected, got, reps = compile_and_run(
        lambda i: model(i, use_cache=False).logits, ids, fuse_swiglu=False, fuse_qk_norm_rope=False
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "swiglu" not in reps[0].counts
    assert "qk_norm_rope" not in reps[0].counts
    assert reps[0].counts["rms_norm"] == 3
    assert reps[0].counts["rotary"] == 1


def test_optimize_false_leaves_graph_alone() -> None:
    model = tiny_model("llama", 1)
    ids = torch.randint(0, 256, (1, 4))
    expected, got, reps = compile_and_run(
        lambda i: model(i, use_cache=False).logits, ids, optimize=False
    )
    assert reps == []
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
