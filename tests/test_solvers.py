"""The core solvers and operators on numpy matrices, with no framework at all.

Every solver is run on :class:`influx.operators.DenseOperator` over numpy arrays
and compared with ``numpy.linalg``. Nothing here imports torch or JAX.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import spd_matrix

import influx
from influx.operators import DenseOperator, LinearOperator
from influx.solvers import (
    ArnoldiSolver,
    CgSolver,
    DirectSolver,
    LissaSolver,
    NystromPreconditioner,
    SolveInfo,
    make_solver,
)

SYM = frozenset({"symmetric"})


def numpy_solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Rows ``x_k`` with ``matrix @ x_k = rhs[k]``."""
    return np.linalg.solve(matrix, rhs.T).T


def rel_err(actual, expected) -> float:
    """Max abs difference relative to the largest reference magnitude."""
    expected = np.asarray(expected)
    return float(
        np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))
    )


def run(solver, matrix: np.ndarray, rhs: np.ndarray, tags=SYM):
    op = DenseOperator(matrix, tags=tags)
    return solver.solve(solver.init(op), rhs)


@pytest.fixture
def spd():
    """A 7x7 SPD matrix (eigenvalues 0.5 .. 6) and 4 random right-hand sides."""
    matrix = spd_matrix([0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0], seed=1)
    rhs = np.random.default_rng(2).standard_normal((4, 7))
    return matrix, rhs


# -- Direct -------------------------------------------------------------------


def test_direct_matches_numpy_solve(spd):
    matrix, rhs = spd
    x, info = run(DirectSolver(), matrix, rhs)
    assert isinstance(x, np.ndarray)
    assert x.dtype == np.float64
    assert x.shape == rhs.shape
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-12
    assert isinstance(info, SolveInfo)
    assert info.method == "direct"
    assert info.all_converged
    np.testing.assert_array_equal(info.iterations, np.ones(4))
    np.testing.assert_allclose(info.rhs_norms, np.linalg.norm(rhs, axis=1), rtol=1e-14)
    assert np.all(info.relative_residuals < 1e-12)
    assert info.extra["positive_definite"] is True
    assert info.extra["min_eigenvalue"] is None
    assert info.message == ""


def test_direct_indefinite_warns_and_still_solves():
    # Nonsingular but indefinite: the eigendecomposition fallback inverts exactly.
    eigenvalues = [-2.0, -0.5, 1.0, 2.0, 3.0]
    matrix = spd_matrix(eigenvalues, seed=3)
    rhs = np.random.default_rng(4).standard_normal((3, 5))
    with pytest.warns(
        influx.NotPositiveDefiniteWarning, match="hessian_regularization"
    ):
        x, info = run(DirectSolver(), matrix, rhs)
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-12
    assert info.extra["positive_definite"] is False
    assert info.extra["min_eigenvalue"] == pytest.approx(-2.0, rel=1e-12)
    assert np.all(info.relative_residuals < 1e-12)


def test_direct_singular_uses_pseudo_inverse():
    # A PSD matrix with a zero eigenvalue: the result is the pseudo-inverse's.
    matrix = spd_matrix([0.0, 1.0, 2.0, 4.0], seed=5)
    rhs = np.random.default_rng(6).standard_normal((2, 4))
    with pytest.warns(influx.NotPositiveDefiniteWarning):
        x, _ = run(DirectSolver(), matrix, rhs)
    assert rel_err(x, rhs @ np.linalg.pinv(matrix).T) < 1e-10


# -- CG -----------------------------------------------------------------------


def test_cg_per_column_stopping():
    eigenvalues = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 8.0])
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    matrix = (q * eigenvalues) @ q.T
    rhs = np.stack(
        [
            q[:, 3],  # an eigenvector: one iteration
            q[:, 0] + q[:, 5],  # two eigen-directions: two iterations
            rng.standard_normal(6),  # generic: six iterations
            np.zeros(6),  # zero: converged before any product, x = 0
        ]
    )
    plain = CgSolver(rtol=1e-12, atol=0.0, preconditioner=None, block=False)
    x, info = run(plain, matrix, rhs)
    np.testing.assert_array_equal(info.iterations, [1, 2, 6, 0])
    assert info.all_converged
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-12
    np.testing.assert_array_equal(x[3], np.zeros(6))
    assert info.residual_norms[3] == 0.0
    assert np.all(info.residual_norms[:3] <= 1e-12 * info.rhs_norms[:3])
    # The recursive residual the solver reports is close to the true one.
    true = np.linalg.norm(x @ matrix.T - rhs, axis=1)
    assert np.all(true <= 1e-11 * np.maximum(info.rhs_norms, 1.0))


