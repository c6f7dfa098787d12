"""The README's Python examples run as written, on each installed backend."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
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
    backend_name: str,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = {"torch": "pytorch", "jax": "jax"}[backend_name]
    monkeypatch.chdir(tmp_path)  # the quickstart saves a file
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(_blocks()[key], f"README.md ({key})", "exec"), namespace)
    influences = namespace["influences"]
    assert tuple(influences.shape) == (20, 300)
    assert "(20, 300)" in capsys.readouterr().out.replace(
        "torch.Size([20, 300])", "(20, 300)"
    )
    # What the quickstart shows holds: self-influence is the diagonal, top_k
    # sorts, the margin changes the answer, the loaded object answers the same.
    inf, train, test = namespace["inf"], namespace["train"], namespace["test"]
    scores = np.asarray(influences, dtype=np.float64)
    diagonal = np.diag(np.asarray(inf.influences(train, train), dtype=np.float64))
    self_influences = np.asarray(namespace["self_influences"], dtype=np.float64)
    np.testing.assert_allclose(self_influences, diagonal, rtol=1e-3, atol=1e-6)
    values = np.asarray(namespace["values"], dtype=np.float64)
    assert values.shape == (20, 5)
    largest = key == "pytorch"
    expected = np.sort(scores, axis=1)[:, ::-1] if largest else np.sort(scores, axis=1)
    np.testing.assert_allclose(values, expected[:, :5], rtol=1e-6)
    margins = np.asarray(namespace["margins"], dtype=np.float64)
    assert margins.shape == (20, 300) and not np.allclose(margins, scores)
    again = namespace["again"].influences(test, train)
    np.testing.assert_allclose(np.asarray(again), scores, rtol=1e-5, atol=1e-7)


def _scale_out_block() -> str:
    text = README.read_text()
    section = text.split("## Scale out: dask, resumable results, `influx run`", 1)[1]
    section = section.split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, "the scale-out section has no python block"
    return match.group(1)


def test_readme_scale_out_runs(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The distributed run of the README, on its 2-worker LocalCluster (torch)."""
    pytest.importorskip("torch")
    pytest.importorskip("distributed")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(_scale_out_block(), "README.md (scale out)", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "(20, 2000)" in printed and "[]" in printed
    # The store equals the same Influence queried in this process, without dask.
    influx, inf = namespace["influx"], namespace["inf"]
    train, test = namespace["train"], namespace["test"]
    expected = np.asarray(inf.influences(test, train), dtype=np.float64)
    stored = influx.open_results("scores.zarr")
    np.testing.assert_allclose(stored.scores[...], expected, rtol=1e-10, atol=1e-12)
    diagonal = np.asarray(inf.self_influence(train), dtype=np.float64)
    np.testing.assert_allclose(
        influx.open_results("self.zarr").scores[...], diagonal, rtol=1e-10, atol=1e-12
    )
    order = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(np.asarray(namespace["indices"]), order)
