"""influx.plot: the plotted data of the returned axes (Agg backend)."""

from __future__ import annotations

import builtins
import subprocess
import sys

import numpy as np
import pytest

import influx

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from influx.plot import (  # noqa: E402
    accuracy_time,
    detection_curve,
    detection_fractions,
    loo_scatter,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_loo_scatter_points_diagonal_and_legend():
    predicted = np.array([0.1, 0.2, 0.4, -0.3])
    actual = np.array([0.12, 0.18, 0.5, -0.2])
    ax = loo_scatter(predicted, actual, label="direct", title="LOO")
    np.testing.assert_array_equal(
        ax.collections[0].get_offsets(), np.c_[predicted, actual]
    )
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_xdata(), [-0.3, 0.5])
    np.testing.assert_allclose(line.get_ydata(), [-0.3, 0.5])
    pearson = np.corrcoef(predicted, actual)[0, 1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"direct, Pearson {pearson:.3f}"]
    assert ax.get_title() == "LOO"


def test_loo_scatter_draws_on_given_axes():
    _, ax = plt.subplots()
    assert loo_scatter([1.0, 2.0, 3.0], [1.0, 2.5, 2.9], ax=ax) is ax


def test_detection_curve_data_and_baseline():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.5])  # order 0, 2, 4, 3, 1
    flagged = np.array([2, 1])
    ax = detection_curve(scores, flagged, label="self-influence")
    curve, baseline = ax.lines
    np.testing.assert_allclose(curve.get_xdata(), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(curve.get_ydata(), [0, 0, 0.5, 0.5, 0.5, 1.0])
    assert curve.get_label() == "self-influence"
    np.testing.assert_allclose(baseline.get_xydata(), [[0, 0], [1, 1]])
    assert baseline.get_label() == "random"
    # A second curve on the same axes adds no second baseline.
    detection_curve(-scores, flagged, ax=ax, label="reversed")
    assert [line.get_label() for line in ax.lines] == [
        "self-influence",
        "random",
        "reversed",
    ]


def test_detection_fractions_boolean_mask_and_ties():
    inspected, found = detection_fractions([1.0, 1.0, 0.0], [False, True, False])
    np.testing.assert_allclose(inspected, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(found, [0, 0, 1, 1])  # ties in index order


@pytest.mark.parametrize(
    ("flagged", "match"),
    [
        (np.array([5]), r"lie in \[0, 3\)"),
        (np.zeros(3, bool), "marks no point"),
        (np.array([True, False]), "shape of scores"),
        (np.array([0.5]), "integer indices"),
    ],
)
def test_detection_curve_bad_flagged(flagged, match):
    with pytest.raises(influx.InputError, match=match):
        detection_curve([0.1, 0.2, 0.3], flagged)


def test_accuracy_time_groups_by_backend_with_log_axis():
    records = [
        {"method": "direct", "seconds": 2.0, "accuracy": 0.999, "backend": "torch"},
        {"method": "cg", "seconds": 5.0, "accuracy": 0.998, "backend": "torch"},
        {"method": "direct", "seconds": 3.0, "accuracy": 0.997, "backend": "jax"},
    ]
    ax = accuracy_time(records)
    assert ax.get_xscale() == "log"
    torch_points, jax_points = ax.collections
    np.testing.assert_allclose(torch_points.get_offsets(), [[2.0, 0.999], [5.0, 0.998]])
    np.testing.assert_allclose(jax_points.get_offsets(), [[3.0, 0.997]])
    assert [t.get_text() for t in ax.texts] == ["direct", "cg", "direct"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["torch", "jax"]


def test_accuracy_time_without_backend():
    ax = accuracy_time([{"method": "kfac", "seconds": 0.5, "accuracy": 0.9}])
    assert [t.get_text() for t in ax.texts] == ["kfac"]
    assert ax.get_legend() is None


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([], "records is empty"),
        ([{"method": "cg", "seconds": 1.0}], r"lacks the key\(s\) \['accuracy'\]"),
        ([{"method": "cg", "seconds": 0.0, "accuracy": 1.0}], "must be positive"),
    ],
)
def test_accuracy_time_errors(records, match):
    with pytest.raises(influx.InputError, match=match):
        accuracy_time(records)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r'pip install "influx\[plot\]"'):
        loo_scatter([1.0, 2.0], [1.0, 2.0])


def test_import_influx_does_not_load_matplotlib():
    code = "import sys, influx, influx.plot; print('matplotlib' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"