def test_cg_atol_stops_small_columns_early(spd):
    matrix, rhs = spd
    rhs = rhs.copy()
    rhs[1] *= 1e-9  # already below atol: stops at once with x = 0
    x, info = run(CgSolver(rtol=1e-12, atol=1e-6), matrix, rhs)
    assert info.iterations[1] == 0
    np.testing.assert_array_equal(x[1], np.zeros(7))
    others = [0, 2, 3]
    assert rel_err(x[others], numpy_solve(matrix, rhs[others])) < 1e-6


@pytest.mark.parametrize("shape", ["shared", "per_column"])
def test_cg_initial_guess(spd, shape):
    matrix, rhs = spd
    exact = numpy_solve(matrix, rhs)
    if shape == "shared":
        x0 = exact[0]  # [P]: exact for column 0, a start for the others
        zero_iteration_columns = [0]
    else:
        x0 = exact.copy()  # [K, P]: exact for columns 0 and 2
        x0[[1, 3]] = np.random.default_rng(8).standard_normal((2, 7))
        zero_iteration_columns = [0, 2]
    x, info = run(CgSolver(rtol=1e-12, atol=1e-12, x0=x0), matrix, rhs)
    assert rel_err(x, exact) < 1e-10
    assert all(info.iterations[k] == 0 for k in zero_iteration_columns)
    assert all(
        info.iterations[k] > 0 for k in range(4) if k not in zero_iteration_columns
    )


def test_cg_initial_guess_bad_shape(spd):
    matrix, rhs = spd
    with pytest.raises(influx.InputError, match="x0"):
        run(CgSolver(x0=np.zeros(3)), matrix, rhs)


def test_cg_maxiter_too_small_warns(spd):
    matrix, rhs = spd
    with pytest.warns(influx.NotConvergedWarning, match="raise maxiter"):
        plain = CgSolver(
            rtol=1e-12, atol=0.0, maxiter=2, preconditioner=None, block=False
        )
        x, info = run(plain, matrix, rhs)
    assert not info.all_converged
    np.testing.assert_array_equal(info.iterations, [2, 2, 2, 2])
    assert "raise maxiter" in info.message
    # Two CG steps still reduce the residual, but not to the tolerance.
    true = np.linalg.norm(x @ matrix.T - rhs, axis=1)
    np.testing.assert_allclose(info.residual_norms, true, rtol=1e-8)
    assert np.all(true < np.linalg.norm(rhs, axis=1))
    assert np.all(true > 1e-12 * np.linalg.norm(rhs, axis=1))


def test_cg_breakdown_on_indefinite_matrix():
    matrix = np.diag([1.0, -2.0, 3.0])
    rhs = np.array(
        [
            [1.0, 1.0, 0.0],  # p.Ap = 1 - 2 < 0 at the first step: breakdown
            [1.0, 0.0, 2.0],  # lives on the positive part: converges
        ]
    )
    with pytest.warns(influx.NotConvergedWarning, match="hessian_regularization"):
        plain = CgSolver(rtol=1e-12, atol=0.0, preconditioner=None, block=False)
        x, info = run(plain, matrix, rhs)
    np.testing.assert_array_equal(info.converged, [False, True])
    assert "not positive definite" in info.message
    np.testing.assert_array_equal(x[0], np.zeros(3))  # stopped before any step
    np.testing.assert_allclose(x[1], [1.0, 0.0, 2.0 / 3.0], rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=9),
    k=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    preconditioner=st.sampled_from(["nystrom", None]),
)
def test_cg_and_direct_match_numpy_on_random_spd(size, k, seed, preconditioner):
    rng = np.random.default_rng(seed)
    eigenvalues = rng.uniform(0.1, 10.0, size)  # condition number <= 100
    matrix = spd_matrix(eigenvalues, seed=seed)
    rhs = rng.standard_normal((k, size))
    expected = numpy_solve(matrix, rhs)
    x_direct, info_direct = run(DirectSolver(), matrix, rhs)
    cg = CgSolver(rtol=1e-13, atol=0.0, preconditioner=preconditioner)
    x_cg, info_cg = run(cg, matrix, rhs)
    assert x_direct.shape == x_cg.shape == (k, size)
    assert rel_err(x_direct, expected) < 1e-10
    assert rel_err(x_cg, expected) < 1e-9
    assert info_direct.all_converged and info_cg.all_converged
    # CG needs at most about P products in exact arithmetic; allow some slack.
    assert int(info_cg.iterations.max()) <= 3 * size


