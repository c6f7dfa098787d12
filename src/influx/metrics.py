r"""Checking attributions against retraining: leave-one-out and the LDS.

Both functions compare what influence scores *predict* with what retraining
*measured*, so users can validate their own runs. numpy and scipy only.

Sign conventions (see ``docs/math.md``): the training loss is
``L(theta) = (1/N) sum_i l(z_i, theta)`` and influx's up-weighting influence is
``I_up(z_test, z_i) = <H^{-1} grad l(z_test), grad l(z_i)>``. Up-weighting
``z_i`` by ``eps`` (adding ``eps l(z_i)`` to the objective) moves the optimum
by ``-eps H^{-1} grad l(z_i)`` and so changes the test loss by about
``-eps I_up``. Removing ``z_i`` is ``eps = -1/N``: the test loss changes by
about ``+I_up / N``, that is, a positive (helpful) score predicts that the
test loss *rises* when the point is left out. The same holds for a
``measurement=`` in place of the test loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from influx.errors import InputError

__all__ = [
    "LinearDatamodelingScore",
    "LooCorrelation",
    "linear_datamodeling_score",
    "loo_correlation",
]


@dataclass(frozen=True)
class LooCorrelation:
    """Correlation of predicted and actual leave-one-out changes.

    Attributes
    ----------
    pearson, spearman
        The correlation coefficients; for 2-D inputs the mean over the test
        rows (of the rows where it is defined).
    n
        Number of left-out points ``M`` each correlation runs over.
    pearson_per_test, spearman_per_test
        ``[N_test]`` per test row (``[1]`` for 1-D inputs); ``nan`` where a
        row is constant.
    """

    pearson: float
    spearman: float
    n: int
    pearson_per_test: np.ndarray
    spearman_per_test: np.ndarray


@dataclass(frozen=True)
class LinearDatamodelingScore:
    """The linear datamodeling score (LDS) and its parts.

    Attributes
    ----------
    score
        Mean over the test points of ``per_test`` (of those where it is
        defined).
    per_test
        ``[N_test]`` Spearman correlation, across the subsets, of predicted
        and measured output; ``nan`` where either is constant.
    num_subsets
        Number of subsets ``S``.
    """

    score: float
    per_test: np.ndarray
    num_subsets: int


def loo_correlation(predicted: Any, actual: Any) -> LooCorrelation:
    r"""Pearson and Spearman correlation of predicted and actual LOO changes.

    Parameters
    ----------
    predicted
        ``[M]`` or ``[N_test, M]`` predicted change of the test loss (or
        measurement) when each of ``M`` training points is left out. For
        influx's up-weighting influences this is ``+I_up / N`` (``N`` the
        number of training points; see the module docstring): removing a
        point changes the test loss by about ``+I_up / N``. Correlations do
        not depend on a positive scale, so ``I_up`` itself gives the same
        numbers; ``-I_up`` gives their negatives.
    actual
        Same shape: measured ``loss(theta_{-i}) - loss(theta)`` after
        retraining without point ``i``.

    Returns
    -------
    LooCorrelation
        For 2-D inputs one correlation per test row and their means.

    Raises
    ------
    InputError
        If the shapes differ, are not 1-D or 2-D, have fewer than 2 points, or
        hold non-finite values.
    """
    predicted = _finite(predicted, "predicted")
    actual = _finite(actual, "actual")
    if predicted.shape != actual.shape:
        raise InputError(
            f"predicted and actual must have the same shape, got "
            f"{predicted.shape} and {actual.shape}."
        )
    if predicted.ndim not in (1, 2):
        raise InputError(
            f"predicted must be [M] or [N_test, M], got shape {predicted.shape}."
        )
    rows_p, rows_a = np.atleast_2d(predicted), np.atleast_2d(actual)
    if rows_p.shape[1] < 2:
        raise InputError(
            f"predicted needs at least 2 points per row, got {rows_p.shape[1]}."
        )
    pearson = np.array([_pearson(p, a) for p, a in zip(rows_p, rows_a, strict=True)])
    spearman = np.array([_spearman(p, a) for p, a in zip(rows_p, rows_a, strict=True)])
    return LooCorrelation(
        pearson=_mean(pearson),
        spearman=_mean(spearman),
        n=int(rows_p.shape[1]),
        pearson_per_test=pearson,
        spearman_per_test=spearman,
    )


def linear_datamodeling_score(
    scores: Any, masks: Any, outputs: Any, *, sign: int = -1
) -> LinearDatamodelingScore:
    r"""The linear datamodeling score of attributions (Park et al., 2023).

    For each test point ``t`` the group prediction of subset ``s`` is

    ``g[s, t] = sign * sum_i masks[s, i] * scores[t, i]``,

    and ``LDS_t = spearman_s(g[s, t], outputs[s, t])``; the score is the mean
    of ``LDS_t`` over the test points. A perfect linear datamodel gives 1.

    The default ``sign=-1`` fits influx's scores of the quantity measured in
    ``outputs``: with ``outputs`` the test losses of the retrained models and
    ``scores = Influence.influences(test)`` (``I_up``, positive when
    up-weighting a point *lowers* the test loss), training on subset ``S``
    predicts the loss ``const - (1/N) sum_{i in S} I_up[t, i]``; the constant
    and the positive scale ``1/N`` do not change a rank correlation. The same
    holds for ``measurement=m`` and outputs ``m``. Pass ``sign=+1`` for
    scores that are positive when a point *raises* the output (the TRAK
    convention for margins, ``tau(z)_i``, whose group prediction is
    ``sum_{i in S} tau_i``), or, equivalently, for ``-I_up``.

    Parameters
    ----------
    scores
        ``[N_test, N_train]`` attributions of every training point to every
        test point.
    masks
        ``[S, N_train]`` boolean (or 0/1): which training points each of the
        ``S`` retrainings used.
    outputs
        ``[S, N_test]`` measured output (loss, margin, ...) of the model
        retrained on each subset, at each test point.
    sign
        ``-1`` (default) or ``+1``, see above.

    Returns
    -------
    LinearDatamodelingScore

    Raises
    ------
    InputError
        On shapes that do not fit, non-boolean masks, non-finite values,
        fewer than 2 subsets or a ``sign`` other than ``-1`` or ``+1``.
    """
    if isinstance(sign, bool) or sign not in (-1, 1):
        raise InputError(f"sign must be -1 or +1, got {sign!r}.")
    scores = _finite(scores, "scores")
    outputs = _finite(outputs, "outputs")
    masks = np.asarray(masks)
    if scores.ndim != 2:
        raise InputError(f"scores must be [N_test, N_train], got shape {scores.shape}.")
    if masks.ndim != 2:
        raise InputError(f"masks must be [S, N_train], got shape {masks.shape}.")
    if masks.dtype != np.bool_:
        if not np.issubdtype(masks.dtype, np.number) or not np.all(
            (masks == 0) | (masks == 1)
        ):
            raise InputError(
                "masks must be boolean (or 0/1): True where a retraining used "
                "the training point."
            )
        masks = masks.astype(bool)
    num_test, num_train = scores.shape
    if masks.shape[1] != num_train:
        raise InputError(
            f"masks has {masks.shape[1]} columns but scores has {num_train} "
            "training points (columns); both must be N_train."
        )
    if outputs.shape != (masks.shape[0], num_test):
        raise InputError(
            f"outputs must be [S, N_test] = {(masks.shape[0], num_test)} "
            f"(one row per mask, one column per row of scores), got "
            f"{outputs.shape}."
        )
    if masks.shape[0] < 2:
        raise InputError(f"masks needs at least 2 subsets, got {masks.shape[0]}.")
    predicted = sign * (masks.astype(np.float64) @ scores.T)  # [S, N_test]
    per_test = np.array(
        [_spearman(predicted[:, t], outputs[:, t]) for t in range(num_test)]
    )
    return LinearDatamodelingScore(
        score=_mean(per_test), per_test=per_test, num_subsets=int(masks.shape[0])
    )


def _finite(array: Any, name: str) -> np.ndarray:
    """``array`` as float64 numpy; an error naming ``name`` if not finite."""
    try:
        values = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a numeric array: {error}") from None
    if not np.all(np.isfinite(values)):
        count = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise InputError(
            f"{name} holds {count} non-finite value(s) (nan or inf); remove those "
            "points or fix the run that produced them."
        )
    return values


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; ``nan`` when either is constant."""
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(np.dot(dx, dy) / denominator, -1.0, 1.0))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation (average ranks for ties); ``nan`` if constant."""
    from scipy.stats import rankdata

    return _pearson(rankdata(x), rankdata(y))


def _mean(values: np.ndarray) -> float:
    """Mean of the defined (finite) values; ``nan`` if there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
