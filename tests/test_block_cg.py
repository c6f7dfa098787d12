"""Block conjugate gradients (``CgSolver(block=True)``) against direct solves.

References are dense float64 numpy solves (``numpy.linalg.solve``) of the same
matrix, or of the dense Hessian of a tanh MLP built by the framework's own
``hessian`` transform (``tests/models.batch_hessian``), independent of influx's
Hessian-vector products.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from models import batch_hessian, mlp_weights, rel_err, spd_matrix, wrap_mlp

import influx
from influx.operators import DenseOperator
from influx.solvers import CgSolver, NystromPreconditioner

SYM = frozenset({"symmetric"})


def numpy_solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return np.linalg.solve(matrix, rhs.T).T


def solve(solver: CgSolver, matrix: Any, rhs: Any, shift: float = 0.0):
    op = DenseOperator(matrix, tags=SYM)
    if shift:
        op = op.shift(shift)
    return solver.solve(solver.init(op), rhs)


def awkward_rhs(size: int, seed: int = 0) -> np.ndarray:
    """Six right-hand sides: a duplicate, a zero and a dependent column."""
    rhs = np.random.default_rng(seed).standard_normal((6, size))
    rhs[3] = rhs[1]  # duplicated
    rhs[4] = 0.0  # zero: converged before any product
    rhs[5] = 2 * rhs[0] - rhs[2]  # dependent on two others
    return rhs


@pytest.mark.parametrize("preconditioner", [None, "nystrom"])
def test_block_cg_equals_direct_with_dependent_columns(preconditioner):
    matrix = spd_matrix(np.logspace(-1, 2, 40), seed=1)
    rhs = awkward_rhs(40)
    solver = CgSolver(rtol=1e-12, atol=0.0, preconditioner=preconditioner, block=True)
    x, info = solve(solver, matrix, rhs)
    assert x.dtype == np.float64 and x.shape == rhs.shape
    assert np.all(np.isfinite(x))
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-8
    assert info.all_converged and info.message == ""
    assert info.extra["block"] is True
    assert info.iterations[4] == 0 and info.residual_norms[4] == 0.0
    np.testing.assert_array_equal(x[4], np.zeros(40))
    # The dependent columns are deflated: 3 directions (columns 0, 1, 2 span
    # all six), fewer as columns converge, until rounding separates them near
    # convergence.
    widths = info.extra["block_widths"]
    assert widths[0] == 3 and max(widths[:5]) <= 3
    true = np.linalg.norm(x @ matrix.T - rhs, axis=1)
    assert np.all(true <= 1e-10 * np.maximum(info.rhs_norms, 1.0))


def test_block_cg_float32():
    matrix = spd_matrix(np.linspace(0.5, 5.0, 30), seed=2)
    rhs = awkward_rhs(30, seed=3)
    solver = CgSolver(rtol=1e-6, atol=0.0, preconditioner=None, block=True)
    x, info = solve(solver, matrix.astype(np.float32), rhs.astype(np.float32))
    assert x.dtype == np.float32
    assert info.all_converged
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-5


def test_block_cg_initial_guess_and_atol():
    matrix = spd_matrix(np.linspace(0.5, 5.0, 12), seed=4)
    rhs = np.random.default_rng(5).standard_normal((3, 12))
    exact = numpy_solve(matrix, rhs)
    x0 = exact.copy()
    x0[1] = 0.0
    solver = CgSolver(rtol=1e-12, atol=1e-12, preconditioner=None, block=True)
    x, info = solver.solve(solver.init(DenseOperator(matrix, tags=SYM)), rhs, x0=x0)
    assert rel_err(x, exact) < 1e-10
    np.testing.assert_array_equal(info.iterations[[0, 2]], [0, 0])
    assert info.iterations[1] > 0


def test_block_cg_maxiter_warns_and_reports_true_residuals():
    matrix = spd_matrix(np.logspace(0, 3, 25), seed=6)
    rhs = np.random.default_rng(7).standard_normal((4, 25))
    solver = CgSolver(rtol=1e-12, atol=0.0, maxiter=2, preconditioner=None, block=True)
    with pytest.warns(influx.NotConvergedWarning, match="raise maxiter"):
        x, info = solve(solver, matrix, rhs)
    np.testing.assert_array_equal(info.iterations, [2, 2, 2, 2])
    true = np.linalg.norm(x @ matrix.T - rhs, axis=1)
    np.testing.assert_allclose(info.residual_norms, true, rtol=1e-8)


def test_block_cg_breakdown_on_indefinite_matrix_gives_no_nan():
    matrix = np.diag([1.0, -2.0, 3.0, 4.0])
    rhs = np.array([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 2.0, 0.0]])
    solver = CgSolver(rtol=1e-12, atol=0.0, preconditioner=None, block=True)
    with pytest.warns(influx.NotConvergedWarning, match="hessian_regularization"):
        x, info = solve(solver, matrix, rhs)
    assert np.all(np.isfinite(x))
    assert "not positive definite" in info.message
    assert not info.all_converged


def test_block_cg_on_indefinite_matrix_continues_column_by_column():
    """Negative curvature in the shared space stops only the columns that meet it.

    Block CG hands the running columns to one CG each (as ``block=False``):
    the right-hand side in the positive eigenspace converges to the exact
    solution, the one with a component along the negative eigenvalue stops.
    """
    matrix = np.diag([1.0, 2.0, 3.0, -1.0])
    rhs = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    plain = CgSolver(rtol=1e-12, atol=0.0, preconditioner=None, block=False)
    block = CgSolver(rtol=1e-12, atol=0.0, preconditioner=None, block=True)
    with pytest.warns(influx.NotConvergedWarning, match="not positive definite"):
        expected, plain_info = solve(plain, matrix, rhs)
    with pytest.warns(influx.NotConvergedWarning, match="not positive definite"):
        x, info = solve(block, matrix, rhs)
    np.testing.assert_array_equal(info.converged, [True, False])
    np.testing.assert_array_equal(plain_info.converged, [True, False])
    np.testing.assert_allclose(x[0], [1.0, 0.5, 1 / 3, 0.0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x[0], expected[0], rtol=1e-10, atol=1e-12)
    assert info.extra["plain_after_indefinite"]
    assert np.all(np.isfinite(x))


def _ill_conditioned(size: int = 200) -> np.ndarray:
    """20 large eigenvalues (10 .. 1e3) over a spread tail (1e-3 .. 1e-1)."""
    tail = np.logspace(-3, -1, size - 20)
    return spd_matrix(np.concatenate([np.logspace(1, 3, 20), tail]), seed=8)


@pytest.mark.parametrize("rank", [None, 30])
def test_block_cg_needs_no_more_iterations_than_plain(rank):
    matrix = _ill_conditioned()
    rhs = np.random.default_rng(9).standard_normal((8, 200))
    expected = numpy_solve(matrix + 0.01 * np.eye(200), rhs)
    iterations = {}
    for block in (False, True):
        preconditioner = None if rank is None else NystromPreconditioner(rank, seed=0)
        solver = CgSolver(
            rtol=1e-8, atol=0.0, preconditioner=preconditioner, block=block
        )
        x, info = solve(solver, matrix, rhs, shift=0.01)
        assert info.all_converged, block
        assert rel_err(x, expected) < 1e-6, block
        iterations[block] = int(info.iterations.max())
    assert iterations[True] <= iterations[False], iterations
    if rank is None:  # the shared Krylov space pays off without a preconditioner
        assert iterations[True] < 0.8 * iterations[False], iterations


def test_block_cg_option_is_checked():
    with pytest.raises(TypeError, match="block must be True or False"):
        CgSolver(block="yes")


# -- on the model backends ---------------------------------------------------------

SIZES = (3, 5, 2)  # P = 3*5 + 5 + 5*2 + 2 = 32
N, BATCH = 23, 7  # uneven batches: 7, 7, 7, 2
LAMBDA = 0.3


@functools.cache
def mlp_problem(backend_name: str, dtype: str) -> tuple[Any, ...]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((N, 3)), rng.standard_normal((N, 2))
    x_test, y_test = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    x_test[3], y_test[3] = x_test[1], y_test[1]  # a duplicated test point
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=1), dtype=dtype)
    hessian = batch_hessian(wrap_mlp(backend_name, mlp_weights(SIZES, seed=1)), x, y)
    shift = LAMBDA + max(0.0, -float(np.linalg.eigvalsh(hessian)[0]))
    return model, x, y, x_test, y_test, hessian + shift * np.eye(32), shift


@pytest.mark.parametrize(("dtype", "tolerance"), [("float64", 1e-8), ("float32", 1e-4)])
def test_block_cg_on_models_equals_direct(backend_name, dtype, tolerance):
    model, x, y, x_test, y_test, regularised, shift = mlp_problem(backend_name, dtype)
    train = influx.batches(x.astype(dtype), y.astype(dtype), batch_size=BATCH)
    test = influx.batches(x_test.astype(dtype), y_test.astype(dtype), batch_size=3)
    factors, info = influx.compute_influence_factors(
        model,
        train,
        test,
        "cg",
        hessian_perturbation=shift,
        return_info=True,
        rtol=1e-12 if dtype == "float64" else 1e-7,
        atol=0.0,
        block=True,
        preconditioner=None,  # rank 100 >= P would make it exact at once
    )
    reference_model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=1))
    grads, _ = reference_model.per_sample_grads(
        reference_model.backend.asarray(x_test, like=reference_model.parameters),
        reference_model.backend.asarray(y_test, like=reference_model.parameters),
    )
    from models import to_numpy

    expected = numpy_solve(regularised, to_numpy(grads))
    assert rel_err(factors, expected) < tolerance
    assert info.all_converged
    assert int(info.iterations.max()) > 3  # a real Krylov solve


def test_influence_object_block_cg_and_save_load(backend_name, tmp_path):
    model, x, y, x_test, y_test, _, shift = mlp_problem(backend_name, "float64")
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(x_test, y_test, batch_size=3)
    inf = influx.Influence(model, "cg", shift, rtol=1e-12, atol=0.0, block=True).fit(
        train
    )
    factors = inf.factors(test)
    direct = influx.Influence(model, "direct", shift).fit(train).factors(test)
    assert rel_err(factors, direct) < 1e-8
    inf.save(tmp_path / "fitted.npz")
    loaded = influx.Influence.load(tmp_path / "fitted.npz", model, train)
    assert rel_err(loaded.factors(test), direct) < 1e-8


def test_block_cg_without_new_directions_says_so():
    # A (useless) preconditioner that maps every residual to zero leaves no
    # search direction: block CG stops at once and says why, with no NaN.
    from influx.solvers.preconditioners import FittedPreconditioner, Preconditioner

    class Zero(FittedPreconditioner):
        def apply(self, residuals):
            return residuals * 0.0

    class ZeroPreconditioner(Preconditioner):
        name = "zero"

        def fit(self, operator, dtype, *, progress=False):
            return Zero()

    matrix = spd_matrix(np.linspace(1.0, 2.0, 5), seed=10)
    rhs = np.random.default_rng(11).standard_normal((2, 5))
    solver = CgSolver(preconditioner=ZeroPreconditioner(), block=True)
    with pytest.warns(influx.NotConvergedWarning, match="no new search direction"):
        x, info = solve(solver, matrix, rhs)
    np.testing.assert_array_equal(x, np.zeros((2, 5)))
    np.testing.assert_array_equal(info.iterations, [0, 0])