def _decaying_spectrum(size: int = 200, seed: int = 3) -> np.ndarray:
    """An SPD matrix with 20 large eigenvalues (10..1e3) over a flat 1e-3 tail."""
    eigenvalues = np.concatenate([np.logspace(1, 3, 20), np.full(size - 20, 1e-3)])
    return spd_matrix(eigenvalues, seed=seed)


def test_nystrom_pcg_needs_far_fewer_iterations():
    matrix = _decaying_spectrum()
    rhs = np.random.default_rng(4).standard_normal((3, 200))
    op = DenseOperator(matrix, tags=SYM).shift(0.01)  # condition number ~1e5
    expected = numpy_solve(matrix + 0.01 * np.eye(200), rhs)
    results = {}
    for label, preconditioner in [
        ("plain", None),
        ("nystrom", NystromPreconditioner(rank=30, seed=0)),
    ]:
        solver = CgSolver(
            rtol=1e-10, atol=0.0, preconditioner=preconditioner, block=False
        )
        x, info = solver.solve(solver.init(op), rhs)
        assert info.all_converged, label
        assert rel_err(x, expected) < 1e-8, label
        results[label] = int(info.iterations.max())
    # The rank-30 sketch captures the 20 large eigenvalues: what is left has
    # a condition number of about (1e-3 + 0.01) / (1e-3 + 0.01) = 1.
    assert results["nystrom"] <= 8
    assert results["plain"] >= 5 * results["nystrom"], results
    assert info.extra["preconditioner"] == "nystrom"


def test_nystrom_full_rank_is_the_exact_inverse(spd):
    matrix, rhs = spd
    solver = CgSolver(rtol=1e-12, atol=0.0, preconditioner="nystrom")
    x, info = run(solver, matrix, rhs)
    np.testing.assert_array_equal(info.iterations, [1, 1, 1, 1])
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-10


def test_nystrom_on_indefinite_hessian_made_definite_by_the_shift():
    # H has a negative eigenvalue; H + 0.5 I is positive definite. The sketch
    # clips the negative estimate and the solve is still exact.
    matrix = spd_matrix([-0.2, 0.1, 1.0, 5.0, 20.0, 50.0], seed=5)
    rhs = np.random.default_rng(6).standard_normal((2, 6))
    op = DenseOperator(matrix, tags=SYM).shift(0.5)
    solver = CgSolver(rtol=1e-12, atol=0.0, preconditioner=NystromPreconditioner(3))
    x, info = solver.solve(solver.init(op), rhs)
    assert info.all_converged
    assert rel_err(x, numpy_solve(matrix + 0.5 * np.eye(6), rhs)) < 1e-10


def test_nystrom_is_reproducible_and_seeded():
    # Rank 10 against 20 large eigenvalues: the sketch depends on its seed.
    matrix = _decaying_spectrum(size=60)
    op = DenseOperator(matrix, tags=SYM).shift(0.01)
    rhs = np.random.default_rng(1).standard_normal((2, 60))
    expected = numpy_solve(matrix + 0.01 * np.eye(60), rhs)
    probe = np.random.default_rng(2).standard_normal((3, 60))
    applied, solutions = [], []
    for seed in (0, 0, 1):
        fitted = NystromPreconditioner(10, seed=seed).fit(op, np.float64)
        applied.append(fitted.apply(probe))
        solver = CgSolver(
            rtol=1e-10, atol=0.0, preconditioner=NystromPreconditioner(10, seed=seed)
        )
        x, info = solver.solve(solver.init(op), rhs)
        assert info.all_converged, seed
        assert rel_err(x, expected) < 1e-7, seed
        solutions.append((x, info.iterations))
    # The same seed reproduces the sketch and the solve bitwise.
    np.testing.assert_array_equal(applied[0], applied[1])
    np.testing.assert_array_equal(solutions[0][0], solutions[1][0])
    np.testing.assert_array_equal(solutions[0][1], solutions[1][1])
    # Another seed draws another sketch: a different preconditioner.
    assert rel_err(applied[2], applied[0]) > 1e-3
    assert not np.array_equal(solutions[2][0], solutions[0][0])


