"""``ascend-graph explain``: text and JSON output, bad input, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from ascend_aclgraph.cli import build_parser, main

PACKAGE = Path(__file__).resolve().parents[1]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        ["explain", "--mode", "full", "--attention-backend", "mla_v1", "--max-num-seqs", "16"],
        capsys,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "requested mode:  FULL" in lines
    assert "effective mode:  FULL_AND_PIECEWISE" in lines
    assert "UNIFORM_BATCH (backend table)" in out
    assert (
        "  1. FULL narrowed to FULL_AND_PIECEWISE: attention backend mla_v1 supports "
        "UNIFORM_BATCH only" in out
    )
    # Default sizes: vLLM's grid up to min(max_num_seqs * q, 512) = 16.
    assert "  PIECEWISE (5): 16 8 4 2 1" in lines
    assert "  FULL (5): 16/16 8/8 4/4 2/2 1/1" in lines


def test_explain_no_narrowing_and_eager(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["explain", "--mode", "none"], capsys)
    assert code == 0
    assert "narrowing:       none, the requested mode runs as is" in out
    assert "graphs:          none, every batch runs eagerly" in out


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "explain",
        "--mode=FULL_AND_PIECEWISE",
        "--attention-support=uniform_single_token_decode",
        "--uniform-decode-query-len=3",
        "--capture-sizes=1,2,4,8,16",
        "--context-parallel",
        "--json",
    ]
    code, out, _ = run_main(argv, capsys)
    assert code == 0
    report = json.loads(out)
    assert report["requested_mode"] == "FULL_AND_PIECEWISE"
    assert report["effective_mode"] == "PIECEWISE"
    assert report["reasons"] == [
        "FULL_AND_PIECEWISE narrowed to PIECEWISE: context parallel does not support FULL graphs"
    ]
    assert report["inputs"]["context_parallel"] is True
    assert report["inputs"]["attention_support"] == "UNIFORM_SINGLE_TOKEN_DECODE"
    # Effective mode has no FULL decode graphs, so sizes are not rounded to multiples of 3.
    assert report["capture_sizes"] == [1, 2, 4, 8, 16]
    assert list(report["graphs"]) == ["PIECEWISE"]
    assert report["graphs"]["PIECEWISE"][0] == {
        "num_tokens": 16,
        "uniform_decode": False,
        "num_reqs": None,
        "has_lora": False,
    }


def test_explain_json_spec_decode_rounding(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--json", "--uniform-decode-query-len", "2", "--max-capture-size", "8"]
    code, out, _ = run_main([*argv, "--max-num-seqs", "2"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["effective_mode"] == "FULL_AND_PIECEWISE"
    assert report["capture_sizes"] == [2, 4, 8]
    full = report["graphs"]["FULL"]
    assert [(g["num_tokens"], g["num_reqs"]) for g in full] == [(4, 2), (2, 1)]


def test_no_attention_split(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["explain", "--mode", "PIECEWISE", "--no-attention-split"], capsys)
    assert code == 0
    assert "effective mode:  NONE" in out
    assert "PIECEWISE narrowed to NONE: attention is not split" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--mode", "fullest"],
            "argument --mode: unknown graph mode 'fullest'; accepted values: "
            "NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE",
        ),
        (
            ["--attention-support", "often"],
            "argument --attention-support: unknown attention "
            "support 'often'; accepted values: NEVER, UNIFORM_SINGLE_TOKEN_DECODE, UNIFORM_BATCH, "
            "ALWAYS",
        ),
        (
            ["--capture-sizes", "1,x"],
            "argument --capture-sizes: expected a positive integer, got 'x'",
        ),
        (["--capture-sizes", "0"], "argument --capture-sizes: expected a positive integer"),
        (
            # Contradictory: the sizes are given, so a maximum would be ignored (or cut them).
            ["--capture-sizes", "1,2,4", "--max-capture-size", "8"],
            "argument --max-capture-size: not allowed with argument --capture-sizes",
        ),
        (
            ["--max-capture-size", "8", "--capture-sizes", "16"],
            "argument --capture-sizes: not allowed with argument --max-capture-size",
        ),
        (
            # A typo must not silently count as ALWAYS and get FULL graphs.
            ["--mode", "FULL", "--attention-backend", "mla_v2"],
            "argument --attention-backend: unknown attention backend 'mla_v2'; known backends "
            "(any case): attention_v1, context_parallel/attention_cp, mla_v1, "
            "context_parallel/mla_cp, sfa_v1, context_parallel/sfa_cp, dsa_v1, dsa_cp, indexer, "
            "gdn_attn; to use another backend, give its attention support level explicitly "
            "(--attention-support)",
        ),
        (
            ["--attention-backend", " "],
            "argument --attention-backend: the attention backend name is empty\n",
        ),
        (["--max-num-seqs", "-1"], "argument --max-num-seqs: expected a positive integer"),
        (["--uniform-decode-query-len", "0"], "argument --uniform-decode-query-len"),
        (
            [
                "--mode",
                "FULL_DECODE_ONLY",
                "--capture-sizes",
                "2",
                "--uniform-decode-query-len",
                "3",
            ],
            "argument --uniform-decode-query-len: no capture size is left",
        ),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_exits_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["explain", *argv], capsys)
    assert code == 2
    assert out == ""
    assert needle in err
    # Flag errors come from the subcommand's parser; unknown flags from the top-level one.
    assert ("ascend-graph: error:" if "--bogus" in argv else "ascend-graph explain: error:") in err


def test_missing_subcommand_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main([], capsys)
    assert code == 2
    assert "COMMAND" in err


def test_impossible_request_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--mode", "FULL", "--attention-support", "NEVER", "--no-attention-split"]
    code, out, err = run_main(argv, capsys)
    assert code == 1
    assert out == ""
    assert "ascend-graph explain: error: FULL graphs capture attention" in err
    assert "Fix: request NONE" in err


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(PACKAGE / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def test_module_entry_point_subprocess() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ascend_aclgraph.cli",
            "explain",
            "--mode",
            "FULL",
            "--attention-support",
            "UNIFORM_BATCH",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["effective_mode"] == "FULL_AND_PIECEWISE"
    # The narrowing is in the report; it must not also leak onto stderr as a log line.
    assert "narrowed" not in proc.stderr
    assert "FULL_AND_PIECEWISE" not in proc.stderr
    assert proc.stderr == ""

    bad = subprocess.run(
        [sys.executable, "-m", "ascend_aclgraph.cli", "explain", "--mode", "x"],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert bad.returncode == 2
    assert "argument --mode" in bad.stderr


def test_console_script_registered() -> None:
    meta = tomllib.loads((PACKAGE / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["ascend-graph"] == "ascend_aclgraph.cli:main"


@pytest.mark.parametrize("name", ["MLA_V1", "Mla_V1", " mla_v1 "])
def test_backend_names_are_case_insensitive(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["explain", "--mode", "FULL", "--attention-backend", name], capsys)
    assert code == 0, err
    # The name is shown as listed, and its table level narrows FULL as for "mla_v1".
    assert "attention:       mla_v1, support UNIFORM_BATCH (backend table), split" in out
    assert "effective mode:  FULL_AND_PIECEWISE" in out


def test_unknown_backend_is_allowed_with_an_explicit_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["explain", "--mode", "FULL", "--attention-backend", "my_attn"]
    code, out, err = run_main([*argv, "--attention-support", "uniform_batch"], capsys)
    assert code == 0, err
    assert "attention:       my_attn, support UNIFORM_BATCH (given), split" in out
    assert "attention backend my_attn supports UNIFORM_BATCH only" in out


def test_explicit_level_overrides_the_backend_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--attention-backend", "MLA_V1", "--attention-support", "always", "--json"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    inputs = json.loads(out)["inputs"]
    assert inputs["attention_backend"] == "mla_v1"
    assert (inputs["attention_support"], inputs["attention_support_source"]) == ("ALWAYS", "given")


@pytest.mark.parametrize(
    ("argv", "status", "error"),
    [
        (
            ["explain", "--json", "--mode", "fullest"],
            2,
            "argument --mode: unknown graph mode 'fullest'; accepted values: "
            "NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE",
        ),
        # The flag that fails comes before --json: --json is still honoured.
        (
            ["explain", "--max-num-seqs", "0", "--json"],
            2,
            "argument --max-num-seqs: expected a positive integer, got '0'",
        ),
        (
            ["explain", "--json", "--attention-backend", "mla_v2"],
            2,
            "argument --attention-backend: unknown attention backend 'mla_v2'",
        ),
        (
            ["explain", "--json", "--capture-sizes", "1,2", "--max-capture-size", "4"],
            2,
            "argument --max-capture-size: not allowed with argument --capture-sizes",
        ),
        (["explain", "--json", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["explain", "--json=yes"], 2, "argument --json: ignored explicit argument 'yes'"),
        (
            ["explain", "--json", "--mode", "FULL", "--attention-support", "NEVER"],
            1,
            "FULL graphs capture attention for mixed prefill/decode batches, but the attention "
            "backend supports NEVER. Fix: request PIECEWISE",
        ),
    ],
)
def test_errors_under_json_are_json(
    argv: list[str], status: int, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(argv, capsys)
    assert code == status
    report = json.loads(out)
    assert set(report) == {"error", "exit_status"}
    assert report["exit_status"] == status
    assert report["error"].startswith(error)
    # The human-readable line still goes to stderr, without the usage text.
    assert err.endswith(f"error: {report['error']}\n")
    assert "usage:" not in err


def test_json_after_double_dash_is_not_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["explain", "--mode", "x", "--", "--json"], capsys)
    assert code == 2
    assert out == ""
    assert "usage: ascend-graph explain" in err


def test_build_parser_keeps_argparse_error_behaviour(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["explain", "--mode", "x"])
    assert info.value.code == 2
    assert "ascend-graph explain: error: argument --mode" in capsys.readouterr().err
