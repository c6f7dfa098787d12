"""Dense triangular and Cholesky solves, which the array API standard lacks.

The core imports no framework: a backend that offers the optional
:class:`~influx.protocols.DenseLinearAlgebra` methods does the work on its own
arrays; numpy arrays without such a backend (host mode, where the operator has
no backend) go to scipy; any other namespace falls back to the standard's general
``linalg.solve``, which is correct but does not use the triangular structure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace

__all__ = ["cholesky_solve_rows", "solve_lower_rows"]


def cholesky_solve_rows(factor: Any, rhs: Any, backend: Any = None) -> Any:
    """Solve ``A x_k = b_k`` for every row of ``rhs``, given ``A = L L^T``.

    Two triangular solves, ``O(K P^2)``; the inverse is never formed.

    Parameters
    ----------
    factor
        Lower-triangular Cholesky factor ``L``, ``[P, P]``.
    rhs
        Right-hand sides ``[K, P]`` (one per row), of ``factor``'s dtype.
    backend
        The backend of the arrays (``operator.backend``), or ``None`` (numpy
        arrays in host mode).

    Returns
    -------
    Any
        Solutions ``[K, P]``.
    """
    method = getattr(backend, "cholesky_solve", None)
    if method is not None:
        return method(factor, rhs.T).T
    if isinstance(factor, np.ndarray):
        from scipy.linalg import cho_solve

        return cho_solve((factor, True), rhs.T, check_finite=False).T
    xp = array_namespace(factor)
    return xp.linalg.solve(factor @ factor.T, rhs.T).T


def solve_lower_rows(factor: Any, rhs: Any, backend: Any = None) -> Any:
    """``L^{-1} b_k`` for every row of ``rhs``: one triangular solve, ``O(K P^2)``.

    Parameters
    ----------
    factor
        Lower-triangular ``L``, ``[P, P]``.
    rhs
        ``[K, P]``, of ``factor``'s dtype.
    backend
        As for :func:`cholesky_solve_rows`.

    Returns
    -------
    Any
        ``[K, P]``, row ``k`` is ``L^{-1} b_k``.
    """
    method = getattr(backend, "solve_triangular", None)
    if method is not None:
        return method(factor, rhs.T, lower=True).T
    if isinstance(factor, np.ndarray):
        from scipy.linalg import solve_triangular

        return solve_triangular(factor, rhs.T, lower=True, check_finite=False).T
    xp = array_namespace(factor)
    return xp.linalg.solve(factor, rhs.T).T
