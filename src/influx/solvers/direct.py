"""Direct solve with the exact, materialised operator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._memory import check_dense_fits
from influx.errors import NotPositiveDefiniteWarning
from influx.operators import LinearOperator
from influx.solvers._base import (
    SolveInfo,
    Solver,
    dense_matrix,
    from_host,
    row_norms,
    to_host,
    working_dtype,
)
from influx.solvers._linalg import cholesky_solve_rows, solve_lower_rows

__all__ = ["DirectSolver"]

#: ``[P, P]`` matrices alive at once in ``init``: the Hessian, its batch term
#: and a temporary while it is summed, then the matrix and its factor.
DENSE_MATRICES = 4


@dataclass(frozen=True)
class DirectState:
    """The materialised operator and a factorisation of it.

    Attributes
    ----------
    matrix
        ``A`` symmetrised, ``[P, P]``.
    factor
        Lower Cholesky factor ``L`` of ``A`` (``[P, P]``), or ``None`` when
        ``A`` is not positive definite.
    eigenvectors, inverse_eigenvalues
        The fallback when ``factor`` is ``None``: ``[P, P]`` and ``[P]``,
        with ``A^+ = V diag(inverse_eigenvalues) V^T`` the pseudo-inverse.
    min_eigenvalue
        Smallest eigenvalue when the fallback ran, else ``None``.
    """

    matrix: Any
    factor: Any
    eigenvectors: Any
    inverse_eigenvalues: Any
    min_eigenvalue: float | None
    operator: LinearOperator

    @property
    def positive_definite(self) -> bool:
        """Whether the Cholesky factorisation succeeded."""
        return self.factor is not None


class DirectSolver(Solver):
    """Materialise ``A`` (``[P, P]``) and factor it once.

    ``init`` symmetrises the matrix and factors it by Cholesky; when that fails
    (``A`` not positive definite) it warns and falls back to an
    eigendecomposition, inverting the eigenvalues that are not numerically zero
    (a pseudo-inverse). ``solve`` is then two triangular solves per call
    (``O(K P^2)`` for ``K`` right-hand sides); the inverse is never formed.
    Memory is ``O(P^2)``: use it for models up to a few ten thousand
    parameters.
    """

    name = "direct"

    def __init__(self) -> None:
        pass

    def init(
        self,
        operator: LinearOperator,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> DirectState:
        xp = array_namespace(operator.like)
        itemsize = xp.finfo(working_dtype(operator.like)).bits // 8
        check_dense_fits(operator.size, itemsize, DENSE_MATRICES, "the direct solve")
        dense = dense_matrix(operator, progress)
        xp = array_namespace(dense)
        matrix = (dense + dense.T) / 2
        del dense
        try:
            factor = xp.linalg.cholesky(matrix)
            ok = bool(xp.all(xp.isfinite(factor)))  # JAX returns NaN, torch raises
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            factor, ok = None, False
        if ok and _pivots_nonsingular(factor, operator.size):
            return DirectState(matrix, factor, None, None, None, operator)

        eigenvalues, eigenvectors = xp.linalg.eigh(matrix)
        smallest = float(eigenvalues[0])
        largest = float(xp.max(xp.abs(eigenvalues)))
        cutoff = largest * operator.size * float(xp.finfo(matrix.dtype).eps)
        keep = xp.abs(eigenvalues) > cutoff
        safe = xp.where(keep, eigenvalues, xp.ones_like(eigenvalues))
        inverted = xp.where(keep, 1.0 / safe, xp.zeros_like(eigenvalues))
        floor = max(-smallest, 0.0) + largest * 1e-6
        top = float(eigenvalues[-1])
        warnings.warn(
            f"The regularised Hessian is not positive definite, or numerically "
            f"singular (eigenvalues from {smallest:.3e} to {top:.3e})"
            f"; the direct solve falls back to an eigendecomposition and inverts the "
            f"eigenvalues above {cutoff:.3e} in magnitude (a pseudo-inverse). Raise "
            f"hessian_regularization to {floor:.3e} or more for a positive-definite "
            "Hessian.",
            NotPositiveDefiniteWarning,
            stacklevel=3,
        )
        return DirectState(matrix, None, eigenvectors, inverted, smallest, operator)

    def solve(
        self, state: DirectState, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        """``A^{-1} b_k`` for every row; ``x0`` is ignored (the solve is exact)."""
        xp = array_namespace(rhs)
        b = xp.astype(rhs, state.matrix.dtype)
        if state.factor is not None:
            x = cholesky_solve_rows(state.factor, b, state.operator.backend)
        else:
            vectors = state.eigenvectors
            x = ((b @ vectors) * state.inverse_eigenvalues) @ vectors.T
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


def _pivots_nonsingular(factor: Any, size: int) -> bool:
    """Whether a Cholesky factor's pivots show a numerically nonsingular matrix.

    Rounding can let the factorisation of a singular positive semi-definite
    matrix succeed with a tiny positive pivot; the solve through it is then
    garbage. ``min(diag(L))^2 <= P * eps * max(diag(L))^2`` is taken as
    singular: the pivots squared bracket the eigenvalues, so this is the
    eigenvalue cutoff of the pseudo-inverse fallback.
    """
    xp = array_namespace(factor)
    pivots = xp.abs(xp.linalg.diagonal(factor))
    smallest, largest = float(xp.min(pivots)), float(xp.max(pivots))
    eps = float(xp.finfo(factor.dtype).eps)
    return smallest * smallest > size * eps * largest * largest


# -- fitted state, for influx.Influence (quadratic forms, save and load) -------


def quadratic_form(state: DirectState, rhs: Any) -> Any:
    """``<A^{-1} b_k, b_k>`` for every row of ``rhs`` (``[K, P] -> [K]``).

    One triangular solve, ``||L^{-1} b_k||^2``, when the Cholesky factor
    exists; else ``sum_j (v_j . b_k)^2 / lambda_j`` over the eigenpairs the
    fallback inverts. ``O(K P^2)``; no ``[K, K]`` matrix.
    """
    xp = array_namespace(rhs)
    b = xp.astype(rhs, state.matrix.dtype)
    if state.factor is not None:
        half = solve_lower_rows(state.factor, b, state.operator.backend)
        values = xp.sum(half * half, axis=1)
    else:
        coefficients = b @ state.eigenvectors
        values = xp.sum(coefficients * coefficients * state.inverse_eigenvalues, axis=1)
    return xp.astype(values, rhs.dtype)


def export_state(state: DirectState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host arrays and JSON metadata that :func:`import_state` restores."""
    op = state.operator
    arrays = {"matrix": op.to_numpy(state.matrix)}
    if state.factor is not None:
        arrays["factor"] = op.to_numpy(state.factor)
    else:
        arrays["eigenvectors"] = op.to_numpy(state.eigenvectors)
        arrays["inverse_eigenvalues"] = op.to_numpy(state.inverse_eigenvalues)
    return arrays, {"min_eigenvalue": state.min_eigenvalue}


def import_state(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], operator: LinearOperator
) -> DirectState:
    """The state :func:`export_state` wrote, on ``operator``'s device."""
    xp = array_namespace(operator.like)
    like = xp.astype(operator.like, working_dtype(operator.like))

    def native(key: str) -> Any:
        return from_host(arrays[key], like, operator) if key in arrays else None

    return DirectState(
        native("matrix"),
        native("factor"),
        native("eigenvectors"),
        native("inverse_eigenvalues"),
        meta.get("min_eigenvalue"),
        operator,
    )
