"""benchmarks/gpu_check.py: the GPU check's plumbing, proven on the CPU.

The script is meant for a GPU machine we rarely have, so its first real run must not be its
first run: the dry run goes through every section (pytest runs, benchmark subprocesses, the time
guard, the report) on the cpu backend, and the failure paths are driven on purpose.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _sections_table(report: str) -> dict[str, str]:
    """{section name: status} from the report's Sections table."""
    body = report.split("## Sections", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in body.splitlines()[2:] if line.startswith("|")]
    return {name.strip(): status.strip() for name, status in rows}


def test_dry_run_runs_every_section_and_writes_the_table(tmp_path: Path) -> None:
    proc = _run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    reports = sorted(tmp_path.glob("gpu_check-*.md"))
    assert len(reports) == 1
    report = reports[0].read_text()
    assert report.strip() in proc.stdout  # the same markdown goes to stdout
    assert report.startswith("# GPU check: PASS (dry run: plumbing only)")
    assert "DRY RUN on the CPU" in report

    statuses = _sections_table(report)
    assert list(statuses) == [
        "tests: ascend-aclgraph conformance (cpu, dry run)",
        "tests: ascend-npugraph-ex kernels (cpu, dry run)",
        "bench: runtime overhead",
        "bench: fused ops vs copy",
        "bench: decode step",
    ]
    assert set(statuses.values()) == {"passed"}

    for heading in (
        "## Runtime overhead per call",
        "## Fused ops vs a device copy of the same bytes",
        "## Decode step",
        "## GPU targets",
    ):
        assert heading in report
    # Every fused op has a row; the decode table has a row per dry-run batch size.
    for op in ("rms_norm", "add_rms_norm", "swiglu", "rotary", "qk_norm_rope"):
        assert f"\n| {op} |" in report
    assert "\n| 1 |" in report
    assert "\n| 2 |" in report
    # The GPU targets are printed beside the numbers but never judged on a CPU.
    assert report.count("not judged (cpu dry run)") == 4
    assert "**no**" not in report
    assert "| yes |" not in report

    raw = json.loads(reports[0].with_suffix(".json").read_text())
    benches = [s for s in raw["sections"] if s["result"] is not None]
    assert len(benches) == 3
    for section in benches:
        assert section["result"]["errors"] == []
        assert section["result"]["rows"], section["section"]
        numbers = section["result"]["data"]
        assert numbers, section["section"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_without_cuda_it_says_so_runs_nothing_and_fails(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path), timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert "--dry-run" in proc.stderr
    assert not list(tmp_path.iterdir())  # no report that could pass for a GPU run


def test_time_guard_skips_sections_with_the_reason_and_unrun_tests_fail(tmp_path: Path) -> None:
    proc = _run("--dry-run", "--time-limit", "1", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 1, proc.stdout[-4000:]
    report = next(tmp_path.glob("gpu_check-*.md")).read_text()
    assert report.startswith("# GPU check: FAIL")
    statuses = _sections_table(report)
    assert len(statuses) == 5
    assert set(statuses.values()) == {"skipped"}
    assert report.count("time guard:") == 5


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return _load_gpu_check()


def _tests_section(gpu_check: ModuleType, tmp_path: Path, source: str) -> Any:
    test_file = tmp_path / "test_probe.py"
    test_file.write_text(textwrap.dedent(source))
    return gpu_check.Section("tests: probe", "tests", 0, 300, (str(test_file),))


@pytest.mark.parametrize(
    ("source", "gpu_status", "dry_status"),
    [
        ("def test_ok():\n    pass\n", "passed", "passed"),
        ("def test_bad():\n    assert 1 == 2\n", "failed", "failed"),
        ("import pytest\npytestmark = pytest.mark.skip('no tests here')\n"
         "def test_x():\n    pass\n", "failed", "failed"),
        # The conformance conftest's reason when the device is missing: on the GPU machine
        # that means the GPU tests did not run, which is a failure of the check.
        ("import pytest\ndef test_ok():\n    pass\n"
         "def test_gpu():\n    pytest.skip('cuda backend unavailable here: no GPU')\n",
         "failed", "passed"),
    ],
    ids=["pass", "fail", "nothing-ran", "gpu-test-skipped"],
)  # fmt: skip
def test_test_sections_fail_on_failures_empty_runs_and_skipped_gpu_tests(
    gpu_check: ModuleType, tmp_path: Path, source: str, gpu_status: str, dry_status: str
) -> None:
    section = _tests_section(gpu_check, tmp_path, source)
    env = gpu_check.child_env(dry_run=False)
    for dry_run, want in ((False, gpu_status), (True, dry_status)):
        outcome = gpu_check.run_tests(section, 300, env, dry_run)
        assert outcome.status == want, (dry_run, outcome.detail)
        assert outcome.fatal == (want != "passed")


def test_a_crashing_benchmark_section_is_a_failure(gpu_check: ModuleType) -> None:
    section = gpu_check.Section("bench: bogus", "bench", 0, 120, ("no-such-section",))
    outcome = gpu_check.run_bench(section, 120, gpu_check.child_env(dry_run=True), True)
    assert outcome.status == "error"
    assert "without a result" in outcome.detail
    assert outcome.fatal


def test_test_files_needing_an_absent_dependency_are_left_out_and_reported(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GPU machines have pytest but maybe not hypothesis: such files cannot even be collected.
    monkeypatch.setattr(gpu_check, "_OPTIONAL_TEST_DEPS", ("no_such_test_dependency",))
    (tmp_path / "test_needs_it.py").write_text(
        "import no_such_test_dependency\n\ndef test_x():\n    pass\n"
    )
    (tmp_path / "test_plain.py").write_text("def test_y():\n    pass\n")
    section = gpu_check.Section("tests: probe", "tests", 0, 300, (str(tmp_path),))
    outcome = gpu_check.run_tests(section, 300, gpu_check.child_env(dry_run=False), False)
    assert outcome.status == "passed", outcome.detail
    assert "1 passed" in outcome.detail
    assert "1 file(s) not run" in outcome.detail
    assert any(
        s.startswith("NOT RUN:") and "test_needs_it.py" in s and "no_such_test_dependency" in s
        for s in outcome.skips
    )
    verdict = gpu_check.verdict([outcome], dry_run=False)
    assert verdict.startswith("PASS, but some test files were not run")
