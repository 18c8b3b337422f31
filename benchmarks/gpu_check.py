"""GPU check: the CUDA tests and GPU benchmarks of the stack, on a machine with nothing to install.

    python3 benchmarks/gpu_check.py            # from the repository root (or: nox -s gpu)
    python3 benchmarks/gpu_check.py --dry-run  # CPU self-check of this script's plumbing

Made for a GPU machine with a CUDA build of torch, triton and pytest preinstalled and no
network: it installs nothing and puts the packages on the path from source
(``packages/*/src``). In order, under one time limit (``--time-limit``, default 450 s):

1. preflight: torch, the CUDA device, triton, pytest; without a CUDA device it says so and
   exits 2 having run nothing (``--dry-run`` is the CPU mode, and says so everywhere);
2. tests: ascend-aclgraph's conformance suite on the cuda backend (``--backend=cuda``, the
   tests that run on it: ``-k cuda``) and ascend-npugraph-ex's CUDA kernel tests (``-m cuda``).
   A cuda test skipped for want of the device or of triton counts as a failure here;
3. benchmarks (bench_gpu.py, one subprocess per section with a hard timeout): runtime
   overhead vs raw ``torch.cuda.CUDAGraph`` replay, fused Triton ops vs a device copy, a Qwen3
   decode step vs ``torch.compile(mode="reduce-overhead")`` and eager;
4. report: a markdown table on stdout and in ``bench-results/gpu/gpu_check-<time>.md`` (and
   ``.json``), with the GPU targets beside the numbers.

Each section needs a minimum time to start; one that cannot start within the limit is skipped
with the reason. Exit status: 0 when every test section passed and no benchmark failed; 1 when a
test failed, errored, did not run or timed out, or a benchmark section crashed, timed out or
computed a wrong result; 2 when there is no CUDA device (and no ``--dry-run``). A missed
performance target or a benchmark section skipped by the time guard is reported, not a failure:
benchmarks are not timed asserts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_SRCS = sorted((ROOT / "packages").glob("*/src"))
BENCH = Path(__file__).resolve().parent / "bench_gpu.py"

# Skip reasons that mean "the GPU part did not run" (the conformance conftest's "<name> backend
# unavailable here", npugraph_ex's "needs a CUDA GPU", pytest.importorskip's triton message).
_NOT_RUN_SKIP = re.compile(r"unavailable here|needs a CUDA|needs? triton|could not import", re.I)
# Optional test dependencies that may be absent on a bare GPU machine; test files that import
# them at module level are left out, and the report says so.
_OPTIONAL_TEST_DEPS = ("hypothesis", "transformers")
_NOT_RUN = "NOT RUN:"


@dataclass(frozen=True)
class Section:
    name: str
    kind: str  # "tests" or "bench"
    min_seconds: float  # no start with less time left than this
    max_seconds: float  # hard timeout of its subprocess
    argv: tuple[str, ...] = ()  # pytest arguments, or the bench_gpu section name


@dataclass
class Outcome:
    section: Section
    status: str  # passed, failed, error, skipped, timeout
    seconds: float = 0.0
    detail: str = ""
    skips: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None  # a benchmark's JSON

    @property
    def fatal(self) -> bool:
        if self.section.kind == "tests":
            return self.status != "passed"
        return self.status in ("failed", "error", "timeout")


def sections(dry_run: bool) -> list[Section]:
    """What runs, in order. The dry run runs small CPU selections through the same plumbing."""
    acl = "packages/ascend-aclgraph/tests"
    nxt = "packages/ascend-npugraph-ex/tests"
    if dry_run:
        acl_argv: tuple[str, ...] = (f"{acl}/test_conformance.py", "--backend=cpu")
        nxt_argv: tuple[str, ...] = (f"{nxt}/test_ops.py", "-m", "not cuda", "-k", "cpu_kernel")
        acl_name = "tests: ascend-aclgraph conformance (cpu, dry run)"
        nxt_name = "tests: ascend-npugraph-ex kernels (cpu, dry run)"
    else:
        # ``-k cuda``: the tests that run on the cuda backend. The rest of the suite is the CPU
        # path, which CI runs on every change; this check spends its minutes on the GPU.
        acl_argv = (acl, "--backend=cuda", "-k", "cuda")
        nxt_argv = (nxt, "-m", "cuda")
        acl_name = "tests: ascend-aclgraph conformance (cuda)"
        nxt_name = "tests: ascend-npugraph-ex CUDA kernels"
    # Minimums to start: a rough floor of each section's run time on its machine. Maximums: the
    # hard timeouts; together with the global limit they keep the whole check under 8 minutes.
    scale = 0.5 if dry_run else 1.0
    benches = [  # (title, bench_gpu section, min seconds, max seconds)
        ("runtime overhead", "overhead", 15, 60),
        ("fused ops vs copy", "ops", 20, 90),
        ("decode step", "decode", 60, 240),
    ]
    return [
        Section(acl_name, "tests", min_seconds=60 * scale, max_seconds=240, argv=acl_argv),
        Section(nxt_name, "tests", min_seconds=30 * scale, max_seconds=180, argv=nxt_argv),
        *(
            Section(
                f"bench: {title}", "bench", min_seconds=lo * scale, max_seconds=hi, argv=(name,)
            )
            for title, name, lo, hi in benches
        ),
    ]


# ==== Environment ==============================================================================


def child_env(dry_run: bool) -> dict[str, str]:
    """The environment of every subprocess: packages from source, nothing installed."""
    env = dict(os.environ)
    paths = [str(p) for p in PACKAGE_SRCS]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONHASHSEED", "0")
    if dry_run:
        # The CPU self-check is about this script, not the C++ CPU kernels: skip their ~30 s
        # build. CPU timings on one thread, as every CPU benchmark of the repo.
        env.setdefault("ASCEND_NPUGRAPH_EX_NO_CPP", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def preflight(dry_run: bool) -> tuple[list[str], str | None]:
    """(lines describing the machine, the reason nothing can run or None)."""
    try:
        import torch
    except ImportError as exc:
        return [], f"torch does not import ({exc}); this check installs nothing"
    lines = [
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'no'})"
    ]
    for name in ("triton", "pytest", *_OPTIONAL_TEST_DEPS):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name}: not installed")
    sys.path[:0] = [str(p) for p in PACKAGE_SRCS]
    for name in ("ascend_aclgraph", "ascend_npugraph_ex"):
        try:
            module = __import__(name)
        except Exception as exc:  # the test sections will fail on it too; report, go on
            lines.append(f"{name}: import failed: {type(exc).__name__}: {exc}")
            continue
        lines.append(f"{name} from {Path(str(module.__file__)).parent}")
    if dry_run:
        lines.insert(
            0, "DRY RUN on the CPU: plumbing check only, no GPU number below means a thing"
        )
        return lines, None
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return lines, (
            "no CUDA device: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={visible}). This check needs an NVIDIA GPU and ran nothing; "
            "--dry-run exercises the script on the CPU."
        )
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    lines.insert(
        0,
        f"GPU: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)",
    )
    return lines, None


# ==== Tests ====================================================================================


def _modules_needing_missing_deps(argv: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(--ignore arguments, report lines) for test files importing an absent optional dep."""
    missing = [d for d in _OPTIONAL_TEST_DEPS if importlib.util.find_spec(d) is None]
    if not missing:
        return [], []
    ignores, lines = [], []
    for target in (ROOT / a for a in argv if (ROOT / a).exists()):
        files = [target] if target.is_file() else sorted(target.glob("test_*.py"))
        for path in files:
            source = path.read_text()
            for dep in missing:
                if re.search(rf"^(from|import) {dep}\b", source, re.M):
                    ignores.append(f"--ignore={path}")
                    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    lines.append(f"{_NOT_RUN} {shown} imports {dep}, absent here")
    return ignores, lines


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and skip reasons from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    skips: list[str] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("error") is not None:
            counts["errors"] += 1
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            skips.append(f"{name}: {skip.get('message', '')}")
        else:
            counts["passed"] += 1
    return {"counts": counts, "skips": skips}


