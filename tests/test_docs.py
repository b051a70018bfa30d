"""The documentation site builds, and every Python code block in ``docs/*.md`` runs.

Convention for code blocks in ``docs/*.md`` (the tests below enforce it):

* A fenced block tagged ```` ```python ```` is a *runnable example*: it is executed.
  The blocks of one page run in order in one fresh namespace (a later block may use the
  names an earlier one defined), in a temporary working directory, with the torch RNG
  state and snncompile's pass registry restored afterwards. Tracebacks point at the
  ``.md`` file and its line numbers.
* Anything that is not meant to run goes in a block with another tag: ```` ```text ````
  for output, formulas and pseudo-code, ```` ```bash ```` for shell commands,
  ```` ```pycon ```` for interactive sessions, ```` ```yaml ````, ...
* A ``python`` block that must *not* run (rare: e.g. it needs a GPU) is marked by an HTML
  comment on the line right before its fence: ``<!-- skip-test: why it cannot run here -->``.
  Nothing is skipped silently: each marked block becomes its own test that is reported as
  skipped with that reason (``pytest -rs`` lists them), a marker without a reason or not
  followed by a python block is an error, and ```` ```py ```` / ```` ```python3 ```` tags
  are rejected (so a typo cannot hide a block from the test).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CODE_PAGES = [*PAGES, REPO / "README.md"]  # the README's example runs too (it is not a site page)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*skip-test:(?P<reason>.*?)-->\s*$")
_PYTHON_ALIASES = {"py", "python3", "py3", "python3.11"}


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line number of the first code line
    lang: str
    code: str
    skip_reason: str | None  # from a preceding ``<!-- skip-test: ... -->``


def parse_blocks(page: Path) -> list[Block]:
    """Every fenced code block of ``page`` (markdown fences, any indentation)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        lang = m["info"].strip().split(" ")[0].lower() if m["info"].strip() else ""
        skip = None
        if i > 0 and (s := _SKIP.match(lines[i - 1])) is not None:
            skip = s["reason"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if (
                close is not None
                and close["ticks"][0] == ticks[0]
                and len(close["ticks"]) >= len(ticks)
                and not close["info"].strip()
            ):
                break
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        else:
            raise AssertionError(f"{page.name}:{i + 1}: code fence never closed")
        blocks.append(Block(page, i + 2, lang, "\n".join(body) + "\n", skip))
        i = j + 1
    return blocks


def _check_conventions(page: Path) -> None:
    lines = page.read_text(encoding="utf-8").splitlines()
    fence_lines = {b.line - 1 for b in parse_blocks(page)}  # 1-based line of each opening fence
    for number, line in enumerate(lines, 1):
        s = _SKIP.match(line)
        if s is None and "skip-test" in line:
            raise AssertionError(f"{page.name}:{number}: malformed skip-test marker {line!r}")
        if s is None:
            continue
        if not s["reason"].strip():
            raise AssertionError(f"{page.name}:{number}: skip-test marker without a reason")
        nxt = lines[number] if number < len(lines) else ""
        m = _FENCE.match(nxt)
        if number + 1 not in fence_lines or m is None or m["info"].strip().lower() != "python":
            raise AssertionError(
                f"{page.name}:{number}: a skip-test marker must be right before a ```python fence"
            )
    for block in parse_blocks(page):
        if block.lang in _PYTHON_ALIASES:
            raise AssertionError(
                f"{page.name}:{block.line - 1}: tag runnable examples ```python (or use "
                f"```text/```pycon for snippets that do not run), not ```{block.lang}"
            )


def _python_blocks(page: Path) -> list[Block]:
    return [b for b in parse_blocks(page) if b.lang == "python"]


def _skipped_blocks() -> list[Block]:
    return [b for page in PAGES for b in _python_blocks(page) if b.skip_reason is not None]


# -- the site -----------------------------------------------------------------------------------
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds: every nav entry exists, no broken links or images."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(REPO / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (site / "index.html").is_file()
    html = (site / "ann2snn" / "index.html").read_text(encoding="utf-8")
    for png in ("ann2snn_accuracy.png", "ann2snn_memory.png"):
        assert f'src="../{png}"' in html, f"{png} is not embedded in the ANN2SNN page"
        assert (site / png).is_file()


def test_every_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if p.name not in nav]
    assert not missing, f"pages not in the mkdocs.yml nav: {missing}"


