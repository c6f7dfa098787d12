"""Every ```python block of every docs page runs, in order, like a notebook.

The blocks of one page share one namespace and run in a temporary folder. A
page is skipped when a module it imports is not installed (torch and jax
count as installed only when selected with ``--backend``, see conftest.py),
so the torch pages run in the torch session, the JAX pages in the JAX ones
and a page without a framework everywhere. A block whose first line is
``# docs: no-run`` (a cluster address, say) is compiled but not executed.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ALL_BACKENDS, selected_backends

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))

#: A fenced block at the start of a line: ```python or ```py, with attributes.
FENCE = re.compile(r"^```(?:python|py)\b[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
#: Any python fence, indented or not (those the runner would not see).
ANY_FENCE = re.compile(r"^[ \t>]*```(?:python|py)\b", re.M)
NO_RUN = "# docs: no-run"


def _blocks(page: str) -> list[str]:
    return FENCE.findall((DOCS / page).read_text())


def _imported(source: str) -> set[str]:
    """Top-level names of the modules a block imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _runnable(block: str) -> bool:
    return block.lstrip().splitlines()[0].strip() != NO_RUN if block.strip() else False


def _missing(page: str, config: pytest.Config) -> list[str]:
    """Modules the page's runnable blocks import that are not available."""
    needed = set().union(*(_imported(b) for b in _blocks(page) if _runnable(b)))
    selected = set(selected_backends(config))
    missing = [
        name
        for name in sorted(needed)
        if (name in ALL_BACKENDS and name not in selected)
        or importlib.util.find_spec(name) is None
    ]
    return missing


def test_pages_found() -> None:
    assert "index.md" in PAGES and "quickstart-pytorch.md" in PAGES


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_is_seen(page: str) -> None:
    """No python block hides from the runner (indented, in a list or quote)."""
    text = (DOCS / page).read_text()
    assert len(ANY_FENCE.findall(text)) == len(_blocks(page)), (
        f"docs/{page}: a ```python block is indented; the runner only executes "
        "blocks that start at the beginning of a line"
    )
    for index, block in enumerate(_blocks(page)):
        compile(block, f"docs/{page} block {index + 1}", "exec")  # syntax, always


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)])
def test_page_runs(
    page: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = _missing(page, request.config)
    if missing:
        pytest.skip(f"docs/{page} needs {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)  # pages write files (saved state, figures)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # figures without a display
    namespace: dict[str, Any] = {"__name__": f"docs_{Path(page).stem}"}
    try:
        for index, block in enumerate(_blocks(page)):
            if not _runnable(block):
                continue
            code = compile(block, f"docs/{page} block {index + 1}", "exec")
            exec(code, namespace)
    finally:
        if "matplotlib.pyplot" in sys.modules:  # the page's figures
            sys.modules["matplotlib.pyplot"].close("all")


def test_runner_rules() -> None:
    """What the runner executes, skips and detects, on a made-up page."""
    page = (
        "text\n```python\nimport torch.nn as nn\nfrom jax import numpy\n```\n"
        "```python\n# docs: no-run\nclient = Client('tcp://cluster:8786')\n```\n"
        "```bash\npip install influx\n```\n"
        "- a list\n\n  ```python\n  hidden = 1\n  ```\n"
    )
    blocks = FENCE.findall(page)
    assert len(blocks) == 2 and len(ANY_FENCE.findall(page)) == 3
    assert [_runnable(block) for block in blocks] == [True, False]
    assert _imported(blocks[0]) == {"torch", "jax"}
    assert _imported("from . import x\nimport influx.plot") == {"influx"}


def test_quoted_benchmark_numbers_match() -> None:
    """The tables of "Choosing a method" quote docs/benchmarks.md verbatim."""
    text = (DOCS / "choosing-a-method.md").read_text()
    section = text.split("## Measured", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    numbers = re.findall(r"\d[\d,]*(?:\.\d+)?(?:e-\d+)?", "\n".join(rows))
    assert len(numbers) > 40
    benchmarks = (DOCS / "benchmarks.md").read_text()
    stale = sorted({number for number in numbers if number not in benchmarks})
    assert not stale, f"not in docs/benchmarks.md (rerun?): {stale}"
