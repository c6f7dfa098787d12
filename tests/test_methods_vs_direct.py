"""Every approximate inversion method against the direct solve on a tanh MLP.

The MLP (3 -> 4 -> 3, P = 31 parameters) is untrained, so its Hessian is
indefinite; ``hessian_regularization`` is chosen from the smallest eigenvalue
of the dense Hessian so that ``H + lambda I`` has smallest eigenvalue
``MARGIN``. Training batches are uneven (9, 9, 9, 9, 5), test batches too
(4, 2). References are built in numpy from the dense Hessian of the full
training set (one batch of all points, whose batch-mean loss is exactly the
training loss).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from models import (
    batch_hessian,
    frobenius_err,
    mlp_weights,
    rel_err,
    to_numpy,
    wrap_mlp,
)

import influx

SIZES = (3, 4, 3)
P = 3 * 4 + 4 + 4 * 3 + 3
N, BATCH = 41, 9
T, TEST_BATCH = 6, 4
MARGIN = 0.5  # smallest eigenvalue of H + lambda I
LOSSES = ["mse", "cross_entropy"]
LOW_RANK = 8


@dataclass(frozen=True)
class Setup:
    model: Any
    train: Any
    test: Any
    lam: float
    hessian: np.ndarray  # [P, P], unregularised, numpy
    test_grads: np.ndarray  # [T, P]
    train_grads: np.ndarray  # [N, P]
    direct: np.ndarray  # [T, P] direct factors


@functools.cache
def setup(backend_name: str, loss: str) -> Setup:
    rng = np.random.default_rng(0)
    x, x_test = rng.standard_normal((N, 3)), rng.standard_normal((T, 3))
    if loss == "mse":
        y, y_test = rng.standard_normal((N, 3)), rng.standard_normal((T, 3))
    else:
        y, y_test = rng.integers(0, 3, N), rng.integers(0, 3, T)
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=1), loss=loss)
    assert model.num_params == P

    def native(a: np.ndarray) -> Any:
        return model.backend.asarray(a, like=model.parameters)

    hessian = batch_hessian(model, x, y)
    lam = float(max(0.0, -np.linalg.eigvalsh(hessian)[0]) + MARGIN)
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(x_test, y_test, batch_size=TEST_BATCH)
    direct = influx.compute_influence_factors(
        model, train, test, "direct", hessian_perturbation=lam
    )
    return Setup(
        model=model,
        train=train,
        test=test,
        lam=lam,
        hessian=hessian,
        test_grads=to_numpy(model.per_sample_grads(native(x_test), native(y_test))[0]),
        train_grads=to_numpy(model.per_sample_grads(native(x), native(y))[0]),
        direct=to_numpy(direct),
    )


def regularised(s: Setup) -> np.ndarray:
    return s.hessian + s.lam * np.eye(P)


def true_residuals(s: Setup, factors) -> np.ndarray:
    return np.linalg.norm(to_numpy(factors) @ regularised(s) - s.test_grads, axis=1)


def factors_of(s: Setup, method: str, **options: Any):
    return influx.compute_influence_factors(
        s.model,
        s.train,
        s.test,
        method,
        hessian_perturbation=s.lam,
        return_info=True,
        **options,
    )


@pytest.fixture(params=LOSSES)
def loss(request):
    return request.param


def test_setup_is_positive_definite_and_weighted(backend_name, loss):
    s = setup(backend_name, loss)
    eigenvalues = np.linalg.eigvalsh(regularised(s))
    assert eigenvalues[0] == pytest.approx(MARGIN, rel=1e-10)
    assert np.linalg.eigvalsh(s.hessian)[0] < 0  # the regularisation is needed
    # The operator over uneven batches equals the full-batch Hessian.
    operator = influx.HessianOperator(s.model, s.train)
    assert rel_err(operator.to_dense(), s.hessian) < 1e-12
    vectors = np.random.default_rng(1).standard_normal((3, P))
    product = operator.mv(s.model.backend.asarray(vectors, like=s.model.parameters))
    assert rel_err(product, vectors @ s.hessian) < 1e-12


def test_direct_matches_numpy(backend_name, loss):
    s = setup(backend_name, loss)
    expected = np.linalg.solve(regularised(s), s.test_grads.T).T
    assert rel_err(s.direct, expected) < 1e-10
    up = influx.compute_influences_up(s.model, s.train, s.direct)
    assert rel_err(up, expected @ s.train_grads.T) < 1e-10


def test_cg_matches_direct(backend_name, loss):
    s = setup(backend_name, loss)
    factors, info = factors_of(s, "cg", rtol=1e-10, atol=0.0)
    assert rel_err(factors, s.direct) < 1e-6
    up = influx.compute_influences_up(s.model, s.train, factors)
    assert rel_err(up, s.direct @ s.train_grads.T) < 1e-6
    pert = influx.compute_influences_pert(s.model, s.train, factors)
    pert_direct = influx.compute_influences_pert(s.model, s.train, s.direct)
    assert rel_err(pert, to_numpy(pert_direct)) < 1e-6

    assert info.method == "cg"
    assert info.all_converged
    assert info.message == ""
    # One product per iteration; the regularised Hessian is P x P, so CG needs
    # at most about P iterations.
    assert np.all((info.iterations >= 1) & (info.iterations <= 3 * P))
    np.testing.assert_allclose(
        info.rhs_norms, np.linalg.norm(s.test_grads, axis=1), rtol=1e-12
    )
    assert np.all(info.residual_norms <= 1e-10 * info.rhs_norms)
    # The recursive residual it reports agrees with the true one to rounding.
    assert np.all(true_residuals(s, factors) <= 1e-8 * info.rhs_norms)


def test_arnoldi_full_rank_matches_direct(backend_name, loss):
    s = setup(backend_name, loss)
    factors, info = factors_of(s, "arnoldi", rank_estimate=P, residuals=True)
    assert rel_err(factors, s.direct) < 1e-6
    assert info.all_converged
    assert info.extra["rank"] == P
    np.testing.assert_allclose(
        info.extra["eigenvalues"], np.linalg.eigvalsh(regularised(s)), rtol=1e-10
    )
    assert np.all(info.relative_residuals < 1e-10)
    np.testing.assert_allclose(
        info.residual_norms, true_residuals(s, factors), atol=1e-12
    )


def test_arnoldi_low_rank_matches_eigh_reference(backend_name, loss):
    s = setup(backend_name, loss)
    w, v = np.linalg.eigh(regularised(s))
    order = np.argsort(np.abs(w))
    # A clear gap below the kept eigenvalues, so the subspace is well defined.
    kept, dropped = np.abs(w[order[-LOW_RANK]]), np.abs(w[order[-LOW_RANK - 1]])
    assert kept > 1.02 * dropped
    top = order[-LOW_RANK:]
    expected = ((s.test_grads @ v[:, top]) / w[top]) @ v[:, top].T

    factors, info = factors_of(
        s,
        "arnoldi",
        rank_estimate=LOW_RANK,
        tol=1e-12,
        remainder="drop",
        residuals=True,
    )
    assert rel_err(factors, expected) < 1e-6
    up = influx.compute_influences_up(s.model, s.train, factors)
    assert rel_err(up, expected @ s.train_grads.T) < 1e-6
    assert info.all_converged
    assert info.extra["rank"] == LOW_RANK
    np.testing.assert_allclose(info.extra["eigenvalues"], np.sort(w[top]), rtol=1e-10)
    # Lanczos counts its products; the residual is that of the truncated
    # inverse against the full operator, so it is far from zero.
    assert np.all(info.iterations == info.iterations[0])
    assert info.iterations[0] >= LOW_RANK
    np.testing.assert_allclose(
        info.residual_norms, true_residuals(s, factors), rtol=1e-8
    )
    assert np.all(info.relative_residuals > 1e-3)
    # And it is a real approximation: far from the direct solve at this rank.
    assert rel_err(factors, s.direct) > 1e-2


def test_lissa_default_matches_direct(backend_name, loss):
    """Default LiSSA (variance reduction, Nystrom preconditioner) converges.

    It meets its rtol well before maxiter and lands within 1e-3 of Direct.
    """
    s = setup(backend_name, loss)
    factors, info = factors_of(s, "lissa", seed=0)
    assert info.all_converged
    assert int(info.iterations[0]) < 1000
    assert rel_err(factors, s.direct) < 1e-3
    up = to_numpy(influx.compute_influences_up(s.model, s.train, factors))
    assert rel_err(up, s.direct @ s.train_grads.T) < 1e-3
    np.testing.assert_allclose(
        info.residual_norms, true_residuals(s, factors), rtol=1e-8
    )


def test_lissa_within_a_few_percent_of_direct(backend_name, loss):
    """Plain LiSSA's Polyak average over 1000 random batches is within a few
    percent.

    Observed over seeds 0-4: factors 0.7-2.8% (Frobenius), up-weighting
    influences 0.5-1.3%, correlation > 0.9999. Asserted: factors < 6%,
    influences < 5%, correlation > 0.999.
    """
    s = setup(backend_name, loss)
    with pytest.warns(influx.NotConvergedWarning, match="raise maxiter"):
        factors, info = factors_of(
            s,
            "lissa",
            maxiter=1000,
            seed=0,
            variance_reduction=False,
            preconditioner=None,
        )
    assert frobenius_err(factors, s.direct) < 0.06
    up = to_numpy(influx.compute_influences_up(s.model, s.train, factors))
    up_direct = s.direct @ s.train_grads.T
    assert frobenius_err(up, up_direct) < 0.05
    assert np.corrcoef(up.ravel(), up_direct.ravel())[0, 1] > 0.999

    assert info.method == "lissa"
    assert not info.all_converged
    assert "raise maxiter" in info.message
    np.testing.assert_array_equal(info.iterations, np.full(T, 1000))
    largest = np.linalg.eigvalsh(regularised(s))[-1]
    # The scale covers the largest eigenvalue of the full operator and of the
    # sampled batch operators, which can be larger (by about the number of
    # batches at most).
    assert largest * (1 - 1e-2) <= info.extra["largest_eigenvalue"]
    assert info.extra["largest_eigenvalue"] <= largest * 2 * -(-N // BATCH)
    assert info.extra["scale"] == pytest.approx(1.5 * info.extra["largest_eigenvalue"])
    np.testing.assert_allclose(
        info.residual_norms, true_residuals(s, factors), rtol=1e-8
    )
    # A few percent off in x is a few percent of ||b|| in the residual.
    assert np.all(info.relative_residuals < 0.1)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("direct", {}),
        ("cg", {"rtol": 1e-10, "atol": 0.0}),
        ("arnoldi", {"rank_estimate": P, "residuals": True}),
        ("lissa", {"maxiter": 2000, "rtol": 1e-12, "seed": 0}),
    ],
)
def test_return_info(backend_name, method, options):
    """``return_info=True`` adds a SolveInfo and leaves the factors unchanged.

    LiSSA runs on one batch here, so it is deterministic and converges.
    """
    s = setup(backend_name, "cross_entropy")
    if method == "lissa":
        # On one batch LiSSA is deterministic; its Hessian is that batch's.
        train = [s.train[0]]
        x0, y0 = train[0]
        hessian = batch_hessian(s.model, x0, y0)
        lam = float(max(0.0, -np.linalg.eigvalsh(hessian)[0]) + MARGIN)
    else:
        train, hessian, lam = s.train, s.hessian, s.lam
    matrix = hessian + lam * np.eye(P)
    kwargs = dict(hessian_perturbation=lam, **options)
    plain = influx.compute_influence_factors(s.model, train, s.test, method, **kwargs)
    result = influx.compute_influence_factors(
        s.model, train, s.test, method, return_info=True, **kwargs
    )
    assert isinstance(result, tuple) and len(result) == 2
    factors, info = result
    assert isinstance(info, influx.SolveInfo)
    np.testing.assert_array_equal(to_numpy(factors), to_numpy(plain))
    assert rel_err(factors, np.linalg.solve(matrix, s.test_grads.T).T) < 1e-8

    assert info.method == method
    for field in ("iterations", "residual_norms", "rhs_norms", "converged"):
        assert isinstance(getattr(info, field), np.ndarray), field
        assert getattr(info, field).shape == (T,), field
    assert info.converged.dtype == bool and info.all_converged
    assert info.message == ""
    assert info.iterations.dtype.kind == "i" and np.all(info.iterations >= 1)
    np.testing.assert_allclose(
        info.rhs_norms, np.linalg.norm(s.test_grads, axis=1), rtol=1e-12
    )
    residuals = np.linalg.norm(to_numpy(factors) @ matrix - s.test_grads, axis=1)
    np.testing.assert_allclose(info.residual_norms, residuals, atol=1e-9)
    assert np.all(info.relative_residuals < 1e-8)
    assert method in str(info) and "converged on 6/6" in str(info)
    if method == "direct":
        np.testing.assert_array_equal(info.iterations, np.ones(T))
        assert info.extra["positive_definite"] is True
    if method == "lissa":
        assert np.all(info.extra["relative_change"] < 1e-12)
