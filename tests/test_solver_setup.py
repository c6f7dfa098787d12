"""The setup linear algebra of the Nystrom preconditioner and block Krylov Arnoldi.

The Nystrom reference is the construction influx used before (QR of the
Gaussian sketch on the host, then a full SVD of the ``[r, P]`` factor), written
out here in numpy; the Arnoldi reference is ``numpy.linalg.eigh`` of the dense
matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import spd_matrix, to_backend, to_numpy

import influx
from influx.operators import DenseOperator
from influx.solvers import ArnoldiSolver, NystromPreconditioner

SYM = frozenset({"symmetric"})


def nystrom_by_svd(hessian: np.ndarray, shift: float, rank: int, seed: int):
    """The previous construction: ``P^{-1}`` as a dense ``[P, P]`` matrix."""
    size = hessian.shape[0]
    rank = min(rank, size)
    eps = np.finfo(np.float64).eps
    test, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, rank)))
    test = test.T
    image = test @ hessian
    nu = np.sqrt(size) * eps * np.linalg.norm(image)
    image = image + nu * test
    core = test @ image.T
    values, vectors = np.linalg.eigh((core + core.T) / 2)
    keep = values > values.max() * rank * eps
    factor = (vectors[:, keep] / np.sqrt(values[keep])).T
    _, singular, rows = np.linalg.svd(factor @ image, full_matrices=False)
    eigenvalues = np.maximum(singular**2 - nu, 0.0)
    usable = eigenvalues + shift > eigenvalues.max() * rank * eps
    rows, eigenvalues = rows[: usable.sum()], eigenvalues[usable]
    floor = eigenvalues.min() + shift
    return np.eye(size) + rows.T @ np.diag(floor / (eigenvalues + shift) - 1) @ rows


@pytest.mark.parametrize(("size", "rank"), [(60, 10), (120, 30), (40, 40), (9, 100)])
def test_nystrom_equals_the_svd_construction(size, rank):
    rng = np.random.default_rng(size)
    spectrum = np.concatenate(
        [np.logspace(-2, 3, size // 2), rng.uniform(0.0, 1e-2, size - size // 2)]
    )
    hessian = spd_matrix(spectrum, seed=size)
    operator = DenseOperator(hessian, tags=SYM).shift(0.05)
    fitted = NystromPreconditioner(rank=rank, seed=3).fit(operator, np.float64)
    applied = fitted.apply(np.eye(size))
    expected = nystrom_by_svd(hessian, 0.05, rank, 3)
    assert np.max(np.abs(applied - expected)) < 1e-10 * np.max(np.abs(expected))
    # Orthonormal rows; those of the smallest eigenvalues (about 1e-4 of the
    # largest here) only to eps / 1e-4 ** 2, as the Gram matrix squares them.
    vectors = np.asarray(fitted.vectors)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(vectors.shape[0]), atol=1e-8)


def test_nystrom_on_a_backend_equals_numpy(backend_name):
    hessian = spd_matrix(np.logspace(-2, 2, 50), seed=4)
    native = to_backend(backend_name, hessian)
    model_backend = influx.backends.get_backend(backend_name)
    operator = DenseOperator(native, tags=SYM, backend=model_backend).shift(0.1)
    fitted = NystromPreconditioner(rank=12, seed=5).fit(operator, native.dtype)
    applied = to_numpy(fitted.apply(to_backend(backend_name, np.eye(50))))
    expected = nystrom_by_svd(hessian, 0.1, 12, 5)
    assert np.max(np.abs(applied - expected)) < 1e-10 * np.max(np.abs(expected))


def _top(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(np.abs(values))[-rank:]
    order = order[np.argsort(values[order])]
    return values[order], vectors[:, order]


@pytest.mark.parametrize(
    ("krylov_dimension", "tol", "accuracy"), [(None, 1e-8, 1e-10), (70, 1e-4, 1e-6)]
)
def test_block_krylov_matches_dense_eigh(krylov_dimension, tol, accuracy):
    # A clear gap after the 6 largest eigenvalues; 70 truncates the last block.
    spectrum = np.concatenate(
        [[40.0, 30.0, 20.0, 15.0, 12.0, 10.0], np.linspace(0.1, 2.0, 94)]
    )
    matrix = spd_matrix(spectrum, seed=6)
    solver = ArnoldiSolver(rank_estimate=6, krylov_dimension=krylov_dimension, tol=tol)
    op = DenseOperator(matrix, tags=SYM)
    state = solver.init(op)
    values, vectors = _top(matrix, 6)
    np.testing.assert_allclose(np.asarray(state.eigenvalues), values, rtol=accuracy)
    found = np.asarray(state.eigenvectors)
    assert found.shape == (100, 6)
    # Same eigenvectors up to sign.
    cosines = np.abs(np.sum(found * vectors, axis=0))
    np.testing.assert_allclose(cosines, 1.0, atol=np.sqrt(accuracy))
    assert state.converged


def test_block_krylov_residuals_are_the_true_ones_when_truncated():
    # No gap: the basis limit (37, not a multiple of the block of 16) stops
    # the iteration, and the warning reports the true Ritz residual.
    spectrum = np.linspace(1.0, 3.0, 120)
    matrix = spd_matrix(spectrum, seed=7)
    solver = ArnoldiSolver(rank_estimate=6, krylov_dimension=37, tol=1e-12)
    with pytest.warns(influx.NotConvergedWarning, match="basis of 37") as record:
        state = solver.init(DenseOperator(matrix, tags=SYM))
    values = np.asarray(state.eigenvalues)
    vectors = np.asarray(state.eigenvectors)
    true = np.linalg.norm(matrix @ vectors - vectors * values, axis=0).max()
    reported = float(str(record[0].message).split("up to ")[1].split(" of")[0])
    assert reported == pytest.approx(true / np.abs(values).max(), rel=1e-2)


def test_block_krylov_basis_smaller_than_one_block():
    # krylov_dimension below the block (rank + 10): the first block is kept.
    matrix = spd_matrix(np.linspace(1.0, 3.0, 40), seed=8)
    solver = ArnoldiSolver(rank_estimate=6, krylov_dimension=8, tol=1e-12)
    with pytest.warns(influx.NotConvergedWarning, match="basis of 16"):
        state = solver.init(DenseOperator(matrix, tags=SYM))
    values = np.asarray(state.eigenvalues)
    assert values.shape == (6,) and np.all((values >= 1.0) & (values <= 3.0))
