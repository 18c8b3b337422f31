"""resolve_graph_mode over every combination, against an oracle written from the rules.

The oracle below works on plain strings and spells each mode's (decode, mixed) pair out by hand,
so it shares no code with the implementation. It follows the rules exactly as documented in
``resolve_graph_mode``; the hand-written SPOT table pins the interesting cases independently of
the oracle too.
"""

from __future__ import annotations

import itertools
import logging

import pytest
from ascend_aclgraph import (
    AclGraphError,
    AttentionSupport,
    GraphMode,
    GraphModeError,
    resolve_graph_mode,
)

MODES = ["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]
SUPPORTS = ["NEVER", "UNIFORM_SINGLE_TOKEN_DECODE", "UNIFORM_BATCH", "ALWAYS"]
LEVEL = {name: i for i, name in enumerate(SUPPORTS)}
# (decode runtime mode, mixed runtime mode) of each mode, written out rather than derived.
PARTS = {
    "NONE": ("NONE", "NONE"),
    "PIECEWISE": ("PIECEWISE", "PIECEWISE"),
    "FULL": ("FULL", "FULL"),
    "FULL_DECODE_ONLY": ("FULL", "NONE"),
    "FULL_AND_PIECEWISE": ("FULL", "PIECEWISE"),
}
RAISES = "raises"
SPEC_QUERY_LEN = 3
LOGGER = "ascend_aclgraph.resolution"

# Substring that each kind of narrowing step must put in its line.
CAUSE_TEXT = {
    "encdec": "encoder-decoder models run PIECEWISE or NONE graphs only",
    "cp": "context parallel does not support FULL graphs",
    "split": "attention is not split",
    "mixed": "only; FULL graphs of mixed prefill/decode batches need ALWAYS",
    "never": "supports NEVER, so no FULL graphs",
    "spec": f"speculative decoding (uniform decode query length {SPEC_QUERY_LEN}) needs "
    "UNIFORM_BATCH",
}

Step = tuple[str, str, str]  # (from, to, cause kind)


def oracle(
    mode: str, support: str, split: bool, spec: bool, cp: bool, encdec: bool
) -> tuple[str, list[Step]] | str:
    steps: list[Step] = []

    def go(new: str, cause: str) -> str:
        steps.append((mode, new, cause))
        return new

    fallback = "PIECEWISE" if split else "NONE"
    if mode == "NONE":
        return mode, steps
    has_full = "FULL" in PARTS[mode]
    if encdec and has_full:
        mode = go(fallback, "encdec")
        has_full = False
    if cp and has_full:
        mode = go(fallback, "cp")
    if not split and mode == "PIECEWISE":
        mode = go("NONE", "split")
    if not split and mode == "FULL_AND_PIECEWISE":
        mode = go("FULL", "split")
    if PARTS[mode][1] == "FULL" and support != "ALWAYS":
        if support == "NEVER":
            return RAISES
        mode = go("FULL_AND_PIECEWISE" if split else "FULL_DECODE_ONLY", "mixed")
    if PARTS[mode][0] == "FULL" and support == "NEVER":
        mode = go(fallback, "never")
    if PARTS[mode][0] == "FULL" and spec and LEVEL[support] < LEVEL["UNIFORM_BATCH"]:
        mode = go(fallback, "spec")
    return mode, steps


COMBOS = list(
    itertools.product(MODES, SUPPORTS, [True, False], [False, True], [False, True], [False, True])
)


def _call(
    mode: str, support: str, split: bool, spec: bool, cp: bool, encdec: bool
) -> tuple[GraphMode, list[str]]:
    return resolve_graph_mode(
        mode,
        support,
        attention_is_split=split,
        uniform_decode_query_len=SPEC_QUERY_LEN if spec else 1,
        context_parallel=cp,
        encoder_decoder=encdec,
    )


def _id(combo: tuple[str, str, bool, bool, bool, bool]) -> str:
    mode, support, split, spec, cp, encdec = combo
    flags = [
        f for f, on in (("split", split), ("spec", spec), ("cp", cp), ("encdec", encdec)) if on
    ]
    return "-".join([mode, support, *flags])


def test_every_combination_is_covered() -> None:
    assert len(COMBOS) == 5 * 4 * 2**4
    assert len({_id(c) for c in COMBOS}) == len(COMBOS)


@pytest.mark.parametrize("combo", COMBOS, ids=_id)
def test_matches_oracle_with_one_log_line_per_step(
    combo: tuple[str, str, bool, bool, bool, bool], caplog: pytest.LogCaptureFixture
) -> None:
    expected = oracle(*combo)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    if expected == RAISES:
        with pytest.raises(GraphModeError, match=r"supports NEVER.*Fix: request"):
            _call(*combo)
        return
    assert isinstance(expected, tuple)
    final, steps = expected
    mode, reasons = _call(*combo)
    assert mode is GraphMode[final]
    assert len(reasons) == len(steps)
    for reason, (src, dst, cause) in zip(reasons, steps, strict=True):
        assert reason.startswith(f"{src} narrowed to {dst}: ")
        assert CAUSE_TEXT[cause] in reason
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.getMessage() for r in records] == reasons
    assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in records)


