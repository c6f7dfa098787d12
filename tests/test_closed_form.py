"""Influences of multi-output linear regression under MSE, against closed forms.

The model is ``f(x) = W x + b`` with ``W [O, D]``, trained with torch's
``MSELoss`` (a mean over all ``B x O`` elements), so the per-sample loss is
``l(z) = (1/O) ||W x + b - y||^2``. With ``x~ = [x; 1]``, the residual
``r = W x~ - y`` (bias folded into ``W``), ``C = X~^T X~ / N`` over all training
points and ``A = (2/O) C + lambda I``, the regularised Hessian is ``I_O (x) A``
and

- ``I_up(t, z) = (4/O^2) (r_t . r_z) x~_t^T A^{-1} x~_z``;
- ``I_pert(t, z) = (4/O^2) [(W^T r_t)(u^T x~_z) + (r_t . r_z) u_{1:D}]`` with
  ``u = A^{-1} x~_t``.

``test_reference_matches_finite_differences`` checks these formulas against a
construction from finite differences of the loss alone, before the library is
compared with them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from models import frobenius_err, rel_err, to_numpy, wrap_mlp

import influx

D, OUT = 3, 2  # input and output dimensions
N, BATCH = 47, 10  # training batches of 10, 10, 10, 10 and 7
T, TEST_BATCH = 5, 3  # test batches of 3 and 2
P = OUT * (D + 1)

# Tolerances: max |difference| / max |reference|.
RTOL = {"direct": 1e-8, "cg": 1e-6, "arnoldi": 1e-6}
OPTIONS = {
    "direct": {},
    "cg": {"rtol": 1e-12, "atol": 0.0},
    "arnoldi": {"rank_estimate": P, "residuals": True},
}
LAMBDAS = [0.0, 0.3]


@dataclass(frozen=True)
class Problem:
    w: np.ndarray  # [OUT, D]
    b: np.ndarray  # [OUT]
    x: np.ndarray  # [N, D]
    y: np.ndarray  # [N, OUT]
    x_test: np.ndarray  # [T, D]
    y_test: np.ndarray  # [T, OUT]


def make_problem() -> Problem:
    rng = np.random.default_rng(2024)
    return Problem(
        w=rng.standard_normal((OUT, D)),
        b=rng.standard_normal(OUT),
        x=rng.standard_normal((N, D)) + 0.5,
        y=rng.standard_normal((N, OUT)),
        x_test=rng.standard_normal((T, D)),
        y_test=rng.standard_normal((T, OUT)),
    )


PROBLEM = make_problem()


def augment(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


@dataclass(frozen=True)
class Reference:
    up: np.ndarray  # [T, N]
    pert: np.ndarray  # [T, N, D]
    factors: np.ndarray  # [T, OUT, D + 1]: the factor as a matrix like [W b]


def reference(problem: Problem, lam: float, hessian_x: np.ndarray | None = None):
    """Closed-form influences of every training point on every test point.

    The sizes are read from ``problem``. ``hessian_x`` replaces ``C``
    (``[D+1, D+1]``) to build deliberately wrong references.
    """
    (out, d), n = problem.w.shape, problem.x.shape[0]
    xa = augment(problem.x)
    c = xa.T @ xa / n if hessian_x is None else hessian_x
    a = 2.0 / out * c + lam * np.eye(d + 1)
    wb = np.hstack([problem.w, problem.b[:, None]])
    xt = augment(problem.x_test)
    r_t = xt @ wb.T - problem.y_test  # [T, OUT]
    r_z = xa @ wb.T - problem.y  # [N, OUT]
    u = np.linalg.solve(a, xt.T).T  # [T, D+1]
    rr = r_t @ r_z.T  # [T, N]
    ux = u @ xa.T  # [T, N]
    up = 4.0 / out**2 * rr * ux
    pert = (
        4.0
        / out**2
        * (
            (r_t @ problem.w)[:, None, :] * ux[:, :, None]
            + rr[:, :, None] * u[:, None, :d]
        )
    )
    factors = 2.0 / out * r_t[:, :, None] * u[:, None, :]
    return Reference(up, pert, factors)


def flat_factors(matrix_factors: np.ndarray, backend_name: str) -> np.ndarray:
    """``[T, OUT, D+1]`` factors in the backend's flat parameter order.

    torch flattens ``weight`` (row-major) then ``bias``; JAX's ``ravel_pytree``
    flattens the dict ``{"w", "b"}`` in key order, ``b`` then ``w``.
    """
    d = matrix_factors.shape[2] - 1
    w_part = matrix_factors[:, :, :d].reshape(len(matrix_factors), -1)
    b_part = matrix_factors[:, :, d]
    parts = [w_part, b_part] if backend_name == "torch" else [b_part, w_part]
    return np.concatenate(parts, axis=1)


@functools.cache  # a JAX wrapper compiles once per instance: share them
def model_for(backend_name: str, dtype: str = "float64") -> influx.TwiceDifferentiable:
    return wrap_mlp(backend_name, [(PROBLEM.w, PROBLEM.b)], loss="mse", dtype=dtype)


def train_data(batch_size: int = BATCH) -> influx.Batches:
    return influx.batches(PROBLEM.x, PROBLEM.y, batch_size=batch_size)


def held_out_data() -> influx.Batches:
    return influx.batches(PROBLEM.x_test, PROBLEM.y_test, batch_size=TEST_BATCH)


def native_type(backend_name: str) -> type:
    if backend_name == "torch":
        import torch

        return torch.Tensor
    import jax

    return jax.Array


# -- the reference itself -------------------------------------------------------


def _sample_loss(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    wb = theta.reshape(OUT, D + 1)
    return float(np.mean((wb[:, :D] @ x + wb[:, D] - y) ** 2))


def _fd_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Central differences are exact (up to rounding) on a quadratic.
    h, eye = 0.5, np.eye(theta.size)
    return np.array(
        [
            (_sample_loss(theta + h * e, x, y) - _sample_loss(theta - h * e, x, y))
            / (2 * h)
            for e in eye
        ]
    )


@pytest.mark.parametrize("lam", LAMBDAS)
def test_reference_matches_finite_differences(lam):
    problem = PROBLEM
    theta = np.hstack([problem.w, problem.b[:, None]]).ravel()
    eye = np.eye(P)

    def train_loss(t: np.ndarray) -> float:
        return np.mean(
            [_sample_loss(t, x, y) for x, y in zip(problem.x, problem.y, strict=True)]
        )

    h = 0.5  # second differences are exact on a quadratic
    hessian = np.array(
        [
            [
                (
                    train_loss(theta + h * ei + h * ej)
                    - train_loss(theta + h * ei - h * ej)
                    - train_loss(theta - h * ei + h * ej)
                    + train_loss(theta - h * ei - h * ej)
                )
                / (4 * h * h)
                for ej in eye
            ]
            for ei in eye
        ]
    )
    g_test = np.array(
        [
            _fd_grad(theta, x, y)
            for x, y in zip(problem.x_test, problem.y_test, strict=True)
        ]
    )
    factors = np.linalg.solve(hessian + lam * np.eye(P), g_test.T).T

    def up_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return factors @ _fd_grad(theta, x, y)

    up = np.stack(
        [up_of(x, y) for x, y in zip(problem.x, problem.y, strict=True)], axis=1
    )
    # I_up is quadratic in x_z (s_test fixed): central differences are exact.
    step = 0.25
    pert = np.stack(
        [
            np.stack(
                [
                    (up_of(x + step * e, y) - up_of(x - step * e, y)) / (2 * step)
                    for e in np.eye(D)
                ],
                axis=1,
            )
            for x, y in zip(problem.x, problem.y, strict=True)
        ],
        axis=1,
    )
    ref = reference(problem, lam)
    assert rel_err(up, ref.up) < 1e-9
    assert rel_err(pert, ref.pert) < 1e-9
    assert rel_err(factors, ref.factors.reshape(T, -1)) < 1e-9


def test_sign_convention_matches_retraining():
    """Positive I_up means up-weighting z lowers the test loss (at the optimum).

    Refit the linear model by weighted least squares with point ``z`` weighted
    ``1/N + eps`` and differentiate the test loss in ``eps``: at
    ``lambda = 0`` it is ``-I_up``.
    """
    problem = PROBLEM
    xa = augment(problem.x)
    wb_opt = np.linalg.lstsq(xa, problem.y, rcond=None)[0].T  # [OUT, D+1]
    fitted = Problem(
        wb_opt[:, :D],
        wb_opt[:, D],
        problem.x,
        problem.y,
        problem.x_test,
        problem.y_test,
    )
    ref = reference(fitted, 0.0)

    def test_losses(z: int, eps: float) -> np.ndarray:
        weights = np.full(N, 1.0 / N)
        weights[z] += eps
        wb = np.linalg.solve(
            xa.T @ (weights[:, None] * xa), xa.T @ (weights[:, None] * problem.y)
        ).T
        residual = augment(problem.x_test) @ wb.T - problem.y_test
        return np.mean(residual**2, axis=1)

    eps = 1e-6
    derivative = np.stack(
        [(test_losses(z, eps) - test_losses(z, -eps)) / (2 * eps) for z in range(N)],
        axis=1,
    )
    assert rel_err(-derivative, ref.up) < 1e-6


# -- exact methods ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["up", "perturbation"])
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("method", ["direct", "cg", "arnoldi"])
def test_exact_methods_match_closed_form(backend_name, method, lam, kind):
    model = model_for(backend_name)
    result = influx.compute_influences(
        model,
        train_data(),
        test_data=held_out_data(),
        inversion_method=method,
        influence_type=kind,
        hessian_regularization=lam,
        **OPTIONS[method],
    )
    ref = reference(PROBLEM, lam)
    expected = ref.up if kind == "up" else ref.pert
    assert isinstance(result, native_type(backend_name))
    assert to_numpy(result).shape == expected.shape
    assert str(result.dtype).endswith("float64")
    assert rel_err(result, expected) < RTOL[method]


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("method", ["direct", "cg", "arnoldi"])
def test_factors_match_closed_form(backend_name, method, lam):
    model = model_for(backend_name)
    factors, info = influx.compute_influence_factors(
        model,
        train_data(),
        held_out_data(),
        method,
        hessian_perturbation=lam,
        return_info=True,
        **OPTIONS[method],
    )
    expected = flat_factors(reference(PROBLEM, lam).factors, backend_name)
    assert rel_err(factors, expected) < RTOL[method]
    assert info.method == method
    assert info.all_converged
    assert np.all(info.relative_residuals < 1e-8)


# -- LiSSA --------------------------------------------------------------------------


#: The paper's recursion: no variance reduction, no preconditioner.
PLAIN_LISSA = {"variance_reduction": False, "preconditioner": None}


@pytest.mark.parametrize("lam", LAMBDAS)
def test_lissa_default_converges_to_the_closed_form(backend_name, lam):
    """Defaults (variance reduction, Nystrom preconditioner): no sampling floor.

    Five batches drawn at random, as in the plain test below, but the
    control variates make the recursion converge to the exact solution:
    it meets its rtol and is within 1e-4 of the closed form.
    """
    model = model_for(backend_name)
    factors, info = influx.compute_influence_factors(
        model,
        train_data(),
        held_out_data(),
        "lissa",
        hessian_perturbation=lam,
        seed=0,
        return_info=True,
    )
    assert info.all_converged
    assert info.extra["variance_reduction"]
    assert info.extra["preconditioner"] == "nystrom"
    ref = reference(PROBLEM, lam)
    assert rel_err(factors, flat_factors(ref.factors, backend_name)) < 1e-4
    up = influx.compute_influences_up(model, train_data(), factors)
    assert rel_err(up, ref.up) < 1e-4


@pytest.mark.parametrize("lam", LAMBDAS)
def test_lissa_stochastic_within_a_few_percent(backend_name, lam):
    """Plain LiSSA, five batches drawn at random: the Polyak average is within a
    few percent.

    Observed errors at 1000 steps, seeds 0-5: 0.5-3% (Frobenius and max),
    correlation > 0.9998. The stochastic iterate never meets the default rtol,
    hence the warning.
    """
    model = model_for(backend_name)
    with pytest.warns(influx.NotConvergedWarning, match="raise maxiter"):
        factors = influx.compute_influence_factors(
            model,
            train_data(),
            held_out_data(),
            "lissa",
            hessian_perturbation=lam,
            maxiter=1000,
            seed=0,
            **PLAIN_LISSA,
        )
    ref = reference(PROBLEM, lam)
    up = influx.compute_influences_up(model, train_data(), factors)
    pert = influx.compute_influences_pert(model, train_data(), factors)
    for actual, expected in ((up, ref.up), (pert, ref.pert)):
        assert frobenius_err(actual, expected) < 0.05
        assert rel_err(actual, expected) < 0.1
        corr = np.corrcoef(to_numpy(actual).ravel(), expected.ravel())[0, 1]
        assert corr > 0.998


@pytest.mark.parametrize("lam", LAMBDAS)
def test_lissa_single_batch_converges(backend_name, lam):
    """With one batch the recursion is deterministic and meets its rtol."""
    model = model_for(backend_name)
    factors, info = influx.compute_influence_factors(
        model,
        train_data(batch_size=N),
        held_out_data(),
        "lissa",
        hessian_perturbation=lam,
        maxiter=2000,
        rtol=1e-13,
        seed=0,
        return_info=True,
    )
    assert info.all_converged
    assert int(info.iterations[0]) < 2000
    ref = reference(PROBLEM, lam)
    assert rel_err(factors, flat_factors(ref.factors, backend_name)) < 1e-8
    up = influx.compute_influences_up(model, train_data(), factors)
    assert rel_err(up, ref.up) < 1e-8


def test_lissa_unbiased_with_two_unlike_batches(backend_name):
    """Two batches with very different Hessians (inputs of scale 0.3 and 2).

    LiSSA must draw its batches independently: visiting them in epochs (a
    permutation each) correlates the batch with the iterate, and the average
    then settles about 11% away from the solution however long it runs.
    Independent draws give 0.8-1.3% at 2000 steps (seeds 0-3).
    """
    rng = np.random.default_rng(0)
    x = np.vstack(
        [0.3 * rng.standard_normal((4, 1)), 2.0 * rng.standard_normal((3, 1))]
    )
    y = rng.standard_normal((7, 1))
    x_test, y_test = rng.standard_normal((3, 1)), rng.standard_normal((3, 1))
    w, b = rng.standard_normal((1, 1)), rng.standard_normal(1)
    problem = Problem(w, b, x, y, x_test, y_test)
    model = wrap_mlp(backend_name, [(w, b)], loss="mse")
    with pytest.warns(influx.NotConvergedWarning):
        factors = influx.compute_influence_factors(
            model,
            influx.batches(x, y, batch_size=4),
            influx.batches(x_test, y_test, batch_size=3),
            "lissa",
            maxiter=2000,
            seed=0,
            **PLAIN_LISSA,
        )
    expected = flat_factors(reference(problem, 0.0).factors, backend_name)
    assert frobenius_err(factors, expected) < 0.04


# -- float32 ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["up", "perturbation"])
@pytest.mark.parametrize("method", ["direct", "cg", "arnoldi"])
def test_float32(backend_name, method, kind):
    """A float32 model gives float32 native results (observed error <= 5e-7)."""
    model = model_for(backend_name, dtype="float32")
    options = {"rtol": 1e-6, "atol": 0.0} if method == "cg" else OPTIONS[method]
    result = influx.compute_influences(
        model,
        train_data(),
        test_data=held_out_data(),
        inversion_method=method,
        influence_type=kind,
        hessian_regularization=0.3,
        **options,
    )
    assert isinstance(result, native_type(backend_name))
    assert str(result.dtype).endswith("float32")
    ref = reference(PROBLEM, 0.3)
    assert rel_err(result, ref.up if kind == "up" else ref.pert) < 1e-5


# -- batch weighting ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_short_last_batch_is_weighted_by_its_size(backend_name, method):
    """Uneven batches give the one-big-batch result; a plain batch mean would not."""
    model = model_for(backend_name)
    x, y = PROBLEM.x, PROBLEM.y
    uneven = [(x[:3], y[:3]), (x[3:30], y[3:30]), (x[30:], y[30:])]
    results = {
        name: to_numpy(
            influx.compute_influences(
                model,
                data,
                test_data=held_out_data(),
                inversion_method=method,
                hessian_regularization=0.0,
                **OPTIONS[method],
            )
        )
        for name, data in {
            "one batch": train_data(batch_size=N),
            "short last batch": train_data(batch_size=BATCH),
            "uneven list": uneven,
        }.items()
    }
    one = results["one batch"]
    assert rel_err(results["short last batch"], one) < 1e-10
    assert rel_err(results["uneven list"], one) < 1e-10
    assert rel_err(one, reference(PROBLEM, 0.0).up) < 1e-8

    # An unweighted mean of the batch Hessians differs a lot: the test can tell.
    def batch_c(xb: np.ndarray) -> np.ndarray:
        return augment(xb).T @ augment(xb) / len(xb)

    for bounds in ([0, 10, 20, 30, 40, N], [0, 3, 30, N]):
        mean_c = np.mean([batch_c(x[a:b]) for a, b in itertools.pairwise(bounds)], 0)
        unweighted = reference(PROBLEM, 0.0, hessian_x=mean_c).up
        assert rel_err(unweighted, one) > 1e-3
