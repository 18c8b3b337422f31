"""Every example in the docs runs, and every output the docs show is what the code prints.

Pages: ``docs/*.md``, the root ``README.md`` and ``packages/*/README.md``. Each fenced block of a
page is handled by its language, in page order:

``python``
    Executed. The blocks of one page run in one namespace, top to bottom, so a later block can
    use what an earlier one defined. Each block runs as a file named ``example.py`` with lines
    counted from the block's first line, so that messages naming the user's file and line (a
    ``CaptureError``) read the same in the docs as on a user's machine; a failure names the
    page and line of the block.
``text`` (or no language)
    Something the docs show, so it must be checked or explicitly exempt:

    - preceded by ``<!-- docs-test: output -->``: the exact stdout of the python block right
      before it (no normalisation: an example whose output has timings must leave them out);
    - starting with ``$ ascend-graph ...``: a transcript of ``ascend-graph`` commands, each a
      ``$`` line, what it prints (stdout, then stderr) and ``[exit N]``. The commands run
      in-process through :func:`ascend_aclgraph.cli.main`, with ``COLUMNS=80`` so that argparse
      wraps its usage text the way the transcript shows it.
``bash``, ``sh``, ``shell``
    Not run (installation and nox commands).
``{directive}``
    Sphinx/MyST directives (a toctree), not code.

A block that cannot be checked here is exempted by ``<!-- docs-test: skip (reason) -->`` on the
line right above its fence; :func:`test_exempt_block` reports each one as skipped with its
reason. Any other language, or an unmarked block that is neither output nor a transcript, fails
the page, so a new kind of block cannot go unchecked by accident.

The shown outputs are recorded on the cpu backend (the CPU twin's pool sizes, say), so the pages
run in the ``--backend=cpu`` session only; other sessions skip them and say so.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ascend_aclgraph.backends import GraphBackend
from ascend_aclgraph.cli import main as ascend_graph_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "README.md",
    *sorted((ROOT / "packages").glob("*/README.md")),
]
EXAMPLE_FILE = "example.py"

_FENCE = re.compile(r"^(`{3,})(.*)$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
_SKIP = re.compile(r"^skip \((.+)\)$")
_EXIT = re.compile(r"^\[exit (\d+)\]$")
_OUTPUT_LANGS = {"text", ""}
_UNRUN_LANGS = {"bash", "sh", "shell"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None  # the docs-test marker on the line above the fence, if any

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        match = _SKIP.match(self.marker or "")
        return match.group(1) if match else None


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the marker right above each."""
    lines = page.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            # An indented fence (inside a list item, say) would not be seen as a block here.
            if lines[i].lstrip().startswith("```"):
                where = Block(page, i + 1, "", "", None).where
                raise AssertionError(f"{where}: indented code fence; start fences at column 0")
            i += 1
            continue
        fence, lang = opening.group(1), opening.group(2).strip()
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != fence:
            end += 1
        if end == len(lines):
            raise AssertionError(f"{Block(page, i + 1, lang, '', None).where}: unclosed code block")
        body = "".join(line + "\n" for line in lines[i + 1 : end])
        blocks.append(Block(page, i + 1, lang, body, marker.group(1) if marker else None))
        i = end + 1
    return blocks


def _check_marker(block: Block) -> None:
    if block.marker == "output" and block.lang not in _OUTPUT_LANGS:
        raise AssertionError(f"{block.where}: 'docs-test: output' marks a text block only")
    if block.marker is None or block.marker == "output" or block.skip_reason:
        return
    raise AssertionError(
        f"{block.where}: unknown marker 'docs-test: {block.marker}'; accepted: "
        "'docs-test: output', 'docs-test: skip (reason)'"
    )