T, F = True, False
# (mode, support, split, spec, cp, encdec) -> effective mode; written by hand from the rules.
SPOT = [
    ("FULL", "ALWAYS", T, F, F, F, "FULL"),
    ("FULL", "ALWAYS", T, T, F, F, "FULL"),
    ("FULL", "UNIFORM_BATCH", T, F, F, F, "FULL_AND_PIECEWISE"),
    ("FULL", "UNIFORM_BATCH", F, F, F, F, "FULL_DECODE_ONLY"),
    ("FULL", "UNIFORM_BATCH", T, T, F, F, "FULL_AND_PIECEWISE"),
    ("FULL", "UNIFORM_SINGLE_TOKEN_DECODE", T, F, F, F, "FULL_AND_PIECEWISE"),
    ("FULL", "UNIFORM_SINGLE_TOKEN_DECODE", T, T, F, F, "PIECEWISE"),
    ("FULL", "UNIFORM_SINGLE_TOKEN_DECODE", F, T, F, F, "NONE"),
    ("FULL", "NEVER", T, F, F, F, RAISES),
    ("FULL", "NEVER", F, F, F, F, RAISES),
    ("FULL", "NEVER", T, F, T, F, "PIECEWISE"),
    ("FULL", "NEVER", F, F, F, T, "NONE"),
    ("FULL", "ALWAYS", F, F, T, F, "NONE"),
    ("FULL_AND_PIECEWISE", "ALWAYS", T, T, F, F, "FULL_AND_PIECEWISE"),
    ("FULL_AND_PIECEWISE", "ALWAYS", F, F, F, F, "FULL"),
    ("FULL_AND_PIECEWISE", "UNIFORM_BATCH", F, F, F, F, "FULL_DECODE_ONLY"),
    ("FULL_AND_PIECEWISE", "UNIFORM_SINGLE_TOKEN_DECODE", T, F, F, F, "FULL_AND_PIECEWISE"),
    ("FULL_AND_PIECEWISE", "UNIFORM_SINGLE_TOKEN_DECODE", T, T, F, F, "PIECEWISE"),
    ("FULL_AND_PIECEWISE", "NEVER", T, F, F, F, "PIECEWISE"),
    ("FULL_AND_PIECEWISE", "NEVER", F, F, F, F, RAISES),
    ("FULL_AND_PIECEWISE", "ALWAYS", T, F, F, T, "PIECEWISE"),
    ("FULL_AND_PIECEWISE", "ALWAYS", F, F, T, F, "NONE"),
    ("FULL_AND_PIECEWISE", "ALWAYS", T, F, T, T, "PIECEWISE"),
    ("FULL_DECODE_ONLY", "UNIFORM_SINGLE_TOKEN_DECODE", F, F, F, F, "FULL_DECODE_ONLY"),
    ("FULL_DECODE_ONLY", "UNIFORM_SINGLE_TOKEN_DECODE", F, T, F, F, "NONE"),
    ("FULL_DECODE_ONLY", "UNIFORM_BATCH", F, T, F, F, "FULL_DECODE_ONLY"),
    ("FULL_DECODE_ONLY", "NEVER", T, F, F, F, "PIECEWISE"),
    ("FULL_DECODE_ONLY", "NEVER", F, F, F, F, "NONE"),
    ("FULL_DECODE_ONLY", "ALWAYS", T, F, T, F, "PIECEWISE"),
    ("FULL_DECODE_ONLY", "ALWAYS", F, F, T, F, "NONE"),
    ("PIECEWISE", "NEVER", T, T, T, T, "PIECEWISE"),
    ("PIECEWISE", "ALWAYS", F, F, F, F, "NONE"),
    ("NONE", "NEVER", F, T, T, T, "NONE"),
]


@pytest.mark.parametrize("case", SPOT, ids=lambda c: _id(c[:6]))
def test_spot_table(case: tuple[str, str, bool, bool, bool, bool, str]) -> None:
    mode, support, split, spec, cp, encdec, expected = case
    predicted = oracle(mode, support, split, spec, cp, encdec)
    assert (predicted if predicted == RAISES else predicted[0]) == expected  # the oracle agrees
    if expected == RAISES:
        with pytest.raises(GraphModeError):
            _call(mode, support, split, spec, cp, encdec)
    else:
        assert _call(mode, support, split, spec, cp, encdec)[0] is GraphMode[expected]


