"""Direct solve with the exact, materialised operator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx.errors import NotPositiveDefiniteWarning
from influx.operators import LinearOperator
from influx.solvers._base import SolveInfo, Solver, row_norms, to_host

__all__ = ["DirectSolver"]


@dataclass(frozen=True)
class DirectState:
    """The materialised operator and its inverse.

    Attributes
    ----------
    matrix
        ``A`` symmetrised, ``[P, P]``.
    inverse
        ``A^{-1}`` (or the pseudo-inverse when ``A`` is singular), ``[P, P]``.
    positive_definite
        Whether the Cholesky factorisation succeeded.
    min_eigenvalue
        Smallest eigenvalue when the fallback ran, else ``None``.
    """

    matrix: Any
    inverse: Any
    positive_definite: bool
    min_eigenvalue: float | None
    operator: LinearOperator


class DirectSolver(Solver):
    """Materialise ``A`` (``[P, P]``) and invert it once.

    ``init`` symmetrises the matrix and factors it by Cholesky; when that fails
    (``A`` not positive definite) it warns and falls back to an
    eigendecomposition, inverting the eigenvalues that are not numerically zero
    (a pseudo-inverse). ``solve`` is then two matrix products per call. Memory
    is ``O(P^2)``: use it for models up to a few ten thousand parameters.
    """

    name = "direct"

    def __init__(self) -> None:
        pass

    def init(self, operator: LinearOperator, *, progress: bool = False) -> DirectState:
        dense = operator.to_dense(progress)
        xp = array_namespace(dense)
        matrix = (dense + dense.T) / 2
        try:
            factor = xp.linalg.cholesky(matrix)
            ok = bool(xp.all(xp.isfinite(factor)))  # JAX returns NaN, torch raises
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            factor, ok = None, False
        if ok:
            factor_inverse = xp.linalg.inv(factor)
            inverse = factor_inverse.T @ factor_inverse
            return DirectState(matrix, inverse, True, None, operator)

        eigenvalues, eigenvectors = xp.linalg.eigh(matrix)
        smallest = float(eigenvalues[0])
        largest = float(xp.max(xp.abs(eigenvalues)))
        cutoff = largest * operator.size * float(np.finfo(_numpy_dtype(matrix)).eps)
        keep = xp.abs(eigenvalues) > cutoff
        safe = xp.where(keep, eigenvalues, xp.ones_like(eigenvalues))
        inverted = xp.where(keep, 1.0 / safe, xp.zeros_like(eigenvalues))
        inverse = (eigenvectors * inverted) @ eigenvectors.T
        warnings.warn(
            f"The regularised Hessian is not positive definite (smallest eigenvalue "
            f"{smallest:.3e}); the direct solve falls back to an eigendecomposition "
            f"and inverts the nonzero eigenvalues. Raise hessian_regularization above "
            f"{max(-smallest, 0.0):.3e} for a positive-definite Hessian.",
            NotPositiveDefiniteWarning,
            stacklevel=3,
        )
        return DirectState(matrix, inverse, False, smallest, operator)

    def solve(
        self, state: DirectState, rhs: Any, *, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        xp = array_namespace(rhs)
        b = xp.astype(rhs, state.matrix.dtype)
        x = b @ state.inverse
        residual = x @ state.matrix - b
        k = int(b.shape[0])
        info = SolveInfo(
            method=self.name,
            iterations=np.ones(k, dtype=np.int64),
            residual_norms=to_host(row_norms(residual), state.operator),
            rhs_norms=to_host(row_norms(b), state.operator),
            converged=np.ones(k, dtype=bool),
            extra={
                "positive_definite": state.positive_definite,
                "min_eigenvalue": state.min_eigenvalue,
            },
        )
        return xp.astype(x, rhs.dtype), info


def _numpy_dtype(array: Any) -> Any:
    name = str(array.dtype).rsplit(".", 1)[-1]
    return np.dtype(name)
