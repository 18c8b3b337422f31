"""The RoPE table and its mRoPE indexing against transformers' rotary embeddings."""

from __future__ import annotations

from typing import Any

import ascend_xlite_adapter as xa
import pytest
import torch
import transformers

HEAD_DIM = 32
MAX_POS = 256
SECTION = [4, 6, 6]  # sums to HEAD_DIM / 2


def _text_kw(**rope: Any) -> dict[str, Any]:
    return {
        "hidden_size": 128,
        "num_attention_heads": 4,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MAX_POS,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, **rope},
    }


def _config(**kw: Any) -> xa.XliteModelConfig:
    return xa.XliteModelConfig(
        head_dim=HEAD_DIM, rope_head_dim=HEAD_DIM, max_seq_len=MAX_POS, rope_theta=1e6, **kw
    )


def _positions() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, MAX_POS, (3, 40), generator=gen)


def test_plain_rope_equals_llama_rotary_embedding() -> None:
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**_text_kw())
    )
    pos = _positions()[0]
    want_cos, want_sin = hf(torch.zeros(1), pos[None])
    cfg = _config()
    cos, sin = xa.rope_cos_sin(xa.precompute_freqs_cis(cfg), pos, cfg)
    torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=0)


def test_interleaved_mrope_equals_qwen3_vl() -> None:
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    text = transformers.Qwen3VLTextConfig(**_text_kw(mrope_section=SECTION))
    hf = modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(text)
    pos = _positions()
    want_cos, want_sin = hf(torch.zeros(1), pos[:, None, :])
    cfg = _config(mrope_section=tuple(SECTION), mrope_interleaved=True)
    cos, sin = xa.rope_cos_sin(xa.precompute_freqs_cis(cfg), pos, cfg)
    torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=0)
    # Interleaving matters once the rows differ.
    flat = _config(mrope_section=tuple(SECTION), mrope_interleaved=False)
    other, _ = xa.rope_cos_sin(xa.precompute_freqs_cis(flat), pos, flat)
    assert (other - want_cos[0]).abs().max() > 0.1


def test_contiguous_mrope_equals_qwen2_vl() -> None:
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    text = transformers.Qwen2VLTextConfig(**_text_kw(mrope_section=SECTION))
    hf = modeling_qwen2_vl.Qwen2VLRotaryEmbedding(text)
    pos = _positions()
    want_cos, want_sin = hf(torch.zeros(1), pos[:, None, :])
    cfg = _config(mrope_section=tuple(SECTION), mrope_interleaved=False)
    cos, sin = xa.rope_cos_sin(xa.precompute_freqs_cis(cfg), pos, cfg)
    torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=0)


def test_text_positions_make_mrope_plain_rope() -> None:
    mrope = _config(mrope_section=tuple(SECTION), mrope_interleaved=True)
    plain = _config()
    pos = _positions()[1]
    got = xa.rope_cos_sin(xa.precompute_freqs_cis(mrope), pos, mrope)
    want = xa.rope_cos_sin(xa.precompute_freqs_cis(plain), pos, plain)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_freqs_cis_layout_is_cos_then_sin() -> None:
    cfg = _config()
    table = xa.precompute_freqs_cis(cfg, dtype=torch.bfloat16)
    assert table.shape == (MAX_POS, HEAD_DIM)
    assert table.dtype == torch.bfloat16
    assert torch.equal(table[0], torch.cat([torch.ones(16), torch.zeros(16)]).bfloat16())


def test_errors() -> None:
    cfg = _config()
    table = xa.precompute_freqs_cis(cfg)
    with pytest.raises(ValueError, match=r"positions span \[0, 256\]"):
        xa.rope_cos_sin(table, torch.tensor([0, MAX_POS]), cfg)
    with pytest.raises(ValueError, match=r"expected \[num_tokens\]"):
        xa.rope_cos_sin(table, torch.zeros(3, 4, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="summing to 16"):
        xa.mrope_rows((4, 4, 4), True, 16)
    with pytest.raises(ValueError, match="invalid RoPE configuration"):
        xa.precompute_freqs_cis(xa.XliteModelConfig())
