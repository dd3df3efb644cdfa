"""Every ```python block of README.md and docs/**/*.md runs as written (CPU, small tensors).

The docstring examples (``>>>``) of the public modules run too, with doctest.

The blocks of one page run in order in one namespace (a page may define its tensors in an
earlier block and use them in a later one), as a reader who pastes them one after another
would. A block whose info string is ``python no-run`` is skipped; there must be few of them,
each with the reason in the page's text. A block that raises fails the page's test, and the
message names the file and the block's first line.
"""
from __future__ import annotations

import doctest
import importlib
import pathlib
import re
import warnings

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ["fused_losses", "fused_losses.functional", "fused_losses.nn", "fused_losses.compat",
                  "fused_losses.reference", "fused_losses.distributed"]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# A top-level backtick fence: its info string (language and flags) holds no backtick (CommonMark).
FENCE = re.compile(r"^```(?!`)([^`]*)$")


def python_blocks(text: str):
    """(first line number, info string, source) of each top-level fenced ```python block."""
    blocks, inside, start, info, body = [], False, 0, "", []
    for number, line in enumerate(text.splitlines(), 1):
        if not inside:
            match = FENCE.match(line)
            if match:
                inside, start, info, body = True, number + 1, match.group(1).strip(), []
        elif line.rstrip() == "```":
            inside = False
            if info.split()[:1] == ["python"]:
                blocks.append((start, info, "\n".join(body) + "\n"))
        else:
            body.append(line)
    assert not inside, f"unclosed code fence opened at line {start}"
    return blocks


def run_page(path: pathlib.Path, text: str) -> int:
    """Runs the page's python blocks in order in one namespace; returns how many ran."""
    namespace = {"__name__": f"docs_{path.stem}"}
    ran = 0
    torch.manual_seed(0)
    for line, info, source in python_blocks(text):
        if "no-run" in info.split()[1:]:
            continue
        code = compile(source, f"{path}:{line}", "exec")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the pages show warnings on purpose (bad input)
                exec(code, namespace)
        except Exception as exc:  # the page's test fails, naming the block
            raise AssertionError(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}, "
                                 f"the python block starting at line {line} raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_run(page):
    run_page(page, page.read_text())


def test_pages_have_runnable_blocks():
    counts = {p.name: sum("no-run" not in info for _, info, _ in python_blocks(p.read_text())) for p in PAGES}
    assert counts["README.md"] >= 1, counts
    assert sum(counts.values()) >= 10, counts
    no_run = [(p.name, line) for p in PAGES for line, info, _ in python_blocks(p.read_text()) if "no-run" in info]
    assert len(no_run) <= 3, f"too many python no-run blocks: {no_run}"


def test_a_raising_block_fails(tmp_path):
    page = tmp_path / "page.md"
    text = "# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2, 'x is 1'\n```\n"
    with pytest.raises(AssertionError, match=r"line 10 raised AssertionError: x is 1"):
        run_page(page, text)
    # the namespace is shared in order, and no-run blocks are skipped
    assert run_page(page, "```python\ny = 2\n```\n```python no-run\nraise SystemError\n```\n"
                          "```python\nassert y == 2\n```\n") == 2


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{name}: no docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (output above)"
