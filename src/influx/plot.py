"""Pictures of influence results (matplotlib, the ``plot`` extra).

matplotlib is imported inside each function, so ``import influx`` never loads
it; a missing matplotlib is an :class:`ImportError` that names
``pip install "influx[plot]"``. Every function draws on ``ax`` (a new figure's
axes when ``None``) and returns the axes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from influx.errors import InputError

__all__ = ["accuracy_time", "detection_curve", "detection_fractions", "loo_scatter"]


def _pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            'influx.plot needs matplotlib: pip install "influx[plot]"'
        ) from error
    return plt


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots()
    return ax


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}.")
    return array


def loo_scatter(
    predicted: Any,
    actual: Any,
    *,
    ax: Any = None,
    label: str | None = None,
    title: str | None = None,
) -> Any:
    """Predicted against actual leave-one-out change, with the line ``y = x``.

    Parameters
    ----------
    predicted, actual
        ``[M]`` (or any shape, flattened) predicted and measured change of the
        test loss when each point is left out (see
        :func:`influx.metrics.loo_correlation` for the sign: ``+I_up / N``).
    ax
        Axes to draw on; ``None`` makes a new figure.
    label
        Name of the points in the legend, followed by their Pearson
        correlation.
    title
        Axes title.

    Returns
    -------
    matplotlib.axes.Axes
        The axes: the points are its first collection, ``y = x`` its first
        line.
    """
    from influx.metrics import loo_correlation

    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(actual, dtype=np.float64).ravel()
    pearson = loo_correlation(x, y).pearson
    ax = _axes(ax)
    low = float(min(x.min(), y.min()))
    high = float(max(x.max(), y.max()))
    ax.plot([low, high], [low, high], color="0.6", linewidth=1, zorder=0)
    name = f"{label}, " if label else ""
    ax.scatter(x, y, s=10, alpha=0.7, label=f"{name}Pearson {pearson:.3f}")
    ax.set_xlabel("predicted change of the test loss")
    ax.set_ylabel("actual change (retrained)")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left")
    return ax


def detection_fractions(scores: Any, flagged: Any) -> tuple[np.ndarray, np.ndarray]:
    """The detection curve's points: inspected and found fractions.

    Points are inspected in order of ``scores``, highest first (ties in index
    order).

    Parameters
    ----------
    scores
        ``[N]`` ranking scores (e.g. self-influence).
    flagged
        ``[N]`` booleans, or integer indices of the flagged points.

    Returns
    -------
    inspected, found
        ``[N + 1]`` each: the fraction of the data inspected (``0, 1/N, ...,
        1``) and the fraction of the flagged points found among them.
    """
    scores = _vector(scores, "scores")
    mask = _flag_mask(flagged, scores.size)
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(mask[order])]) / mask.sum()
    inspected = np.arange(scores.size + 1) / scores.size
    return inspected, found


def _flag_mask(flagged: Any, size: int) -> np.ndarray:
    flagged = np.asarray(flagged)
    if flagged.dtype == np.bool_:
        if flagged.shape != (size,):
            raise InputError(
                f"flagged as booleans must have the shape of scores ({size},), "
                f"got {flagged.shape}."
            )
        mask = flagged.copy()
    else:
        if flagged.ndim != 1 or (flagged.size and flagged.dtype.kind not in "iu"):
            raise InputError(
                "flagged must be booleans [N] or integer indices of the flagged points."
            )
        if flagged.size and (flagged.min() < 0 or flagged.max() >= size):
            raise InputError(f"flagged indices must lie in [0, {size}).")
        mask = np.zeros(size, dtype=bool)
        mask[flagged] = True
    if not mask.any():
        raise InputError("flagged marks no point; nothing to detect.")
    return mask


def detection_curve(
    scores: Any,
    flagged: Any,
    *,
    ax: Any = None,
    label: str | None = None,
    baseline: bool = True,
) -> Any:
    """Fraction of flagged points found against fraction of data inspected.

    Points are inspected by ``scores``, highest first (e.g. self-influence to
    find mislabeled points); see :func:`detection_fractions`.

    Parameters
    ----------
    scores
        ``[N]`` ranking scores.
    flagged
        ``[N]`` booleans or the integer indices of the flagged points.
    ax
        Axes to draw on; ``None`` makes a new figure.
    label
        Legend name of the curve.
    baseline
        Also draw random inspection, the line ``y = x`` (dashed, labelled
        ``"random"``), unless the axes already have one.

    Returns
    -------
    matplotlib.axes.Axes
        The axes; the curve is the last line added before the baseline.
    """
    inspected, found = detection_fractions(scores, flagged)
    ax = _axes(ax)
    ax.plot(inspected, found, label=label)
    if baseline and not any(line.get_label() == "random" for line in ax.lines):
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", label="random")
    ax.set_xlabel("fraction of the data inspected")
    ax.set_ylabel("fraction of flagged points found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    if label is not None or baseline:
        ax.legend(loc="lower right")
    return ax


def accuracy_time(records: Iterable[Mapping[str, Any]], *, ax: Any = None) -> Any:
    """Accuracy against time per method: a scatter with a log time axis.

    Parameters
    ----------
    records
        Mappings with keys ``method``, ``seconds`` (positive), ``accuracy``
        and optionally ``backend``; one point each, annotated with its method.
        Points of one backend share a colour and a legend entry.
    ax
        Axes to draw on; ``None`` makes a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        The axes: one collection per backend, in order of first appearance.
    """
    rows = list(records)
    if not rows:
        raise InputError("records is empty; pass at least one mapping.")
    groups: dict[str, list[tuple[str, float, float]]] = {}
    for index, row in enumerate(rows):
        missing = [key for key in ("method", "seconds", "accuracy") if key not in row]
        if missing:
            raise InputError(f"records[{index}] lacks the key(s) {missing}.")
        seconds = float(row["seconds"])
        if not seconds > 0:
            raise InputError(
                f"records[{index}]['seconds'] must be positive (log axis), got "
                f"{row['seconds']!r}."
            )
        backend = str(row.get("backend", ""))
        groups.setdefault(backend, []).append(
            (str(row["method"]), seconds, float(row["accuracy"]))
        )
    ax = _axes(ax)
    for backend, points in groups.items():
        seconds = [p[1] for p in points]
        accuracy = [p[2] for p in points]
        ax.scatter(seconds, accuracy, label=backend or None)
        for method, x, y in points:
            ax.annotate(
                method,
                (x, y),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=8,
                rotation=40,  # neighbours of equal accuracy stay legible
            )
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("accuracy")
    if any(groups):
        ax.legend()
    return ax
