"""``on_capture_failure="eager"``: one report per runner, every failure counted."""

from __future__ import annotations

import logging
import warnings

import ascend_aclgraph as ag
import pytest
import torch
from ascend_aclgraph.graph_capture import CaptureFailures
from ascend_aclgraph.stats import GraphStats

LOGGER = "ascend_aclgraph.graph_capture"


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_eager_policy_reports_the_first_failure_once(caplog: pytest.LogCaptureFixture) -> None:
    stats = GraphStats()
    failures = CaptureFailures("eager", stats)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    # "always": a second warning must show up here, not be swallowed by the once-per-location
    # registry of the default filter.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in (8, 4, 2, 1):
            failures.handle(RuntimeError("host sync"), f"batch size {size}")

    assert stats.capture_failures == 4
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "graph capture of batch size 8 failed (host sync); it runs eagerly "
        "(on_capture_failure='eager'). Further failures are counted in stats."
    ]
    (warning,) = _records(caplog, logging.WARNING)
    assert "batch size 8" in warning.getMessage()
    assert "DEBUG" in warning.getMessage()  # says where the later failures went
    assert [r.getMessage() for r in _records(caplog, logging.DEBUG)] == [
        f"capture of batch size {size} failed, running it eagerly: host sync" for size in (4, 2, 1)
    ]


def test_each_runner_reports_its_own_first_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            CaptureFailures("eager", GraphStats()).handle(RuntimeError("boom"), "batch size 1")
    assert len([w for w in caught if w.category is RuntimeWarning]) == 2
    assert len(_records(caplog, logging.WARNING)) == 2


def test_raise_policy_neither_counts_nor_logs(caplog: pytest.LogCaptureFixture) -> None:
    stats = GraphStats()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with pytest.raises(ag.CaptureError, match="capture of batch size 2 failed: boom"):
        CaptureFailures("raise", stats).handle(RuntimeError("boom"), "batch size 2")
    assert stats.capture_failures == 0
    assert _records(caplog, logging.WARNING) == []


def test_capture_that_fails_at_every_size_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    def syncs(x: torch.Tensor) -> torch.Tensor:
        return x * x.max().item()  # a host sync: no size can be captured

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = ag.capture(
            syncs,
            (torch.randn(4, 2),),
            batch_sizes=[1, 2, 4],
            backend="cpu",
            on_capture_failure="eager",
            progress=False,
        )
    assert step.stats.capture_failures == 3
    assert len([w for w in caught if w.category is RuntimeWarning]) == 1
    assert len(_records(caplog, logging.WARNING)) == 1
    assert len(_records(caplog, logging.DEBUG)) == 2
    x = torch.randn(3, 2)
    assert torch.equal(step(x), x * x.max())  # runs eagerly, with the right answer
