"""LiSSA: the stochastic Neumann-series recursion of Agarwal et al. (2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._progress import progress_bar
from influx.errors import InputError
from influx.operators import LinearOperator
from influx.solvers._base import (
    SolveInfo,
    Solver,
    accumulation_dtype,
    initial_guess,
    row_norms,
    to_host,
    warn_if_not_converged,
)
from influx.solvers.spectrum import largest_eigenvalue

__all__ = ["LissaSolver"]

#: ``scale`` chosen when not given, as a multiple of the largest eigenvalue.
AUTO_SCALE_FACTOR = 1.5
#: ``||h_k|| > DIVERGENCE_FACTOR * scale * ||b_k||`` is taken as divergence.
DIVERGENCE_FACTOR = 1e8


@dataclass(frozen=True)
class LissaState:
    """The operator and the scale the recursion divides by."""

    operator: LinearOperator
    scale: float
    largest_eigenvalue: float | None


class LissaSolver(Solver):
    """Linear-time stochastic second-order approximation (LiSSA).

    Iterates ``h <- b + (1 - dampen) h - (A_t h) / scale`` where ``A_t`` is the
    operator on one training batch, drawn at random each step, and returns
    ``x = h / scale``. The fixed point solves ``(A + dampen * scale * I) x = b``.
    The recursion converges when ``scale`` exceeds half the largest eigenvalue
    of every batch operator; with ``scale=None`` it is set to
    ``1.5 * lambda_max`` of the full operator, estimated by power iteration in
    :meth:`init`.

    A stochastic recursion fluctuates around its fixed point instead of
    settling on it. When ``rtol`` is not met, the iterates of the second half
    of the run are averaged (Polyak-Ruppert averaging), which removes most of
    that sampling noise; when it is met (as with a single batch), the last
    iterate is returned.

    Parameters
    ----------
    maxiter
        Number of recursion steps at most.
    dampen
        Damping ``d`` in ``[0, 1)``; shifts the solved system by
        ``d * scale``.
    scale
        Divisor of the batch operator; ``None`` chooses one that converges.
    h0
        Initial ``h``, ``[P]`` or ``[K, P]``; ``None`` means ``b``.
    rtol
        Stop when every column's relative change ``||h_new - h|| / ||h_new||``
        falls below it.
    seed
        Seed of the batch order, for reproducible results.
    """

    name = "lissa"

    def __init__(
        self,
        *,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: float | None = None,
        h0: Any = None,
        rtol: float = 1e-4,
        seed: int | None = None,
    ) -> None:
        if not isinstance(maxiter, int) or maxiter < 1:
            raise InputError(f"maxiter must be a positive int, got {maxiter!r}.")
        if not 0.0 <= dampen < 1.0:
            raise InputError(f"dampen must be in [0, 1), got {dampen!r}.")
        if scale is not None and not scale > 0:
            raise InputError(f"scale must be positive or None, got {scale!r}.")
        if not rtol >= 0:
            raise InputError(f"rtol must be >= 0, got {rtol!r}.")
        self.maxiter, self.dampen, self.scale = maxiter, float(dampen), scale
        self.h0, self.rtol, self.seed = h0, float(rtol), seed

    def init(self, operator: LinearOperator, *, progress: bool = False) -> LissaState:
        if self.scale is not None:
            return LissaState(operator, float(self.scale), None)
        lam = largest_eigenvalue(operator, seed=self.seed, progress=progress)
        if not lam > 0:
            raise InputError(
                f"LiSSA needs a positive definite Hessian, but its largest eigenvalue "
                f"is {lam:.3e}: raise hessian_regularization."
            )
        return LissaState(operator, AUTO_SCALE_FACTOR * lam, lam)

    def solve(
        self, state: LissaState, rhs: Any, *, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        op, scale = state.operator, state.scale
        xp = array_namespace(rhs)
        b = xp.astype(rhs, accumulation_dtype(rhs))
        k = int(b.shape[0])
        h = b if self.h0 is None else initial_guess(self.h0, b, op, "h0")
        rng = np.random.default_rng(self.seed)
        keep = 1.0 - self.dampen
        b_norms = to_host(row_norms(b), op)
        limit = DIVERGENCE_FACTOR * scale * np.where(b_norms > 0, b_norms, 1.0)
        average_from = self.maxiter // 2 + 1
        total, averaged = None, 0
        change = np.full(k, np.inf)
        steps = 0
        with progress_bar(progress, "LiSSA", total=self.maxiter) as bar:
            for steps, sample in enumerate(op.sample_matvecs(rng), start=1):
                h_new = b + keep * h - sample(h) / scale
                diff = to_host(row_norms(h_new - h), op)
                size = to_host(row_norms(h_new), op)
                if not np.all(size < limit):
                    raise InputError(
                        f"LiSSA diverged at step {steps} (scale={scale:.3e}, "
                        f"dampen={self.dampen:g}): the Hessian may not be positive "
                        "definite. Raise hessian_regularization, raise scale or "
                        "dampen, or leave scale=None to choose one."
                    )
                change = np.where(size > 0, diff / np.where(size > 0, size, 1.0), 0.0)
                h = h_new
                bar.update(1)
                if float(change.max()) < self.rtol:
                    break
                if steps >= average_from:
                    total = h if total is None else total + h
                    averaged += 1
                if steps >= self.maxiter:
                    break
        if averaged and float(change.max()) >= self.rtol:
            h = total / averaged
        x = h / scale
        residual = op.mv(x) - b
        converged = change < self.rtol
        info = SolveInfo(
            method=self.name,
            iterations=np.full(k, steps, dtype=np.int64),
            residual_norms=to_host(row_norms(residual), op),
            rhs_norms=to_host(row_norms(b), op),
            converged=converged,
            message=""
            if converged.all()
            else (
                f"the relative change of {int((~converged).sum())} of {k} columns "
                f"stayed above rtol={self.rtol:g} after maxiter={self.maxiter} steps "
                f"(max {float(change.max()):.2e}): raise maxiter, or raise rtol; a "
                "smaller scale converges faster but may diverge."
            ),
            extra={
                "scale": scale,
                "largest_eigenvalue": state.largest_eigenvalue,
                "relative_change": change,
            },
        )
        warn_if_not_converged(info)
        return xp.astype(x, rhs.dtype), info