def _run_python(block: Block, namespace: dict[str, object]) -> str:
    """Execute one python block in ``namespace``; returns what it printed on stdout."""
    # Registered so that tracebacks (and torch.compile) can show the example's source lines.
    linecache.cache[EXAMPLE_FILE] = (len(block.text), None, block.text.splitlines(True), "")
    code = compile(block.text, EXAMPLE_FILE, "exec")
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
    except Exception as exc:
        raise AssertionError(
            f"{block.where}: the example raised {type(exc).__name__}: {exc}\n"
            f"it printed:\n{stdout.getvalue()}"
        ) from exc
    return stdout.getvalue()


def parse_transcript(block: Block) -> list[tuple[str, str, int]]:
    """``(command, expected output, expected exit status)`` for each ``$`` command."""
    lines = block.text.splitlines()
    commands = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        assert lines[i].startswith("$ "), f"{block.where}: expected a '$ command' line: {lines[i]}"
        command, output = lines[i][2:], []
        i += 1
        while i < len(lines) and not _EXIT.match(lines[i]):
            output.append(lines[i])
            i += 1
        assert i < len(lines), f"{block.where}: '$ {command}' has no '[exit N]' line"
        status = _EXIT.match(lines[i])
        assert status is not None
        commands.append((command, "".join(line + "\n" for line in output), int(status.group(1))))
        i += 1
    return commands


def _run_transcript(block: Block) -> None:
    for command, expected, expected_status in parse_transcript(block):
        argv = shlex.split(command)
        assert argv[0] == "ascend-graph", f"{block.where}: cannot run {argv[0]!r} here"
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = ascend_graph_main(argv[1:])
            except SystemExit as exc:  # --help exits from inside argparse
                status = exc.code if isinstance(exc.code, int) else 1
        shown = stdout.getvalue() + stderr.getvalue()
        assert shown == expected, f"{block.where}: output of '$ {command}' differs from the docs"
        assert status == expected_status, f"{block.where}: exit status of '$ {command}'"


