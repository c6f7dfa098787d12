"""influx.metrics against hand-computed values (no framework needed)."""

from __future__ import annotations

import numpy as np
import pytest

import influx
from influx.metrics import (
    LinearDatamodelingScore,
    LooCorrelation,
    linear_datamodeling_score,
    loo_correlation,
)


def test_metrics_is_a_public_module():
    assert influx.metrics.loo_correlation is loo_correlation
    assert "metrics" in influx.__all__


def test_loo_correlation_perfect_reversed_and_scale_free():
    actual = np.array([0.3, -1.0, 2.0, 0.1, 5.0])
    result = loo_correlation(2.5 * actual + 1.0, actual)
    assert isinstance(result, LooCorrelation)
    assert result.pearson == pytest.approx(1.0, abs=1e-15)
    assert result.spearman == pytest.approx(1.0, abs=1e-15)
    assert result.n == 5
    assert result.pearson_per_test.shape == (1,)
    reversed_ = loo_correlation(-actual, actual)
    assert reversed_.pearson == pytest.approx(-1.0, abs=1e-15)
    assert reversed_.spearman == pytest.approx(-1.0, abs=1e-15)
    # A monotone, non-linear relation: Spearman 1, Pearson below.
    monotone = loo_correlation(np.exp(actual), actual)
    assert monotone.spearman == pytest.approx(1.0, abs=1e-15)
    assert monotone.pearson < 0.95


def test_loo_correlation_hand_example():
    # x = [1, 2, 3], y = [1, 3, 2]: centred (-1, 0, 1) and (-1, 1, 0),
    # Pearson = 1 / (sqrt(2) sqrt(2)) = 0.5; ranks equal the values.
    result = loo_correlation([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert result.pearson == pytest.approx(0.5, abs=1e-15)
    assert result.spearman == pytest.approx(0.5, abs=1e-15)


def test_loo_correlation_ties_use_average_ranks():
    # predicted ranks [1.5, 1.5, 3, 4]; actual ranks [1, 2, 3, 4].
    result = loo_correlation([0.0, 0.0, 1.0, 7.0], [1.0, 2.0, 3.0, 4.0])
    ranks = np.array([1.5, 1.5, 3.0, 4.0]) - 2.5
    other = np.array([1.0, 2.0, 3.0, 4.0]) - 2.5
    expected = ranks @ other / np.sqrt((ranks @ ranks) * (other @ other))
    assert result.spearman == pytest.approx(expected, abs=1e-15)
    from scipy.stats import spearmanr

    assert result.spearman == pytest.approx(
        spearmanr([0.0, 0.0, 1.0, 7.0], [1.0, 2.0, 3.0, 4.0]).statistic, abs=1e-14
    )


def test_loo_correlation_rows_and_their_mean():
    rng = np.random.default_rng(0)
    actual = rng.standard_normal((3, 20))
    predicted = np.stack([actual[0], -actual[1], actual[2] + rng.normal(size=20)])
    result = loo_correlation(predicted, actual)
    expected = [np.corrcoef(p, a)[0, 1] for p, a in zip(predicted, actual, strict=True)]
    np.testing.assert_allclose(result.pearson_per_test, expected, atol=1e-14)
    assert result.pearson == pytest.approx(np.mean(expected), abs=1e-14)
    assert result.spearman_per_test[:2].tolist() == pytest.approx([1.0, -1.0])
    assert result.n == 20


def test_loo_correlation_constant_row_is_nan_and_left_out_of_the_mean():
    result = loo_correlation([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], [[1, 2, 3], [1, 2, 3]])
    assert np.isnan(result.pearson_per_test[0])
    assert result.pearson == 1.0


@pytest.mark.parametrize(
    ("predicted", "actual", "match"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], "same shape"),
        ([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], "predicted holds 1 non-finite"),
        ([1.0, 2.0, 3.0], [1.0, np.inf, 3.0], "actual holds 1 non-finite"),
        ([1.0], [1.0], "at least 2 points"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), r"\[M\] or \[N_test, M\]"),
    ],
)
def test_loo_correlation_errors(predicted, actual, match):
    with pytest.raises(influx.InputError, match=match):
        loo_correlation(predicted, actual)


def test_loo_correlation_wrong_type():
    with pytest.raises(TypeError, match="predicted must be a numeric array"):
        loo_correlation(["a", "b"], [1.0, 2.0])


def test_lds_of_an_exact_linear_datamodel_is_one():
    # Outputs that are exactly const - sum of I_up over the subset.
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((4, 12))
    masks = rng.random((30, 12)) < 0.5
    outputs = 3.0 - masks @ scores.T / 12
    result = linear_datamodeling_score(scores, masks, outputs)
    assert isinstance(result, LinearDatamodelingScore)
    assert result.score == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(result.per_test, 1.0, atol=1e-15)
    assert result.num_subsets == 30
    # TRAK's convention (scores raise the output) is sign=+1.
    flipped = linear_datamodeling_score(-scores, masks, outputs, sign=1)
    assert flipped.score == pytest.approx(1.0, abs=1e-15)
    assert linear_datamodeling_score(scores, masks, outputs, sign=1).score == (
        pytest.approx(-1.0, abs=1e-15)
    )
    # 0/1 masks are accepted as booleans.
    same = linear_datamodeling_score(scores, masks.astype(int), outputs)
    assert same.score == pytest.approx(1.0, abs=1e-15)