@pytest.mark.parametrize(
    ("spec", "match"),
    [("jacobi", "preconditioner must be"), (3, "preconditioner must be")],
)
def test_bad_preconditioner_is_named(spec, match):
    with pytest.raises(influx.InputError, match=match):
        CgSolver(preconditioner=spec)
    with pytest.raises(influx.InputError, match="rank"):
        NystromPreconditioner(rank=0)


# -- Arnoldi ------------------------------------------------------------------


def test_arnoldi_full_rank_equals_direct(spd):
    matrix, rhs = spd
    x_direct, _ = run(DirectSolver(), matrix, rhs)
    x, info = run(ArnoldiSolver(rank_estimate=7, residuals=True), matrix, rhs)
    assert rel_err(x, x_direct) < 1e-12
    assert info.all_converged
    assert info.extra["rank"] == 7
    np.testing.assert_allclose(
        info.extra["eigenvalues"], [0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0], rtol=1e-12
    )
    assert np.all(info.relative_residuals < 1e-12)


def low_rank_reference(matrix: np.ndarray, rhs: np.ndarray, rank: int):
    """``V diag(1/w) V^T b`` on the ``rank`` eigenpairs of largest magnitude."""
    w, v = np.linalg.eigh(matrix)
    top = np.argsort(np.abs(w))[-rank:]
    w, v = w[top], v[:, top]
    return ((rhs @ v) / w) @ v.T, np.sort(w)


def test_arnoldi_low_rank_matches_eigh_reference():
    eigenvalues = np.concatenate([np.linspace(0.2, 1.0, 16), [3.0, 4.0, 6.0, 9.0]])
    matrix = spd_matrix(eigenvalues, seed=9)
    rhs = np.random.default_rng(10).standard_normal((3, 20))
    expected, top = low_rank_reference(matrix, rhs, 4)
    x, info = run(
        ArnoldiSolver(rank_estimate=4, tol=1e-14, remainder="drop", residuals=True),
        matrix,
        rhs,
    )
    assert rel_err(x, expected) < 1e-10
    np.testing.assert_allclose(info.extra["eigenvalues"], top, rtol=1e-12)
    assert info.extra["rank"] == 4
    assert info.all_converged
    # The Lanczos path ran (not the dense one) and counted its products.
    assert 0 < info.iterations[0]
    # Dropping the small eigen-directions leaves a large residual.
    assert np.all(info.relative_residuals > 0.1)
    np.testing.assert_allclose(
        info.residual_norms, np.linalg.norm(x @ matrix.T - rhs, axis=1), rtol=1e-10
    )


def test_arnoldi_low_rank_keeps_largest_magnitude_even_if_negative():
    eigenvalues = np.concatenate([np.linspace(0.5, 1.0, 10), [5.0, -7.0]])
    matrix = spd_matrix(eigenvalues, seed=11)
    rhs = np.random.default_rng(12).standard_normal((2, 12))
    expected, top = low_rank_reference(matrix, rhs, 2)
    np.testing.assert_allclose(top, [-7.0, 5.0], rtol=1e-12)
    with pytest.warns(
        influx.NotPositiveDefiniteWarning, match="hessian_regularization"
    ):
        x, info = run(
            ArnoldiSolver(rank_estimate=2, tol=1e-14, remainder="drop"), matrix, rhs
        )
    assert rel_err(x, expected) < 1e-10
    np.testing.assert_allclose(info.extra["eigenvalues"], [-7.0, 5.0], rtol=1e-12)


# -- LiSSA --------------------------------------------------------------------


