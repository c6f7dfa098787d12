"""Low-rank inverse from the dominant eigenpairs (implicitly restarted Lanczos)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._progress import progress_bar
from influx.errors import InputError, NotConvergedWarning, NotPositiveDefiniteWarning
from influx.operators import LinearOperator
from influx.solvers._base import SolveInfo, Solver, row_norms, to_host

__all__ = ["ArnoldiSolver"]


@dataclass(frozen=True)
class ArnoldiState:
    """The eigenpairs kept: ``A ~ V diag(eigenvalues) V^T``.

    Attributes
    ----------
    eigenvalues
        ``[r]`` native, in the operator's dtype.
    eigenvectors
        ``[P, r]`` native, orthonormal columns.
    converged
        Whether the eigensolver met its tolerance.
    matvecs
        Products with the operator the eigensolver used.
    """

    operator: LinearOperator
    eigenvalues: Any
    eigenvectors: Any
    converged: bool
    matvecs: int


class ArnoldiSolver(Solver):
    """Invert the operator on its ``rank_estimate`` dominant eigenpairs.

    ``init`` runs the implicitly restarted Lanczos method (scipy's ARPACK
    ``eigsh``) on the operator, one product per step, and keeps the
    ``rank_estimate`` eigenpairs of largest magnitude. Because the operator is
    the regularised Hessian ``H + lambda I``, the kept eigenvalues already
    include ``lambda``. ``solve`` applies ``V diag(1 / eigenvalues) V^T``; the
    directions outside the kept subspace are dropped. With ``rank_estimate``
    equal to the number of parameters, the decomposition is done densely and
    the result equals the direct solve.

    Parameters
    ----------
    rank_estimate
        Number of eigenpairs to keep.
    krylov_dimension
        Size of the Krylov subspace; ``None`` means
        ``min(P, max(2 * rank_estimate + 1, 20))``.
    tol
        Relative accuracy of the eigenpairs (ARPACK's ``tol``).
    max_iter
        Restarts of the Lanczos process at most; ``None`` means ``10 * P``.
    """

    name = "arnoldi"

    def __init__(
        self,
        *,
        rank_estimate: int = 10,
        krylov_dimension: int | None = None,
        tol: float = 1e-6,
        max_iter: int | None = None,
    ) -> None:
        if not isinstance(rank_estimate, int) or rank_estimate < 1:
            raise InputError(
                f"rank_estimate must be a positive int, got {rank_estimate!r}."
            )
        if krylov_dimension is not None and (
            not isinstance(krylov_dimension, int) or krylov_dimension <= rank_estimate
        ):
            raise InputError(
                f"krylov_dimension must be an int larger than rank_estimate="
                f"{rank_estimate}, got {krylov_dimension!r}."
            )
        if not tol >= 0:
            raise InputError(f"tol must be >= 0, got {tol!r}.")
        if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
            raise InputError(
                f"max_iter must be a positive int or None, got {max_iter!r}."
            )
        self.rank_estimate, self.krylov_dimension = rank_estimate, krylov_dimension
        self.tol, self.max_iter = float(tol), max_iter

    def init(self, operator: LinearOperator, *, progress: bool = False) -> ArnoldiState:
        size = operator.size
        if self.rank_estimate >= size - 1:
            dense = operator.to_dense(progress)
            xp = array_namespace(dense)
            eigenvalues, eigenvectors = xp.linalg.eigh((dense + dense.T) / 2)
            keep = min(self.rank_estimate, size)
            state = ArnoldiState(
                operator,
                eigenvalues[size - keep :],
                eigenvectors[:, size - keep :],
                True,
                size,
            )
        else:
            state = self._lanczos(operator, progress)
        smallest = float(to_host(state.eigenvalues, operator).min())
        if smallest <= 0:
            warnings.warn(
                f"A kept eigenvalue of the regularised Hessian is {smallest:.3e} <= 0; "
                "its direction is inverted with the wrong sign or blows up. Raise "
                f"hessian_regularization above {-smallest:.3e}.",
                NotPositiveDefiniteWarning,
                stacklevel=3,
            )
        return state

    def _lanczos(self, operator: LinearOperator, progress: bool) -> ArnoldiState:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        size = operator.size
        ncv = self.krylov_dimension or min(size, max(2 * self.rank_estimate + 1, 20))
        counter = [0]

        with progress_bar(progress, "Arnoldi products") as bar:

            def matmat(block: np.ndarray) -> np.ndarray:
                columns = np.asarray(block, dtype=np.float64).reshape(size, -1)
                image = operator.mv(
                    operator.from_numpy(np.ascontiguousarray(columns.T))
                )
                counter[0] += columns.shape[1]
                bar.update(columns.shape[1])
                return to_host(image, operator).T

            scipy_op = ScipyOperator(
                (size, size),
                matvec=lambda v: matmat(v)[:, 0],
                matmat=matmat,
                dtype=np.float64,
            )
            start = np.random.default_rng(0).standard_normal(size)
            converged = True
            try:
                eigenvalues, eigenvectors = eigsh(
                    scipy_op,
                    k=self.rank_estimate,
                    which="LM",
                    ncv=ncv,
                    tol=self.tol,
                    maxiter=self.max_iter or 10 * size,
                    v0=start,
                )
            except ArpackNoConvergence as error:
                converged = False
                eigenvalues, eigenvectors = error.eigenvalues, error.eigenvectors
                warnings.warn(
                    f"Arnoldi found {len(eigenvalues)} of {self.rank_estimate} "
                    f"eigenpairs to tol={self.tol:g}: raise max_iter or "
                    "krylov_dimension, or lower rank_estimate.",
                    NotConvergedWarning,
                    stacklevel=4,
                )
                if len(eigenvalues) == 0:
                    raise InputError(
                        "Arnoldi found no eigenpair: raise max_iter or "
                        "krylov_dimension."
                    ) from error
        order = np.argsort(eigenvalues)
        return ArnoldiState(
            operator,
            operator.from_numpy(eigenvalues[order]),
            operator.from_numpy(eigenvectors[:, order]),
            converged,
            counter[0],
        )

    def solve(
        self, state: ArnoldiState, rhs: Any, *, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        op = state.operator
        xp = array_namespace(rhs)
        vectors = xp.astype(state.eigenvectors, rhs.dtype)
        eigenvalues = xp.astype(state.eigenvalues, rhs.dtype)
        x = ((rhs @ vectors) / eigenvalues) @ vectors.T
        residual = op.mv(x) - rhs
        k = int(rhs.shape[0])
        info = SolveInfo(
            method=self.name,
            iterations=np.full(k, state.matvecs, dtype=np.int64),
            residual_norms=to_host(row_norms(residual), op),
            rhs_norms=to_host(row_norms(rhs), op),
            converged=np.full(k, state.converged),
            message="" if state.converged else "the eigenpairs did not converge.",
            extra={
                "eigenvalues": to_host(state.eigenvalues, op),
                "rank": int(state.eigenvalues.shape[0]),
                "residual": "of the low-rank solve against the full operator",
            },
        )
        return x, info