def test_log_line_names_the_backend(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    mode, reasons = resolve_graph_mode(
        GraphMode.FULL,
        AttentionSupport.UNIFORM_BATCH,
        attention_is_split=True,
        attention_backend="mla_v1",
    )
    assert mode is GraphMode.FULL_AND_PIECEWISE
    expected = (
        "FULL narrowed to FULL_AND_PIECEWISE: attention backend mla_v1 supports UNIFORM_BATCH only"
    )
    assert reasons[0].startswith(expected)
    assert [r.getMessage() for r in caplog.records] == reasons


def test_chain_logs_each_step_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    mode, reasons = resolve_graph_mode(
        "full", "uniform_single_token_decode", attention_is_split=True, uniform_decode_query_len=2
    )
    assert mode is GraphMode.PIECEWISE
    assert [r.split(":")[0] for r in reasons] == [
        "FULL narrowed to FULL_AND_PIECEWISE",
        "FULL_AND_PIECEWISE narrowed to PIECEWISE",
    ]
    assert len(caplog.records) == 2


def test_no_narrowing_no_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    assert resolve_graph_mode("FULL", "ALWAYS", attention_is_split=False) == (GraphMode.FULL, [])
    assert caplog.records == []


@pytest.mark.parametrize(
    ("split", "fix"),
    [(True, "Fix: request PIECEWISE"), (False, "Fix: request NONE, or split")],
)
def test_impossible_request_error(split: bool, fix: str) -> None:
    with pytest.raises(GraphModeError) as info:
        resolve_graph_mode("FULL", "NEVER", attention_is_split=split, attention_backend="cpu_attn")
    assert fix in str(info.value)
    assert "attention backend cpu_attn supports NEVER" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, AclGraphError)


def test_impossible_after_narrowing_says_what_was_requested() -> None:
    with pytest.raises(GraphModeError, match=r"requested FULL_AND_PIECEWISE; FULL_AND_PIECEWISE"):
        resolve_graph_mode("FULL_AND_PIECEWISE", "NEVER", attention_is_split=False)


def test_accepts_members_and_any_case() -> None:
    by_member = resolve_graph_mode(
        GraphMode.FULL_DECODE_ONLY, AttentionSupport.UNIFORM_BATCH, attention_is_split=False
    )
    by_name = resolve_graph_mode("full_decode_only", "Uniform_Batch", attention_is_split=False)
    assert by_member == by_name == (GraphMode.FULL_DECODE_ONLY, [])


@pytest.mark.parametrize(
    ("mode", "support", "match"),
    [
        ("FULLEST", "ALWAYS", "accepted values: NONE, PIECEWISE, FULL, FULL_DECODE_ONLY"),
        ("FULL", "MOSTLY", "accepted values: NEVER, UNIFORM_SINGLE_TOKEN_DECODE"),
    ],
)
def test_bad_names(mode: str, support: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_graph_mode(mode, support, attention_is_split=True)


@pytest.mark.parametrize("query_len", [0, -1, True, 1.5, "2"])
def test_bad_query_len(query_len: object) -> None:
    with pytest.raises(ValueError, match="uniform_decode_query_len must be an int >= 1"):
        resolve_graph_mode(
            "FULL",
            "ALWAYS",
            attention_is_split=True,
            uniform_decode_query_len=query_len,  # type: ignore[arg-type]
        )


def test_deterministic() -> None:
    results = {
        repr(_call("FULL", "UNIFORM_SINGLE_TOKEN_DECODE", True, True, False, False))
        for _ in range(3)
    }
    assert len(results) == 1


def test_level_from_the_backend_table_when_none_is_given() -> None:
    # The same rule as `ascend-graph explain`: the table level, the name in any case.
    mode, reasons = resolve_graph_mode(
        "FULL", None, attention_is_split=True, attention_backend="MLA_V1"
    )
    assert mode is GraphMode.FULL_AND_PIECEWISE
    assert reasons[0].startswith(
        "FULL narrowed to FULL_AND_PIECEWISE: attention backend mla_v1 supports UNIFORM_BATCH"
    )
    assert resolve_graph_mode("FULL", None, attention_is_split=True) == (GraphMode.FULL, [])


def test_unknown_backend_without_a_level_is_an_error() -> None:
    # A typo must not be taken as ALWAYS: that would keep FULL graphs the backend cannot run.
    with pytest.raises(ValueError, match="unknown attention backend 'mla_v2'; known backends"):
        resolve_graph_mode("FULL", None, attention_is_split=True, attention_backend="mla_v2")
