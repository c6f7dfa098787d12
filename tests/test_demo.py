"""``influx demo``: the self-influence ranking, its hits and ``--plot``."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

import influx.cli
from influx.demo import TOP_SHARES, run_demo

SMALL = {"num_train": 40, "num_test": 6, "num_flipped": 4}


def test_hits_count_flipped_points_in_the_self_influence_ranking(backend_name):
    lines: list[str] = []
    result = run_demo(backend=backend_name, out=lines.append, **SMALL)
    assert result.self_influence.shape == (40,)
    assert result.self_influence.dtype == np.float64
    # GGN curvature plus regularisation: a positive-definite H, so every
    # self-influence <H^-1 g, g> is positive.
    assert np.all(result.self_influence > 0)
    order = np.argsort(-result.self_influence, kind="stable")
    expected = {
        share: len(set(result.flipped.tolist()) & set(order[: round(share * 40)]))
        for share in TOP_SHARES
    }
    assert result.hits == expected
    text = "\n".join(lines)
    assert (
        f"{expected[0.1]} of the 4 flipped labels are in the top 10% (4 points); "
        "chance: 0.4" in text
    )
    assert (
        f"{expected[0.2]} of the 4 flipped labels are in the top 20% (8 points); "
        "chance: 0.8" in text
    )
    assert "ggn curvature, hessian_regularization 0.01" in text


def test_plot_writes_a_png(backend_name, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    argv = ["demo", "--backend", backend_name, "--plot", str(path)]
    argv += ["--num-train", "40", "--num-test", "6", "--num-flipped", "4"]
    assert influx.cli.main(argv) == 0
    assert f"detection curve written to {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_an_error_before_any_work(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert influx.cli.main(["demo", "--plot", "demo.png"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert 'pip install "influx[plot]"' in err