def test_lds_hand_example():
    # One test point, scores [1, 2, 4]; subsets {0}, {1}, {0, 2}, {1, 2}:
    # predictions -[1, 2, 5, 6]; outputs [0.1, 0.3, 0.2, 0.0] have ranks
    # [2, 4, 3, 1]; predictions' ranks [4, 3, 2, 1].
    scores = np.array([[1.0, 2.0, 4.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=bool)
    outputs = np.array([[0.1], [0.3], [0.2], [0.0]])
    a = np.array([4.0, 3.0, 2.0, 1.0]) - 2.5
    b = np.array([2.0, 4.0, 3.0, 1.0]) - 2.5
    expected = a @ b / np.sqrt((a @ a) * (b @ b))  # = 0.4
    result = linear_datamodeling_score(scores, masks, outputs)
    assert expected == pytest.approx(0.4)
    assert result.score == pytest.approx(expected, abs=1e-15)


def test_lds_mean_over_test_points_and_ties():
    scores = np.array([[1.0, 1.0], [1.0, -1.0]])
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    # Test 0: predictions -[1, 1, 2] (a tie), outputs [1, 2, 3]:
    # ranks [2.5, 2.5, 1] against [1, 2, 3].
    # Test 1: predictions -[1, -1, 0] = [-1, 1, 0], outputs [3, 1, 2] -> -1.
    outputs = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 2.0]])
    a = np.array([2.5, 2.5, 1.0]) - 2.0
    b = np.array([1.0, 2.0, 3.0]) - 2.0
    first = a @ b / np.sqrt((a @ a) * (b @ b))
    result = linear_datamodeling_score(scores, masks, outputs)
    np.testing.assert_allclose(result.per_test, [first, -1.0], atol=1e-15)
    assert result.score == pytest.approx((first - 1.0) / 2, abs=1e-15)


@pytest.mark.parametrize(
    ("scores", "masks", "outputs", "match"),
    [
        (np.ones(3), np.ones((2, 3), bool), np.ones((2, 1)), "scores must be"),
        (np.ones((1, 3)), np.ones(3, bool), np.ones((2, 1)), "masks must be"),
        (np.ones((1, 3)), np.ones((2, 4), bool), np.ones((2, 1)), "4 columns"),
        (np.ones((1, 3)), np.ones((2, 3), bool), np.ones((1, 2)), "outputs must be"),
        (np.ones((1, 3)), np.full((2, 3), 0.5), np.ones((2, 1)), "boolean"),
        (np.ones((1, 3)), np.ones((1, 3), bool), np.ones((1, 1)), "at least 2"),
        (np.full((1, 3), np.nan), np.ones((2, 3), bool), np.ones((2, 1)), "scores"),
        (np.ones((1, 3)), np.ones((2, 3), bool), np.full((2, 1), np.inf), "outputs"),
    ],
)
def test_lds_errors(scores, masks, outputs, match):
    with pytest.raises(influx.InputError, match=match):
        linear_datamodeling_score(scores, masks, outputs)


@pytest.mark.parametrize("sign", [0, 2, True, "-1"])
def test_lds_bad_sign(sign):
    with pytest.raises(influx.InputError, match="sign must be -1 or \\+1"):
        linear_datamodeling_score(
            np.ones((1, 2)), np.ones((2, 2), bool), np.ones((2, 1)), sign=sign
        )


def test_loo_sign_convention_on_a_quadratic():
    # Least squares with L2: J = (1/N) sum 0.5 (x_i . t - y_i)^2 + lam/2 |t|^2.
    # influx's I_up = g_test^T H^{-1} g_i with H = X^T X / N + lam I; removing
    # point i (its term dropped, 1/N kept) moves the test loss by about
    # +I_up / N. Checked against exact retraining: correlation near +1.
    rng = np.random.default_rng(2)
    n, d, lam = 200, 3, 0.1
    x = rng.standard_normal((n, d))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(n)
    x_test, y_test = rng.standard_normal(d), 0.7

    def fit(weights):
        return np.linalg.solve(
            x.T @ (weights[:, None] * x) / n + lam * np.eye(d), x.T @ (weights * y) / n
        )

    theta = fit(np.ones(n))
    test_loss = lambda t: 0.5 * (x_test @ t - y_test) ** 2  # noqa: E731
    h = x.T @ x / n + lam * np.eye(d)
    g_test = (x_test @ theta - y_test) * x_test
    grads = (x @ theta - y)[:, None] * x
    i_up = grads @ np.linalg.solve(h, g_test)
    actual = []
    for i in range(n):
        weights = np.ones(n)
        weights[i] = 0.0
        actual.append(test_loss(fit(weights)) - test_loss(theta))
    result = loo_correlation(i_up / n, actual)
    assert result.pearson > 0.99
    # Same sign and scale, not only correlated: first order in 1/N.
    error = np.linalg.norm(i_up / n - actual) / np.linalg.norm(actual)
    assert error < 0.15