def test_lissa_dense_auto_scale_converges(spd):
    matrix, rhs = spd
    plain = LissaSolver(maxiter=5000, rtol=1e-13, seed=0, preconditioner=None)
    x, info = run(plain, matrix, rhs)
    # A dense operator is exact (not sampled): the recursion is deterministic
    # and converges to rtol; the error is about rtol * condition number.
    assert info.all_converged
    assert rel_err(x, numpy_solve(matrix, rhs)) < 1e-10
    lam = info.extra["largest_eigenvalue"]
    # Power iteration underestimates lambda_max = 6 by about its rtol (1e-3).
    assert 6.0 * (1 - 1e-2) < lam <= 6.0 * (1 + 1e-12)
    assert info.extra["scale"] == pytest.approx(1.5 * lam, rel=1e-14)
    assert np.all(info.relative_residuals < 1e-10)
    assert int(info.iterations[0]) < 5000


def test_lissa_dense_given_scale_and_seed_reproducible(spd):
    matrix, rhs = spd
    solver = LissaSolver(maxiter=5000, rtol=1e-13, scale=10.0, seed=3)
    x1, info1 = run(solver, matrix, rhs)
    x2, info2 = run(
        LissaSolver(maxiter=5000, rtol=1e-13, scale=10.0, seed=3), matrix, rhs
    )
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(info1.iterations, info2.iterations)
    assert info1.extra["scale"] == 10.0
    assert info1.extra["largest_eigenvalue"] is None
    assert rel_err(x1, numpy_solve(matrix, rhs)) < 1e-10
    # With scale=None, the seed fixes the power iteration: same numbers again.
    auto = [run(LissaSolver(rtol=1e-13, seed=5), matrix, rhs)[0] for _ in range(2)]
    np.testing.assert_array_equal(auto[0], auto[1])


def test_lissa_dampen_solves_shifted_system(spd):
    # The fixed point solves (A + dampen * scale * I) x = b.
    matrix, rhs = spd
    solver = LissaSolver(maxiter=5000, rtol=1e-13, scale=10.0, dampen=0.05)
    x, info = run(solver, matrix, rhs)
    assert info.all_converged
    shifted = matrix + 0.05 * 10.0 * np.eye(7)
    assert rel_err(x, numpy_solve(shifted, rhs)) < 1e-10


def test_lissa_h0_at_fixed_point_stops_at_once(spd):
    matrix, rhs = spd
    h0 = 10.0 * numpy_solve(matrix, rhs)  # h = scale * x at the fixed point
    x, info = run(LissaSolver(scale=10.0, h0=h0, rtol=1e-10), matrix, rhs)
    np.testing.assert_array_equal(info.iterations, np.ones(4))
    assert rel_err(x, h0 / 10.0) < 1e-12


def test_lissa_diverges_with_too_small_scale(spd):
    matrix, rhs = spd
    # scale far below lambda_max / 2 = 3: the recursion grows geometrically.
    with pytest.raises(influx.InputError, match="scale"):
        run(LissaSolver(scale=0.1, maxiter=10_000), matrix, rhs)


def test_lissa_rejects_non_positive_definite():
    matrix = -spd_matrix([1.0, 2.0, 3.0], seed=13)
    with pytest.raises(influx.InputError, match="hessian_regularization"):
        run(LissaSolver(seed=0), matrix, np.ones((1, 3)))


# -- make_solver --------------------------------------------------------------

# The seed's options, plus influx's additions (CG's preconditioner and block; Arnoldi's
# eigensolver, remainder and seed).
SEED_OPTIONS = {
    "cg": {
        "rtol": 1e-6,
        "atol": 1e-8,
        "maxiter": 17,
        "x0": np.zeros(3),
        "preconditioner": None,
        "block": True,
    },
    "lissa": {
        "maxiter": 33,
        "dampen": 0.01,
        "scale": 5.0,
        "h0": np.zeros(3),
        "rtol": 1e-5,
        "seed": 4,
        "variance_reduction": False,
        "preconditioner": None,
    },
    "arnoldi": {
        "rank_estimate": 2,
        "krylov_dimension": 3,
        "tol": 1e-9,
        "maxiter": 50,
        "eigensolver": "arpack",
        "remainder": "drop",
        "seed": 3,
        "residuals": True,
    },
    "direct": {},
}
SOLVER_CLASSES = {
    "cg": CgSolver,
    "lissa": LissaSolver,
    "arnoldi": ArnoldiSolver,
    "direct": DirectSolver,
}


