"""LiSSA's defaults: a scale safe for every batch, divergence refused, honest
eigenvalue reports, and numpy integers and floats as options (issue 7, items 4
and 9)."""

from __future__ import annotations

import numpy as np
import pytest
from models import (
    batch_hessian,
    linear_weights,
    mlp_weights,
    rel_err,
    spd_matrix,
    to_numpy,
    wrap_mlp,
)

import influx
from influx.operators import DenseOperator, HessianOperator
from influx.solvers import ArnoldiSolver, CgSolver, LissaSolver
from influx.solvers import lissa as lissa_module
from influx.solvers.preconditioners import NystromPreconditioner

SYM = frozenset({"symmetric"})


# -- an outlier batch: linear regression with one high-leverage point ---------

N, D, BATCH = 40, 2, 2
OUTLIER = 23  # the point; its batch is OUTLIER // BATCH = 11


def outlier_problem(backend_name: str):
    """``(model, train, test, Z)``: 20 batches of 2, one point of norm ~20."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D))
    x[OUTLIER] = [16.0, -12.0]
    y = rng.standard_normal((N, 1))
    model = wrap_mlp(backend_name, [linear_weights(D, 1, seed=1)], loss="mse")
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(x[:4], y[:4] + 1.0, batch_size=4)
    z = np.hstack([x, np.ones((N, 1))])  # parameters: W [1, D], then b [1]
    return model, train, test, z, x, y


def test_default_lissa_converges_with_an_outlier_batch(backend_name):
    """The old scale (8 sampled batches) missed the outlier batch and diverged.

    The MSE Hessian is ``2 Z^T Z / N``; batch 11's operator (weight
    ``num_batches * 2 / N = 1``) has largest eigenvalue ~401, the full
    Hessian's is ~21.
    """
    model, train, test, z, *_ = outlier_problem(backend_name)
    hessian = 2 * z.T @ z / N
    batch = z[OUTLIER - OUTLIER % BATCH :][:BATCH]
    batch_largest = np.linalg.eigvalsh(2 * batch.T @ batch / BATCH)[-1]
    assert batch_largest > 15 * np.linalg.eigvalsh(hessian)[-1]
    direct = influx.compute_influence_factors(model, train, test, "direct")
    factors, info = influx.compute_influence_factors(
        model, train, test, "lissa", seed=0, return_info=True
    )
    assert info.all_converged
    assert rel_err(factors, to_numpy(direct)) < 1e-4
    spectrum = info.extra["spectrum"]
    assert spectrum.batch == OUTLIER // BATCH
    assert spectrum.num_batches == N // BATCH
    assert info.extra["scale"] == pytest.approx(1.5 * spectrum.step_eigenvalue)
    # The setup is cheap here: a few Lanczos steps (P = 3), in passes.
    assert spectrum.passes <= 10


def test_batch_estimate_includes_the_unbiasing_weight(backend_name):
    """Without preconditioner, the step's eigenvalue is that of the outlier
    batch operator ``(num_batches * n_t / N) H_t``, to the Lanczos accuracy;
    uneven batches (the last one short) get their own weight."""
    model, _, _, z, x, y = outlier_problem(backend_name)
    size = 3  # 14 batches, the last of 1 point
    train = influx.batches(x, y, batch_size=size)
    num_batches = -(-N // size)
    largest = []
    for start in range(0, N, size):
        part = z[start : start + size]
        weight = num_batches * len(part) / N
        largest.append(np.linalg.eigvalsh(weight * 2 * part.T @ part / len(part))[-1])
    state = LissaSolver(preconditioner=None, seed=0).init(HessianOperator(model, train))
    spectrum = state.spectrum
    assert spectrum.batch == int(np.argmax(largest)) == OUTLIER // size
    assert max(largest) <= spectrum.step_eigenvalue <= max(largest) * (1 + 1e-6)
    hessian = np.linalg.eigvalsh(2 * z.T @ z / N)
    assert spectrum.largest == pytest.approx(hessian[-1], rel=1e-8)
    assert spectrum.smallest == pytest.approx(hessian[0], rel=1e-8)


# -- divergence is refused, with what was measured ------------------------------


def test_plain_recursion_with_too_small_scale_raises():
    """The paper's recursion (no variance reduction, no preconditioner) with a
    scale a little below lambda_max / 2 grows slowly: it used to return a
    wrong answer with only "raise maxiter"."""
    matrix = spd_matrix([1.0, 2.0, 6.0], seed=3)
    rhs = np.random.default_rng(4).standard_normal((2, 3))
    solver = LissaSolver(
        scale=2.9, maxiter=100, variance_reduction=False, preconditioner=None
    )
    op = DenseOperator(matrix, tags=SYM)
    with pytest.raises(influx.InputError) as excinfo:
        solver.solve(solver.init(op), rhs)
    message = str(excinfo.value)
    assert "LiSSA diverged" in message
    assert "relative residual" in message
    assert "scale=2.900e+00 (given; step 1/scale=3.448e-01)" in message
    assert "leave scale=None" in message


def test_auto_scale_divergence_names_the_measurements(monkeypatch, backend_name):
    """A run that diverges with ``scale=None`` states the eigenvalues it
    measured and which batch, and does not advise leaving scale=None."""
    monkeypatch.setattr(lissa_module, "AUTO_SCALE_FACTOR", 0.2)
    model, train, test, *_ = outlier_problem(backend_name)
    with pytest.raises(influx.InputError, match="LiSSA diverged") as excinfo:
        influx.compute_influence_factors(
            model,
            train,
            test,
            "lissa",
            seed=0,
            maxiter=200,
            variance_reduction=False,
            preconditioner=None,
        )
    message = str(excinfo.value)
    assert "chosen as 0.2 x" in message
    assert f"over the {N // BATCH} batch operators (batch {OUTLIER // BATCH})" in (
        message
    )
    assert "the Hessian's eigenvalue estimates lie in" in message
    assert "leave scale=None" not in message
    assert "hessian_regularization" in message


# -- an indefinite Hessian: both extremes reported ------------------------------


@pytest.mark.parametrize("preconditioner", [None, "nystrom"])
def test_indefinite_dense_reports_both_extremes(preconditioner):
    matrix = spd_matrix([-0.3, 0.1, 0.2, 0.4, 0.7], seed=5)
    solver = LissaSolver(seed=0, preconditioner=preconditioner)
    with pytest.raises(influx.InputError, match="hessian_regularization") as info:
        solver.init(DenseOperator(matrix, tags=SYM))
    message = str(info.value)
    # Lanczos is exact on a 5 x 5 matrix.
    assert "smallest eigenvalue at -3.000e-01" in message
    assert "largest at 7.000e-01" in message
    assert "by more than 0.3 " in message


def test_indefinite_mlp_hessian_reports_a_positive_largest(backend_name):
    """An untrained tanh MLP's Hessian is indefinite: the message gives its
    largest eigenvalue (positive, to 1e-3) and a negative smallest one."""
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((12, 2)), rng.standard_normal((12, 1))
    model = wrap_mlp(backend_name, mlp_weights((2, 3, 1), seed=2), loss="mse")
    train = influx.batches(x, y, batch_size=4)
    hessian = batch_hessian(model, x, y)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert eigenvalues[0] < -1e-3 < 1e-3 < eigenvalues[-1]
    with pytest.raises(influx.InputError, match="positive definite") as excinfo:
        LissaSolver(seed=0, preconditioner=None).init(HessianOperator(model, train))
    message = str(excinfo.value)
    smallest = float(message.split("smallest eigenvalue at ")[1].split(" ")[0])
    largest = float(message.split("largest at ")[1].split(" ")[0])
    assert largest == pytest.approx(eigenvalues[-1], rel=1e-3)
    assert eigenvalues[0] * (1 + 1e-3) <= smallest < 0  # Ritz value, 4 digits


# -- numpy scalars as options ---------------------------------------------------


def test_numpy_integers_and_floats_are_accepted():
    lissa = LissaSolver(
        maxiter=np.int64(50), seed=np.int32(3), rtol=np.float32(1e-3), scale=np.int64(2)
    )
    assert type(lissa.maxiter) is int and lissa.maxiter == 50
    assert type(lissa.seed) is int and type(lissa.rtol) is float
    assert type(lissa.scale) is float and lissa.scale == 2.0
    cg = CgSolver(maxiter=np.int64(50), rtol=np.float64(1e-6), atol=np.int64(0))
    assert type(cg.maxiter) is int and cg.maxiter == 50 and type(cg.atol) is float
    arnoldi = ArnoldiSolver(
        rank_estimate=np.int64(2),
        krylov_dimension=np.int16(5),
        maxiter=np.int64(50),
        tol=np.float32(1e-6),
        seed=np.uint8(1),
    )
    assert (arnoldi.rank_estimate, arnoldi.krylov_dimension) == (2, 5)
    assert type(arnoldi.rank_estimate) is int and type(arnoldi.maxiter) is int
    nystrom = NystromPreconditioner(rank=np.int64(3), seed=np.int64(0))
    assert type(nystrom.rank) is int and type(nystrom.seed) is int


def test_numpy_maxiter_solves(backend_name):
    """Through the public API, on one batch (LiSSA is then deterministic)."""
    model, _, test, _, x, y = outlier_problem(backend_name)
    train = [(x[:10], y[:10])]
    direct = to_numpy(influx.compute_influence_factors(model, train, test, "direct"))
    options = {
        "cg": {"maxiter": np.int64(50), "rtol": np.float32(1e-6)},
        "lissa": {"maxiter": np.int64(500), "rtol": np.float64(1e-10)},
        "arnoldi": {"rank_estimate": np.int64(3), "maxiter": np.int64(50)},
    }
    for method, kwargs in options.items():
        factors = influx.compute_influence_factors(
            model, train, test, method, hessian_perturbation=np.float64(0.0), **kwargs
        )
        assert rel_err(factors, direct) < 1e-5, method


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: LissaSolver(maxiter=0), influx.InputError, "maxiter must be"),
        (lambda: LissaSolver(maxiter=True), TypeError, "maxiter must be an int"),
        (lambda: LissaSolver(maxiter=50.0), TypeError, "maxiter must be an int"),
        (lambda: LissaSolver(rtol=float("nan")), influx.InputError, "rtol"),
        (lambda: LissaSolver(scale=-1), influx.InputError, "scale"),
        (lambda: LissaSolver(dampen="0.1"), TypeError, "dampen"),
        (lambda: CgSolver(maxiter=np.float64(3)), TypeError, "maxiter"),
        (lambda: CgSolver(rtol=-1e-3), influx.InputError, "rtol"),
        (lambda: ArnoldiSolver(rank_estimate=np.int64(0)), influx.InputError, "rank"),
        (lambda: ArnoldiSolver(seed=1.5), TypeError, "seed"),
        (lambda: NystromPreconditioner(rank=2.0), TypeError, "rank"),
    ],
)
def test_bad_options_are_named(factory, error, match):
    with pytest.raises(error, match=match):
        factory()