def run_page(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    previous: tuple[Block, str] | None = None  # the last python block run, and its stdout
    for block in parse_blocks(page):
        _check_marker(block)
        if block.lang in _UNRUN_LANGS or block.lang.startswith("{"):
            continue
        if block.skip_reason:
            previous = None  # an output block cannot belong to an example that did not run
            continue
        if block.lang == "python":
            previous = (block, _run_python(block, namespace))
        elif block.lang in _OUTPUT_LANGS and block.marker == "output":
            assert previous is not None, (
                f"{block.where}: an output block must follow the python example it shows"
            )
            example, printed = previous
            assert printed == block.text, (
                f"{block.where}: the docs show output that the example at {example.where} "
                "does not print"
            )
            previous = None
        elif block.lang in _OUTPUT_LANGS and block.text.startswith("$ ascend-graph "):
            # (Other "$ ..." commands, nox or pip, are not run: write them as bash blocks.)
            _run_transcript(block)
        elif block.lang in _OUTPUT_LANGS:
            raise AssertionError(
                f"{block.where}: a shown block that no test checks: mark it "
                "'<!-- docs-test: output -->' (the stdout of the python block before it), make it "
                "an '$ ascend-graph ...' transcript, or exempt it with "
                "'<!-- docs-test: skip (reason) -->'"
            )
        else:
            raise AssertionError(
                f"{block.where}: code block language {block.lang!r} is not handled by "
                "test_docs.py; accepted: python, text, bash/sh/shell, {directive}"
            )


@pytest.fixture
def cpu_session(backend: GraphBackend) -> None:
    if backend.name != "cpu":
        pytest.skip(
            f"the docs' outputs are recorded on the cpu backend; they are checked in the "
            f"--backend=cpu run, not in this --backend={backend.name} one"
        )


@pytest.fixture
def isolated_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # argparse wraps usage text to the terminal width; the transcripts show 80 columns.
    monkeypatch.setenv("COLUMNS", "80")
    # Pages compile the same model code; start each page with dynamo's caches empty so earlier
    # pages (or tests) cannot push it into its recompile limit, and leave them empty after.
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    yield None
    torch.set_num_threads(threads)
    torch._dynamo.reset()


@pytest.mark.usefixtures("cpu_session", "isolated_torch")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page(page: Path) -> None:
    run_page(page)


EXEMPT = [block for page in PAGES for block in parse_blocks(page) if block.skip_reason]


@pytest.mark.parametrize("block", EXEMPT, ids=lambda b: b.where)
def test_exempt_block(block: Block) -> None:
    pytest.skip(f"{block.where}: docs-test: skip ({block.skip_reason})")


# ---- The checker itself: each rule must be able to fail. ----------------------------------------


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path / "page.md"


def _write(page: Path, text: str) -> Path:
    page.write_text(text)
    return page


def _cli_output(argv: list[str]) -> str:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        ascend_graph_main(argv)
    return stdout.getvalue() + stderr.getvalue()


def test_checker_compares_shown_output(scratch: Path) -> None:
    ok = "```python\nprint(6 * 7)\n```\n<!-- docs-test: output -->\n```text\n42\n```\n"
    run_page(_write(scratch, ok))
    with pytest.raises(AssertionError, match=r"page\.md:5: the docs show output"):
        run_page(_write(scratch, ok.replace("42", "41")))


def test_checker_runs_blocks_in_one_namespace_and_reports_failures(scratch: Path) -> None:
    run_page(_write(scratch, "```python\nx = 2\n```\n\n```python\nprint(x)\n```\n"))
    with pytest.raises(AssertionError, match=r"page\.md:1: the example raised NameError"):
        run_page(_write(scratch, "```python\nstep(tokens)\n```\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("```text\nsome output\n```\n", "a shown block that no test checks"),
        ("```\nsome output\n```\n", "a shown block that no test checks"),
        ("```json\n{}\n```\n", "language 'json' is not handled"),
        ("<!-- docs-test: outptu -->\n```python\npass\n```\n", "unknown marker"),
        ("<!-- docs-test: skip -->\n```python\npass\n```\n", "unknown marker"),
        ("<!-- docs-test: output -->\n```text\n1\n```\n", "must follow the python example"),
        (
            "<!-- docs-test: skip (no NPU) -->\n```python\nprint(1)\n```\n"
            "<!-- docs-test: output -->\n```text\n1\n```\n",
            "must follow the python example",
        ),
        ("```python\nprint(1)\n", "unclosed code block"),
        ("- item\n\n  ```python\n  1 / 0\n  ```\n", "indented code fence"),
        ("<!-- docs-test: output -->\n```python\npass\n```\n", "marks a text block only"),
        ("```text\n$ ascend-graph explain\n```\n", r"has no '\[exit N\]' line"),
        ("```text\n$ nox -s demo\n[exit 0]\n```\n", "a shown block that no test checks"),
    ],
)
def test_checker_rejects_unchecked_blocks(scratch: Path, text: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        run_page(_write(scratch, text))


def test_checker_skips_only_marked_blocks(scratch: Path) -> None:
    page = _write(scratch, "<!-- docs-test: skip (needs an NPU) -->\n```python\n1 / 0\n```\n")
    run_page(page)  # not executed, else ZeroDivisionError
    (block,) = parse_blocks(page)
    assert block.skip_reason == "needs an NPU"


def test_checker_runs_transcripts(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    argv = ["explain", "--mode", "fullest", "--json"]
    shown = _cli_output(argv)  # JSON on stdout, then the message on stderr
    assert shown.startswith("{")
    assert "error: argument --mode" in shown

    def transcript(command: list[str], status: int) -> str:
        return f"```text\n$ ascend-graph {' '.join(command)}\n{shown}[exit {status}]\n```\n"

    run_page(_write(scratch, transcript(argv, 2)))
    with pytest.raises(AssertionError, match=r"exit status of '\$ ascend-graph explain"):
        run_page(_write(scratch, transcript(argv, 0)))
    other = ["explain", "--mode", "fuller", "--json"]
    with pytest.raises(AssertionError, match=r"output of '\$ ascend-graph explain --mode fuller"):
        run_page(_write(scratch, transcript(other, 2)))