def run_tests(section: Section, timeout: float, env: dict[str, str], dry_run: bool) -> Outcome:
    ignores, not_run = _modules_needing_missing_deps(section.argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *section.argv,
            *ignores,
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            return Outcome(
                section,
                "timeout",
                time.monotonic() - start,
                f"killed after {timeout:.0f} s: the tests did not finish",
                not_run,
            )
        seconds = time.monotonic() - start
        if not junit.exists():
            return Outcome(section, "error", seconds, f"pytest exited {rc} without a report")
        report = parse_junit(junit)
    counts, skips = report["counts"], report["skips"]
    detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    not_run_skips = [s for s in skips if _NOT_RUN_SKIP.search(s)]
    if rc == 5 or counts["passed"] == 0:
        status, detail = "failed", f"no test ran (pytest exit {rc}; {detail or 'nothing'})"
    elif rc != 0 or counts["failed"] or counts["errors"]:
        status = "failed"
        detail += f" (pytest exit {rc})" if rc not in (0, 1) else ""
    elif not_run_skips and not dry_run:
        status = "failed"
        detail += f"; {len(not_run_skips)} GPU test(s) skipped for want of the device or triton"
    else:
        status = "passed"
    if not_run:
        detail += f"; {len(not_run)} file(s) not run (missing optional test deps)"
    return Outcome(section, status, seconds, detail, not_run + skips)


# ==== Benchmarks ===============================================================================


def run_bench(section: Section, timeout: float, env: dict[str, str], dry_run: bool) -> Outcome:
    name = section.argv[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        # The section stops starting new work a little before the hard kill.
        budget = max(timeout - 15, timeout * 0.8)
        cmd = [
            sys.executable,
            str(BENCH),
            "--section",
            name,
            "--json",
            str(out),
            "--seconds",
            f"{budget:.0f}",
            *(["--dry-run"] if dry_run else []),
        ]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        start = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            return Outcome(
                section, "timeout", time.monotonic() - start, f"killed after {timeout:.0f} s"
            )
        seconds = time.monotonic() - start
        if not out.exists():
            return Outcome(section, "error", seconds, f"exited {rc} without a result")
        result = json.loads(out.read_text())
    errors = result.get("errors", [])
    status = "failed" if errors or rc != 0 else "passed"
    detail = "; ".join(errors) if errors else f"{len(result.get('rows', []))} row(s)"
    return Outcome(section, status, seconds, detail, result=result)


# ==== Report ===================================================================================


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return lines


def verdict(outcomes: list[Outcome], dry_run: bool) -> str:
    if any(o.fatal for o in outcomes):
        return "FAIL"
    if any(o.status == "skipped" for o in outcomes):
        return "INCOMPLETE (tests passed; some benchmarks skipped by the time guard)"
    if any(s.startswith(_NOT_RUN) for o in outcomes for s in o.skips):
        return "PASS, but some test files were not run (missing test dependencies; see below)"
    return "PASS (dry run: plumbing only)" if dry_run else "PASS"


def render(
    machine: list[str], outcomes: list[Outcome], total_s: float, limit_s: float, result: str
) -> str:
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [f"# GPU check: {result}", ""]
    lines += [f"- {line}" for line in machine]
    lines += [f"- {stamp}; {total_s:.0f} s of the {limit_s:.0f} s limit", ""]
    lines += ["## Sections", ""]
    lines += _md_table(
        ["section", "status", "s", "detail"],
        [[o.section.name, o.status, f"{o.seconds:.1f}", o.detail] for o in outcomes],
    )
    listed = [(o.section.name, s) for o in outcomes for s in o.skips]
    if listed:
        lines += ["", "Skipped or not run:", ""]
        lines += [f"- {name}: {text}" for name, text in listed]
    targets: list[dict[str, Any]] = []
    for o in outcomes:
        if not o.result:
            continue
        res = o.result
        lines += ["", f"## {res.get('title', o.section.name)}", ""]
        if res.get("rows"):
            lines += _md_table(res["columns"], res["rows"])
        for note in res.get("notes", []):
            lines += ["", note]
        for error in res.get("errors", []):
            lines += ["", f"**ERROR**: {error}"]
        targets += res.get("targets", [])
    if targets:
        lines += ["", "## GPU targets", ""]
        met = {True: "yes", False: "**no**", None: "not judged (cpu dry run)"}
        lines += _md_table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], met[t["met"]]] for t in targets],
        )
    return "\n".join(lines) + "\n"


