"""Spectral estimates of an operator, for choosing solver parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from scipy.linalg import eigh_tridiagonal

from influx._progress import progress_bar
from influx.operators import LinearOperator
from influx.solvers._base import accumulation_dtype, from_host, to_host

__all__ = ["Extremes", "extreme_eigenvalues", "largest_eigenvalue"]


def largest_eigenvalue(
    operator: LinearOperator,
    *,
    maxiter: int = 50,
    rtol: float = 1e-3,
    seed: int | None = None,
    progress: bool = False,
) -> float:
    """Estimate the eigenvalue of largest magnitude by power iteration.

    Parameters
    ----------
    operator
        A symmetric operator.
    maxiter
        Products with the operator at most.
    rtol
        Stop when the Rayleigh quotient changes by less than this, relatively.
    seed
        Seed of the random start vector.
    progress
        Show a progress bar.

    Returns
    -------
    float
        The Rayleigh quotient at the last iterate (an underestimate of the
        magnitude, accurate to about ``rtol`` once converged).
    """
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((1, operator.size))
    vector = operator.from_numpy(start)
    xp = array_namespace(vector)
    vector = xp.astype(vector, accumulation_dtype(vector))
    vector = vector / xp.sqrt(xp.sum(vector * vector))
    estimate = 0.0
    with progress_bar(progress, "Largest eigenvalue", total=maxiter) as bar:
        for _ in range(maxiter):
            image = operator.mv(vector)
            new_estimate = float(xp.sum(vector * image))
            norm = float(xp.sqrt(xp.sum(image * image)))
            bar.update(1)
            if norm == 0.0:
                return 0.0
            vector = image / norm
            if abs(new_estimate - estimate) <= rtol * abs(new_estimate):
                return new_estimate
            estimate = new_estimate
    return estimate


@dataclass(frozen=True)
class Extremes:
    """Lanczos estimates of the extreme eigenvalues of ``S`` operators.

    Attributes
    ----------
    smallest, largest
        ``[S]`` the extreme Ritz values. They lie inside each spectrum:
        ``lambda_min <= smallest`` and ``largest <= lambda_max``, so a
        negative ``smallest`` proves a negative eigenvalue.
    smallest_error, largest_error
        ``[S]`` Ritz residual norms: an eigenvalue lies within this distance
        of the estimate.
    steps
        Products with each operator (Lanczos steps) taken.
    """

    smallest: np.ndarray
    largest: np.ndarray
    smallest_error: np.ndarray
    largest_error: np.ndarray
    steps: int


def extreme_eigenvalues(
    apply: Callable[[Any], Any],
    start: Any,
    host: LinearOperator,
    *,
    maxiter: int = 30,
    rtol: float = 1e-3,
    both: bool = True,
) -> Extremes:
    """Lanczos on ``S`` symmetric operators at once, one vector each.

    Each step applies ``apply`` once to a stack ``[S, P]`` whose row ``t``
    goes to operator ``t`` (for the row-wise Hessian of each batch, one read
    of the data per step), and the extreme eigenvalues come from the small
    tridiagonal matrices on the host. Without reorthogonalisation the extreme
    Ritz values stay valid (copies of converged ones may appear).

    Parameters
    ----------
    apply
        ``[S, P] -> [S, P]``: row ``t`` is ``A_t @ V[t]``, ``A_t`` symmetric.
    start
        ``[S, P]`` start vectors (nonzero rows), in the accumulation dtype.
    host
        The operator whose backend converts arrays to and from the host.
    maxiter
        Lanczos steps at most.
    rtol
        Stop when every Ritz residual that is tracked (the largest, and the
        smallest too with ``both``) is below ``rtol`` times the largest
        magnitude of that operator's Ritz values.
    both
        Also wait for the smallest eigenvalue to converge.

    Returns
    -------
    Extremes
        Estimates ``[S]`` for every operator.
    """
    xp = array_namespace(start)
    count = int(start.shape[0])
    q = start / xp.sqrt(xp.sum(start * start, axis=1, keepdims=True))
    q_prev, beta = None, None
    alphas: list[np.ndarray] = []  # per step, [S]
    betas: list[np.ndarray] = []  # per step, [S]; 0 after a breakdown
    active = np.ones(count, dtype=bool)  # no invariant subspace found yet
    size = np.zeros(count)  # running estimate of ||A_t||
    for _ in range(maxiter):
        w = apply(q)
        alpha = xp.sum(w * q, axis=1, keepdims=True)
        w = w - alpha * q
        if q_prev is not None:
            w = w - beta[:, None] * q_prev
        w = w - xp.sum(w * q, axis=1, keepdims=True) * q  # local reorthogonalisation
        beta = xp.sqrt(xp.sum(w * w, axis=1))
        alpha_host = to_host(alpha, host)[:, 0]
        beta_host = to_host(beta, host)
        size = np.maximum(size, np.hypot(alpha_host, beta_host))
        alphas.append(np.where(active, alpha_host, np.nan))
        active &= beta_host > BREAKDOWN * size
        betas.append(np.where(active, beta_host, 0.0))
        result = _ritz_extremes(np.array(alphas), np.array(betas), len(alphas))
        magnitude = np.maximum(np.abs(result.largest), np.abs(result.smallest))
        done = result.largest_error <= rtol * magnitude
        if both:
            done &= result.smallest_error <= rtol * magnitude
        if np.all(done | ~active):
            break
        inverse = np.where(active, 1.0 / np.where(active, beta_host, 1.0), 0.0)
        q_prev, q = q, w * from_host(inverse[:, None], w, host)
        beta = from_host(np.where(active, beta_host, 0.0), w, host)
    return result


#: A Lanczos step whose new direction is this small, relative to the
#: operator's norm, has found an invariant subspace: its Ritz values are exact.
BREAKDOWN = 1e-10


def _ritz_extremes(alphas: np.ndarray, betas: np.ndarray, steps: int) -> Extremes:
    """Extreme Ritz values and residuals from ``[steps, S]`` Lanczos coefficients.

    A NaN ``alpha`` marks a step after the operator's breakdown (not used).
    """
    count = alphas.shape[1]
    smallest, largest = np.zeros(count), np.zeros(count)
    small_err, large_err = np.zeros(count), np.zeros(count)
    for t in range(count):
        diagonal = alphas[:, t][~np.isnan(alphas[:, t])]
        n = len(diagonal)
        values, vectors = eigh_tridiagonal(diagonal, betas[: n - 1, t])
        last = abs(betas[n - 1, t]) * np.abs(vectors[-1])
        smallest[t], largest[t] = values[0], values[-1]
        small_err[t], large_err[t] = last[0], last[-1]
    return Extremes(smallest, largest, small_err, large_err, steps)
