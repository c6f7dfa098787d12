"""Non-convergence on a model, through ``influx.Influence``: each iterative
method warns ``NotConvergedWarning`` with the option to change, and reports it
in ``info``.

The reference for "not converged" is the exact (direct) solve: the result
handed back is still a finite, partial answer, off by more than the tolerance.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from models import mlp_weights, rel_err, to_backend, to_numpy, wrap_mlp

import influx

SIZES = (3, 6, 2)  # P = 3*6 + 6 + 6*2 + 2 = 38
N, N_TEST = 40, 3
REG = 0.8


@functools.cache
def problem(backend_name: str) -> tuple[Any, Any, Any, np.ndarray]:
    """``(model, train, test, direct factors)`` of a tanh MLP."""
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((N, 3)), rng.standard_normal((N, 2))
    xt, yt = rng.standard_normal((N_TEST, 3)), rng.standard_normal((N_TEST, 2))
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=12))

    def data(a: np.ndarray, b: np.ndarray, size: int) -> Any:
        return influx.batches(
            to_backend(backend_name, a), to_backend(backend_name, b), batch_size=size
        )

    train, test = data(x, y, 10), data(xt, yt, N_TEST)
    direct = influx.Influence(model, "direct", REG).fit(train).factors(test)
    return model, train, test, to_numpy(direct)


def test_cg_maxiter_too_small(backend_name):
    model, train, test, direct = problem(backend_name)
    inf = influx.Influence(
        model, "cg", REG, maxiter=2, rtol=1e-10, atol=0.0, preconditioner=None
    ).fit(train)
    with pytest.warns(influx.NotConvergedWarning, match="raise maxiter") as record:
        factors = to_numpy(inf.factors(test))
    assert "CG" in str(record[0].message) or "cg" in str(record[0].message)
    info = inf.info
    assert info.method == "cg"
    np.testing.assert_array_equal(info.converged, [False] * N_TEST)
    np.testing.assert_array_equal(info.iterations, [2] * N_TEST)
    assert "raise maxiter" in info.message
    # Two steps: finite, closer to the solution than zero, but not there.
    assert np.all(np.isfinite(factors))
    error = rel_err(factors, direct)
    assert 1e-6 < error < 1.0
    # The reported residuals are above the tolerance asked for.
    assert np.all(info.residual_norms > 1e-10 * info.rhs_norms)


def test_lissa_too_few_steps(backend_name):
    model, train, test, direct = problem(backend_name)
    inf = influx.Influence(model, "lissa", REG, maxiter=5, rtol=1e-10, seed=0)
    inf.fit(train)
    with pytest.warns(influx.NotConvergedWarning, match="raise maxiter"):
        factors = to_numpy(inf.factors(test))
    info = inf.info
    assert info.method == "lissa"
    np.testing.assert_array_equal(info.converged, [False] * N_TEST)
    assert np.all(info.iterations <= 5)
    assert np.all(np.isfinite(factors))
    assert rel_err(factors, direct) > 1e-8


def test_arnoldi_krylov_basis_too_small(backend_name):
    model, train, test, _ = problem(backend_name)
    inf = influx.Influence(
        model, "arnoldi", REG, rank_estimate=6, krylov_dimension=8, tol=1e-12
    )
    with pytest.warns(influx.NotConvergedWarning, match="raise krylov_dimension"):
        inf.fit(train)
    factors = to_numpy(inf.factors(test))
    info = inf.info
    assert info.method == "arnoldi"
    np.testing.assert_array_equal(info.converged, [False] * N_TEST)
    assert "did not converge" in info.message
    assert np.all(np.isfinite(factors))
