"""The README's Python examples run as written, on each installed backend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> dict[str, str]:
    text = README.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    found = {}
    for section in sections:
        title = section.splitlines()[0] if section else ""
        match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
        if match and title.startswith("Quickstart: "):
            found[title.removeprefix("Quickstart: ").lower()] = match.group(1)
    return found


def test_readme_has_a_quickstart_per_backend() -> None:
    assert set(_blocks()) == {"pytorch", "jax"}


def test_readme_quickstart_runs(
    backend_name: str, capsys: pytest.CaptureFixture
) -> None:
    key = {"torch": "pytorch", "jax": "jax"}[backend_name]
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(_blocks()[key], f"README.md ({key})", "exec"), namespace)
    influences = namespace["influences"]
    assert tuple(influences.shape) == (20, 300)
    assert "(20, 300)" in capsys.readouterr().out.replace(
        "torch.Size([20, 300])", "(20, 300)"
    )