@pytest.mark.parametrize("method", sorted(SEED_OPTIONS))
def test_make_solver_accepts_seed_options(method):
    options = SEED_OPTIONS[method]
    solver = make_solver(method, **options)
    assert isinstance(solver, SOLVER_CLASSES[method])
    assert solver.name == method
    assert sorted(type(solver).option_names()) == sorted(options)
    for name, value in options.items():
        stored = getattr(solver, name)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(stored, value)
        else:
            assert stored == value
    # Enum members and case-insensitive strings select the same class.
    assert isinstance(
        make_solver(influx.InversionMethod(method)), SOLVER_CLASSES[method]
    )
    assert isinstance(make_solver(method.upper()), SOLVER_CLASSES[method])


@pytest.mark.parametrize("method", sorted(SEED_OPTIONS))
def test_make_solver_rejects_unknown_option(method):
    valid = ", ".join(SEED_OPTIONS[method]) or "none"
    with pytest.raises(TypeError) as excinfo:
        make_solver(method, tolerance=1e-3)
    message = str(excinfo.value)
    assert "'tolerance'" in message
    assert repr(method) in message
    assert f"Valid options: {valid}." in message


def test_make_solver_names_all_unknown_options():
    with pytest.raises(TypeError, match=re.escape("'bar', 'foo'")):
        make_solver("cg", foo=1, bar=2, rtol=1e-3)


def test_make_solver_unknown_method():
    with pytest.raises(ValueError, match="'cg'"):
        make_solver("newton")


def test_seed_options_take_effect():
    # The options are used, not just stored: maxiter bounds CG's iterations.
    matrix = spd_matrix(np.arange(1.0, 11.0), seed=14)
    rhs = np.random.default_rng(15).standard_normal((1, 10))
    with pytest.warns(influx.NotConvergedWarning):
        _, info = run(make_solver("cg", maxiter=3, rtol=0.0, atol=0.0), matrix, rhs)
    assert info.iterations[0] == 3


# -- operators ----------------------------------------------------------------


@pytest.fixture
def two_matrices():
    rng = np.random.default_rng(16)
    # Non-symmetric on purpose: mv must apply A to each row (V @ A^T).
    return (
        rng.standard_normal((5, 5)),
        rng.standard_normal((5, 5)),
        rng.standard_normal((3, 5)),
    )


def test_operator_composition(two_matrices):
    a_mat, b_mat, vectors = two_matrices
    a, b = DenseOperator(a_mat), DenseOperator(b_mat)
    cases = {
        "a": (a, a_mat),
        "a + b": (a + b, a_mat + b_mat),
        "2 * a": (2 * a, 2 * a_mat),
        "a * 2.5": (a * 2.5, 2.5 * a_mat),
        "a.shift(0.7)": (a.shift(0.7), a_mat + 0.7 * np.eye(5)),
        "(a + 3 * b).shift(-1)": (
            (a + 3 * b).shift(-1.0),
            a_mat + 3 * b_mat - np.eye(5),
        ),
    }
    for name, (op, dense) in cases.items():
        assert op.size == 5, name
        np.testing.assert_allclose(
            op.mv(vectors), vectors @ dense.T, rtol=1e-13, err_msg=name
        )
        np.testing.assert_allclose(op.to_dense(), dense, rtol=1e-13, err_msg=name)
        assert op.dtype == np.float64, name


def test_operator_default_to_dense_and_shift_zero(two_matrices):
    a_mat, _, vectors = two_matrices

    class MatvecOnly(LinearOperator):
        """Defines only mv, so to_dense goes through the base class."""

        size = 5

        @property
        def like(self):
            return a_mat

        def mv(self, v):
            return v @ a_mat.T

    op = MatvecOnly()
    np.testing.assert_allclose(op.to_dense(), a_mat, rtol=1e-15)
    np.testing.assert_allclose(op.shift(0.0).to_dense(), a_mat, rtol=1e-15)
    np.testing.assert_allclose(
        (op + DenseOperator(a_mat)).mv(vectors), 2 * vectors @ a_mat.T, rtol=1e-14
    )


def test_operator_tags():
    psd = DenseOperator(
        np.eye(3), tags=frozenset({"symmetric", "positive_semidefinite"})
    )
    assert "positive_definite" in psd.shift(0.1).tags
    assert "positive_definite" not in psd.shift(0.0).tags
    assert not {"positive_semidefinite", "positive_definite"} & psd.shift(-0.1).tags
    assert (2 * psd).tags == psd.tags
    assert (-1 * psd).tags == frozenset({"symmetric"})
    assert "positive_definite" in (psd + psd.shift(1.0)).tags


