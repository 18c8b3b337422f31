"""A failed match never aborts a compile: it is skipped, reported, and the graph stays valid.

qk_norm_rope moves the views between the norm and the RoPE in front of the norm; that is only
sound when they keep the normalised dim last. A transpose that moves it used to be fused anyway
(wrong results when the shapes allowed it, a fake-kernel error aborting the compile otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from ascend_npugraph_ex.ops import fused_op
from ascend_npugraph_ex.ops.reference import rotate_half
from ascend_npugraph_ex.passes import fx_utils
from conftest import compile_and_run
from test_negative import hf_rms

QW, KW = torch.randn(16), torch.randn(16)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _qk(view: Callable[[torch.Tensor], torch.Tensor]):  # type: ignore[no-untyped-def]
    def f(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qn, kn = view(hf_rms(q, QW[: q.shape[-1]], 1e-6)), view(hf_rms(k, KW[: k.shape[-1]], 1e-6))
        return _rope(qn, cos, sin), _rope(kn, cos, sin)

    return f


def _assert_outputs_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_transpose_of_the_normalised_dim_is_not_fused_when_shapes_allow_it() -> None:
    # Square trailing dims: the fused op's shapes check out, but it would normalise the wrong
    # dim (max error 7.8-13 before the fix).
    q, k = torch.randn(2, 4, 16, 16), torch.randn(2, 2, 16, 16)
    cos, sin = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    expected, got, reports = compile_and_run(_qk(lambda t: t.transpose(-1, -2)), q, k, cos, sin)
    _assert_outputs_close(got, expected)
    report = reports[0]
    assert report.counts["qk_norm_rope"] == 0
    assert report.counts["rms_norm"] == 2  # the norms and the RoPE still fuse on their own
    assert report.counts["rotary"] == 1
    (skip,) = [s for s in report.skipped if s.fusion == "qk_norm_rope"]
    assert "moves the normalised (last) dim" in skip.reason


def test_transpose_of_the_normalised_dim_does_not_abort_the_compile() -> None:
    # Non-square trailing dims: the fused op's fake kernel rejected the weight, and that error
    # used to abort the whole compile.
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    cos, sin = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    expected, got, reports = compile_and_run(_qk(lambda t: t.transpose(2, 3)), q, k, cos, sin)
    _assert_outputs_close(got, expected)
    assert reports[0].counts["qk_norm_rope"] == 0


def test_views_that_keep_the_normalised_dim_last_are_moved_and_fused() -> None:
    # [b, s, h, d] -> [b, h, s, d] -> [b, h * s, d]: leading dims only.
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = torch.randn(2, 1, 16), torch.randn(2, 1, 16)

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], -1, t.shape[-1])

    expected, got, reports = compile_and_run(_qk(view), q, k, cos, sin)
    _assert_outputs_close(got, expected)
    assert reports[0].counts["qk_norm_rope"] == 1
    assert reports[0].skipped == ()


def test_view_that_merges_the_normalised_dim_is_not_fused() -> None:
    # Norm over 8 values, RoPE over 32 (4 heads merged): the norm cannot move past that view.
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 8)
    cos, sin = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    expected, got, reports = compile_and_run(
        _qk(lambda t: t.reshape(t.shape[0], t.shape[1], -1)), q, k, cos, sin
    )
    _assert_outputs_close(got, expected)
    assert reports[0].counts["qk_norm_rope"] == 0
    (skip,) = [s for s in reports[0].skipped if s.fusion == "qk_norm_rope"]
    assert "splits or merges the normalised dim" in skip.reason


W, WG, WU = torch.randn(64), torch.randn(64, 96) / 8, torch.randn(64, 96) / 8


def _block(
    x: torch.Tensor,
    r: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One candidate for each fusion: add+norm, SwiGLU, q/k norms, their RoPE pair."""
    s = x + r
    h = hf_rms(s, W, 1e-6)
    mlp = F.silu(h @ WG) * (h @ WU)
    qn = hf_rms(q, QW, 1e-6).transpose(1, 2)
    kn = hf_rms(k, KW, 1e-6).transpose(1, 2)
    return mlp, s, _rope(qn, cos, sin), _rope(kn, cos, sin)


def _block_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, 64, generator=g),
        torch.randn(4, 64, generator=g),
        torch.randn(2, 5, 4, 16, generator=g),
        torch.randn(2, 5, 2, 16, generator=g),
        torch.randn(2, 1, 5, 16, generator=g),
        torch.randn(2, 1, 5, 16, generator=g),
    )


def test_block_fuses_every_fusion_once() -> None:
    """Positive control for the injected-failure test below."""
    expected, got, reports = compile_and_run(_block, *_block_inputs())
    _assert_outputs_close(got, expected)
    assert dict(reports[0].counts) == {
        "add_rms_norm": 1,
        "rms_norm": 2,
        "swiglu": 1,
        "rotary": 1,
        "qk_norm_rope": 1,
    }
    assert reports[0].skipped == ()


@pytest.mark.parametrize("fusion", ["add_rms_norm", "rms_norm", "swiglu", "rotary", "qk_norm_rope"])
def test_error_while_building_a_replacement_skips_the_match(
    fusion: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fake kernel that raises (as a shape check does) costs that fusion, never the compile."""
    real_fake_call = fx_utils._fake_call
    target = fused_op(fusion)

    def failing(op: object, args: tuple[object, ...], kwargs: object = None) -> object:
        if op is target:
            raise RuntimeError(f"injected failure in {fusion}'s fake kernel")
        return real_fake_call(op, args, kwargs)

    monkeypatch.setattr(fx_utils, "_fake_call", failing)
    with caplog.at_level(logging.DEBUG, logger="ascend_npugraph_ex"):
        expected, got, reports = compile_and_run(_block, *_block_inputs())
    _assert_outputs_close(got, expected)
    report = reports[0]
    assert report.counts[fusion] == 0
    mine = [s for s in report.skipped if s.fusion == fusion]
    assert mine
    assert all(
        "RuntimeError while building the replacement: injected failure" in s.reason for s in mine
    )
    assert f"skipped {mine[0]}" in caplog.text
    if fusion == "qk_norm_rope":
        # The transposes it had moved in front of the norms were removed again: the graph is
        # the one the other fusions leave, node for node.
        _, _, without = compile_and_run(_block, *_block_inputs(), fuse_qk_norm_rope=False)
        assert report.nodes_after == without[0].nodes_after


def test_report_string_mentions_skips() -> None:
    from ascend_npugraph_ex.passes import SkippedMatch

    q, k = torch.randn(2, 4, 16, 16), torch.randn(2, 2, 16, 16)
    cos, sin = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    _, _, reports = compile_and_run(_qk(lambda t: t.transpose(-1, -2)), q, k, cos, sin)
    assert str(reports[0]).endswith("1 skipped (reasons at DEBUG level)")
    assert isinstance(reports[0].skipped[0], SkippedMatch)
