"""Spectral estimates of an operator, for choosing solver parameters."""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

from influx._progress import progress_bar
from influx.operators import LinearOperator
from influx.solvers._base import accumulation_dtype

__all__ = ["largest_eigenvalue"]


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