def test_operator_size_mismatch():
    with pytest.raises(influx.InputError, match="sizes 2 and 3"):
        DenseOperator(np.eye(2)) + DenseOperator(np.eye(3))
    with pytest.raises(influx.InputError, match="square"):
        DenseOperator(np.ones((2, 3)))


def test_solvers_on_composed_operator(spd):
    # A regularised operator built by composition, as the influence API does.
    matrix, rhs = spd
    op = (
        0.5 * DenseOperator(matrix, tags=SYM) + DenseOperator(matrix, tags=SYM)
    ).shift(0.25)
    expected = numpy_solve(1.5 * matrix + 0.25 * np.eye(7), rhs)
    for solver in (
        DirectSolver(),
        CgSolver(rtol=1e-12, atol=0.0),
        ArnoldiSolver(rank_estimate=7),
    ):
        x, _ = solver.solve(solver.init(op), rhs)
        assert rel_err(x, expected) < 1e-10, solver.name


# -- Arnoldi: block Krylov and the floor remainder ----------------------------------


def _gapped_matrix(size: int = 120, seed: int = 21) -> np.ndarray:
    """8 eigenvalues 5..40 over a tail spread in [0.05, 0.5]: a clear gap."""
    rng = np.random.default_rng(seed)
    top = np.linspace(5.0, 40.0, 8)
    tail = rng.uniform(0.05, 0.5, size - 8)
    return spd_matrix(np.concatenate([tail, top]), seed=seed)


@pytest.mark.parametrize("eigensolver", ["krylov", "arpack"])
def test_arnoldi_eigensolvers_find_the_dominant_pairs(eigensolver):
    matrix = _gapped_matrix()
    rhs = np.random.default_rng(22).standard_normal((3, 120))
    solver = ArnoldiSolver(
        rank_estimate=8, tol=1e-8, eigensolver=eigensolver, remainder="drop"
    )
    x, info = run(solver, matrix, rhs)
    expected, top = low_rank_reference(matrix, rhs, 8)
    assert info.all_converged
    # Ritz values are accurate to the square of the residual over the gap.
    np.testing.assert_allclose(info.extra["eigenvalues"], top, rtol=1e-10)
    assert rel_err(x, expected) < 1e-6
    if eigensolver == "krylov":
        # Block products: a few passes of 18 vectors, far below P = 120.
        assert info.iterations[0] % 18 == 0
        assert info.iterations[0] < 120


def test_arnoldi_floor_remainder_inverts_the_rest_at_the_smallest_kept():
    matrix = _gapped_matrix()
    rhs = np.random.default_rng(23).standard_normal((3, 120))
    w, v = np.linalg.eigh(matrix)
    kept = v[:, -8:]
    coefficients = rhs @ kept
    expected = (coefficients / w[-8:]) @ kept.T + (rhs - coefficients @ kept.T) / w[-8]
    x, info = run(ArnoldiSolver(rank_estimate=8, tol=1e-8), matrix, rhs)
    assert rel_err(x, expected) < 1e-6
    assert info.extra["remainder_eigenvalue"] == pytest.approx(w[-8], rel=1e-9)
    # Closer to the exact solve than dropping the rest.
    exact = numpy_solve(matrix, rhs)
    dropped, _ = run(
        ArnoldiSolver(rank_estimate=8, tol=1e-8, remainder="drop"), matrix, rhs
    )
    assert rel_err(x, exact) < rel_err(dropped, exact)


def test_arnoldi_krylov_too_small_a_basis_warns():
    matrix = spd_matrix(np.linspace(1.0, 2.0, 80), seed=24)  # no gap at all
    rhs = np.ones((1, 80))
    solver = ArnoldiSolver(rank_estimate=10, krylov_dimension=20, tol=1e-12)
    with pytest.warns(influx.NotConvergedWarning, match="raise krylov_dimension"):
        _, info = run(solver, matrix, rhs)
    assert not info.all_converged


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"eigensolver": "lanczos"}, "eigensolver"),
        ({"remainder": "shift"}, "remainder"),
    ],
)
def test_arnoldi_bad_options_are_named(options, match):
    with pytest.raises(influx.InputError, match=match):
        ArnoldiSolver(**options)