# ==== Main =====================================================================================


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU self-check of the plumbing")
    parser.add_argument(
        "--out", type=Path, default=None, help="default bench-results/gpu[-dry-run]"
    )
    parser.add_argument("--time-limit", type=float, default=450.0, help="seconds for everything")
    parser.add_argument(
        "--only",
        default="",
        help="comma list of section kinds or bench names to run (tests, "
        "bench, overhead, ops, decode); default all",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_limit
    out_dir = args.out or ROOT / "bench-results" / ("gpu-dry-run" if args.dry_run else "gpu")

    machine, reason = preflight(args.dry_run)
    print("\n".join(machine), flush=True)
    if reason:
        print(f"\ngpu_check: {reason}", file=sys.stderr, flush=True)
        return 2

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    env = child_env(args.dry_run)
    outcomes: list[Outcome] = []
    for section in sections(args.dry_run):
        if only and not ({section.kind, *section.argv[:1]} & only):
            continue
        left = deadline - time.monotonic()
        if left < section.min_seconds:
            why = (
                f"time guard: {left:.0f} s left of {args.time_limit:.0f}, "
                f"needs {section.min_seconds:.0f}"
            )
            print(f"\n{section.name}: skipped ({why})", flush=True)
            outcomes.append(Outcome(section, "skipped", 0.0, why))
            continue
        timeout = min(section.max_seconds, left)
        runner = run_tests if section.kind == "tests" else run_bench
        outcome = runner(section, timeout, env, args.dry_run)
        print(f"{section.name}: {outcome.status} in {outcome.seconds:.1f} s; {outcome.detail}")
        outcomes.append(outcome)

    result = verdict(outcomes, args.dry_run)
    report = render(machine, outcomes, time.monotonic() - start, args.time_limit, result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{stem}.md").write_text(report)
    raw = [
        {
            "section": o.section.name,
            "status": o.status,
            "seconds": o.seconds,
            "detail": o.detail,
            "skips": o.skips,
            "result": o.result,
        }
        for o in outcomes
    ]
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"machine": machine, "sections": raw}, indent=2)
    )
    print("\n" + report)
    print(f"report: {out_dir / stem}.md (and .json)")
    return 1 if result.startswith("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