# -- the code blocks ----------------------------------------------------------------------------
@pytest.mark.parametrize("page", CODE_PAGES, ids=[p.name for p in CODE_PAGES])
def test_docs_block_conventions(page: Path) -> None:
    _check_conventions(page)


@pytest.fixture
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A temporary cwd; global state that examples may touch is restored afterwards."""
    from snncompile.passes import pipeline

    pipeline.import_builtin_passes()  # registered before the snapshot, so a restore keeps them
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    registry = {k: list(v) for k, v in pipeline._REGISTERED.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples are small; one thread is fastest on a busy machine
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(0)
        yield tmp_path
    torch.set_num_threads(threads)
    pipeline._REGISTERED.clear()
    pipeline._REGISTERED.update(registry)


@pytest.mark.parametrize("page", CODE_PAGES, ids=[p.name for p in CODE_PAGES])
def test_docs_python_blocks_run(page: Path, _isolated: Path) -> None:
    """The ```python blocks of one page run in order in one namespace."""
    blocks = [b for b in _python_blocks(page) if b.skip_reason is None]
    if not blocks:
        kinds = sorted({b.lang or "untagged" for b in parse_blocks(page)})
        pytest.skip(f"{page.name} has no ```python blocks (its blocks: {kinds or 'none'})")
    needs_sj = any(re.search(r"^\s*(from|import) spikingjelly", b.code, re.M) for b in blocks)
    if needs_sj and importlib.util.find_spec("spikingjelly") is None:
        pytest.skip(
            f"{page.name} runs SpikingJelly 2.0.0, which is not installed "
            "(pip install --no-deps spikingjelly==2.0.0; scripts/setup.sh does)"
        )
    namespace: dict = {"__name__": "__docs__", "__file__": str(page)}
    for block in blocks:
        # Pad with blank lines so tracebacks give the line number in the .md file.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), namespace)  # noqa: S102


_MARKED = _skipped_blocks()


@pytest.mark.parametrize(
    "block",
    _MARKED or [None],
    ids=[f"{b.page.name}:{b.line}" for b in _MARKED] or ["none-marked"],
)
def test_docs_marked_blocks(block: Block | None) -> None:
    """Blocks marked ``<!-- skip-test: reason -->`` are reported as skipped, with their reason."""
    if block is None:
        return  # no page marks a block: every python block runs
    compile(block.code, str(block.page), "exec")  # they must at least be valid Python
    pytest.skip(f"{block.page.name}:{block.line}: {block.skip_reason}")


def test_parser_sees_indented_and_marked_blocks(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n* item:\n\n  ```python\n  x = 1\n  ```\n\n<!-- skip-test: needs a GPU -->\n"
        "```python\ny = x\n```\n\n```text\nnot run\n```\n",
        encoding="utf-8",
    )
    blocks = parse_blocks(page)
    assert [(b.lang, b.code, b.skip_reason, b.line) for b in blocks] == [
        ("python", "x = 1\n", None, 6),
        ("python", "y = x\n", "needs a GPU", 11),
        ("text", "not run\n", None, 15),
    ]
    _check_conventions(page)
    (tmp_path / "bad.md").write_text("<!-- skip-test: -->\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="without a reason"):
        _check_conventions(tmp_path / "bad.md")
    (tmp_path / "py.md").write_text("```py\npass\n```\n")
    with pytest.raises(AssertionError, match="not ```py"):
        _check_conventions(tmp_path / "py.md")
