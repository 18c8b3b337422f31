"""The demo: its arguments are checked against the model's limits, and its report is honest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from ascend_aclgraph.demo import main


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # main() sets torch's thread count for its timings; do not leak it into other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_demo(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(["--backend", "cpu", *argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # The KV cache is 16 requests x 64 positions: past that the model indexed out of range.
        (
            ["--requests", "17"],
            "argument --requests: must be at most 16 (the model's KV cache holds 16 requests), "
            "got 17",
        ),
        (
            ["--tokens", "65"],
            "argument --tokens: must be at most 64 (the model's KV cache holds 64 positions), "
            "got 65",
        ),
        (["--requests", "0"], "argument --requests: must be at least 1, got 0"),
        (["--tokens", "-3"], "argument --tokens: must be at least 1, got -3"),
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--tokens", "many"], "argument --tokens: expected an integer, got 'many'"),
    ],
)
def test_out_of_range_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_demo(argv, capsys)
    assert code == 2
    assert out == ""
    assert f"error: {message}\n" in err


def test_help_shows_the_limits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_demo(["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())  # argparse wraps the help text
    assert "batch size, 1 to 16 (the model's KV cache holds 16 requests)" in text
    assert "above 8 every step runs eagerly" in text
    assert "per request, 1 to 64 (the model's KV cache holds 64 positions" in text


def test_largest_allowed_values_run(capsys: pytest.CaptureFixture[str]) -> None:
    # The limits are inclusive: a full cache (16 requests, 64 positions) is fine.
    code, out, err = run_demo(["--requests", "16", "--tokens", "2"], capsys)
    assert code == 0, err
    assert "tokens equal: 32/32" in out
    code, out, err = run_demo(["--requests", "1", "--tokens", "64"], capsys)
    assert code == 0, err
    assert "tokens equal: 64/64" in out


def test_batch_above_the_capture_sizes_claims_no_speed_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_demo(["--requests", "12", "--tokens", "3"], capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("median step:")]
    assert "the graph path replayed no graph (batch 12 is above the largest capture size 8)" in line
    assert "every step ran eagerly" in line
    assert "x)" not in line  # no "(1.23x)" ratio of two eager timings
    assert "'replays': 0" in out


def test_replayed_batch_reports_the_speed_up(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_demo(["--requests", "3", "--tokens", "3"], capsys)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("median step:")]
    assert line.startswith("median step: eager ")
    assert "graph " in line
    assert "x), 1 thread(s)" in line
    assert "'replays': 3" in out
