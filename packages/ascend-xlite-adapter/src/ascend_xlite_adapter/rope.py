"""The RoPE table Xlite takes (``freqs_cis``) and how positions index it, mRoPE included.

``freqs_cis`` is ``[max_seq_len, rope_head_dim]``: the cosines of the ``rope_head_dim / 2``
frequencies, then their sines, built exactly as vllm-ascend builds it (float32 on the host, then
cast). Rotation is the "rotate half" (GPT-NeoX) form transformers and vLLM use for these models.

With mRoPE (Qwen-VL) positions are ``[3, num_tokens]`` (temporal, height, width) and each
frequency takes its angle from one of the three rows: ``mrope_section`` counts the frequencies
per row, either as contiguous runs (Qwen2-VL) or interleaved ``t h w t h w ...`` (Qwen3-VL).
For text tokens the three rows are equal and mRoPE is plain RoPE.
"""

from __future__ import annotations

import torch

from ascend_xlite_adapter.config import XliteModelConfig

__all__ = [
    "apply_rope",
    "mrope_rows",
    "precompute_freqs_cis",
    "rope_cos_sin",
]


def precompute_freqs_cis(
    config: XliteModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``cat(cos, sin)`` of ``position * inv_freq`` for every position below ``max_seq_len``.

    Raises:
        ValueError: ``rope_head_dim``, ``max_seq_len`` or ``rope_theta`` is not positive.
    """
    dim, length, base = config.rope_head_dim, config.max_seq_len, config.rope_theta
    if dim <= 0 or dim % 2 or length <= 0 or base <= 0:
        raise ValueError(
            f"invalid RoPE configuration: rope_head_dim={dim} (even, > 0), max_seq_len={length}, "
            f"rope_theta={base} (> 0)"
        )
    # Same arithmetic as transformers' default RoPE, so float32 angles are bitwise equal.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)


def mrope_rows(section: tuple[int, ...], interleaved: bool, half: int) -> torch.Tensor:
    """For each of the ``half`` frequencies, which position row (0=t, 1=h, 2=w) it reads.

    Raises:
        ValueError: the sections are not three counts summing to ``half``.
    """
    if len(section) != 3 or sum(section) != half:
        raise ValueError(f"mrope_section {list(section)}: expected 3 counts summing to {half}")
    rows = torch.zeros(half, dtype=torch.long)
    if interleaved:
        # Qwen3-VL: frequency j reads h if j % 3 == 1, w if j % 3 == 2, while that row still
        # has frequencies left (3 * its count); t otherwise.
        j = torch.arange(half)
        rows[(j % 3 == 1) & (j < 3 * section[1])] = 1
        rows[(j % 3 == 2) & (j < 3 * section[2])] = 2
    else:
        rows[section[0] : section[0] + section[1]] = 1
        rows[section[0] + section[1] :] = 2
    return rows


def rope_cos_sin(
    freqs_cis: torch.Tensor, positions: torch.Tensor, config: XliteModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[num_tokens, rope_head_dim]`` for ``positions``.

    Args:
        freqs_cis: the table from :func:`precompute_freqs_cis`.
        positions: ``[num_tokens]``, or ``[3, num_tokens]`` when ``config.mrope_section`` is set.
        config: supplies ``rope_head_dim`` and the mRoPE layout.

    Raises:
        ValueError: a position is outside the table, or the positions' shape does not match
            the configuration.
    """
    half = config.rope_head_dim // 2
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= len(freqs_cis)):
        raise ValueError(
            f"positions span [{int(positions.min())}, {int(positions.max())}]; the RoPE table "
            f"covers [0, {len(freqs_cis) - 1}] (max_seq_len)"
        )
    if config.mrope_section:
        if positions.dim() == 1:
            # Text-only input: all three rows are the same position.
            positions = positions.expand(3, -1)
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(
                f"mRoPE positions: expected [3, num_tokens], got {tuple(positions.shape)}"
            )
        table = freqs_cis.index_select(0, positions.reshape(-1).long())
        table = table.view(3, positions.shape[1], -1)
        rows = mrope_rows(config.mrope_section, config.mrope_interleaved, half)
        cols = torch.arange(half)
        tokens = torch.arange(positions.shape[1])[:, None]
        cos = table[rows[None, :], tokens, cols[None, :]]
        sin = table[rows[None, :], tokens, half + cols[None, :]]
    else:
        if positions.dim() != 1:
            raise ValueError(f"positions: expected [num_tokens], got {tuple(positions.shape)}")
        table = freqs_cis.index_select(0, positions.long())
        cos, sin = table[:, :half], table[:, half:]
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[num_tokens, heads, head_dim]``) by ``cos`` and ``sin``
    (``[num_tokens, head_dim]``)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
