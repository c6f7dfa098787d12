"""Dense linear algebra the array API standard lacks, per framework.

Dispatches on the array's type with ``array_api_compat``'s ``is_*_array``,
which never imports a framework; each branch imports only the framework (or
scipy, for numpy) that produced the array.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, is_jax_array, is_torch_array

__all__ = ["cholesky_solve_rows"]


def cholesky_solve_rows(factor: Any, rhs: Any) -> Any:
    """Solve ``A x_k = b_k`` for every row of ``rhs``, given ``A = L L^T``.

    Two triangular solves, ``O(K P^2)``; the inverse is never formed.

    Parameters
    ----------
    factor
        Lower-triangular Cholesky factor ``L``, ``[P, P]``.
    rhs
        Right-hand sides ``[K, P]`` (one per row), of ``factor``'s dtype.

    Returns
    -------
    Any
        Solutions ``[K, P]``.
    """
    if is_torch_array(factor):
        import torch

        return torch.cholesky_solve(rhs.T, factor, upper=False).T
    if is_jax_array(factor):
        from jax.scipy.linalg import cho_solve

        return cho_solve((factor, True), rhs.T).T
    xp = array_namespace(factor)
    if xp.__name__.startswith(("numpy", "array_api_compat.numpy")):
        from scipy.linalg import cho_solve as scipy_cho_solve

        return scipy_cho_solve((factor, True), rhs.T, check_finite=False).T
    # Any other namespace: the general solver of the standard.
    return xp.linalg.solve(factor @ factor.T, rhs.T).T


def solve_lower_rows(factor: Any, rhs: Any) -> Any:
    """``L^{-1} b_k`` for every row of ``rhs``: one triangular solve, ``O(K P^2)``.

    Parameters
    ----------
    factor
        Lower-triangular ``L``, ``[P, P]``.
    rhs
        ``[K, P]``, of ``factor``'s dtype.

    Returns
    -------
    Any
        ``[K, P]``, row ``k`` is ``L^{-1} b_k``.
    """
    if is_torch_array(factor):
        import torch

        return torch.linalg.solve_triangular(factor, rhs.T, upper=False).T
    if is_jax_array(factor):
        from jax.scipy.linalg import solve_triangular

        return solve_triangular(factor, rhs.T, lower=True).T
    xp = array_namespace(factor)
    if xp.__name__.startswith(("numpy", "array_api_compat.numpy")):
        from scipy.linalg import solve_triangular as scipy_solve_triangular

        return scipy_solve_triangular(factor, rhs.T, lower=True, check_finite=False).T
    return xp.linalg.solve(factor, rhs.T).T
