"""LiSSA: the stochastic Neumann-series recursion of Agarwal et al. (2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._progress import progress_bar
from influx.errors import InputError
from influx.operators import LinearOperator, SampleMatvec
from influx.solvers._base import (
    SolveInfo,
    Solver,
    accumulation_dtype,
    initial_guess,
    row_norms,
    to_host,
    warn_if_not_converged,
)
from influx.solvers.preconditioners import (
    FittedPreconditioner,
    Preconditioner,
    make_preconditioner,
)
from influx.solvers.spectrum import largest_eigenvalue

__all__ = ["LissaSolver"]

#: ``scale`` chosen when not given, as a multiple of the largest eigenvalue.
AUTO_SCALE_FACTOR = 1.5
#: ``||h_k|| > DIVERGENCE_FACTOR * scale * ||b_k||`` is taken as divergence.
DIVERGENCE_FACTOR = 1e8


@dataclass(frozen=True)
class LissaState:
    """The operator, the preconditioner and the scale the recursion divides by."""

    operator: LinearOperator
    scale: float
    largest_eigenvalue: float | None
    preconditioner: FittedPreconditioner | None = field(default=None)


class LissaSolver(Solver):
    """Linear-time stochastic second-order approximation (LiSSA).

    Iterates ``h <- h + M (b - dampen * h - A_t h / scale)`` where ``A_t`` is
    the operator on one training batch, drawn at random each step, and
    returns ``x = h / scale``. With ``M = I`` this is the recursion of the
    paper, ``h <- b + (1 - dampen) h - A_t h / scale``. The fixed point
    solves ``(A + dampen * scale * I) x = b``.

    Two additions, both on by default, make it converge where the plain
    recursion stalls at its sampling noise:

    - **Variance reduction** (as in SVRG): at the start of every pass over the
      batches the iterate is kept as a snapshot ``s`` and ``A s`` is computed
      exactly; each step then uses ``A_t h - A_t s + A s``, whose noise
      shrinks to zero as ``h`` settles. The recursion converges to the exact
      fixed point, and ``rtol`` is checked between snapshots.
    - **Preconditioning**: ``M`` is a Nyström approximation of ``A^{-1}`` (as
      for CG), which takes the large eigenvalues out of the recursion's
      contraction rate.

    ``scale=None`` sets ``scale = 1.5 * lambda_max``, with ``lambda_max`` the
    largest of the eigenvalues of ``M A`` and of ``M A_t`` for up to
    ``BATCH_DRAWS`` sampled batches, each estimated by power iteration in
    :meth:`init`. A single batch's Hessian can have eigenvalues many times
    those of the average (by up to the number of batches, along directions
    that few points carry), and a step with such a batch amplifies instead
    of contracting: the full operator's ``lambda_max`` alone is not enough.

    ``variance_reduction=False`` and ``preconditioner=None`` give the plain
    recursion; since a noisy recursion fluctuates around its fixed point, it
    then averages the iterates of the second half of the run
    (Polyak-Ruppert) when ``rtol`` is not met.

    Parameters
    ----------
    maxiter
        Number of recursion steps at most (each applies one batch).
    dampen
        Damping ``d`` in ``[0, 1)``; shifts the solved system by
        ``d * scale``.
    scale
        Divisor of the batch operator; ``None`` chooses one that converges.
    h0
        Initial ``h``, ``[P]`` or ``[K, P]``; ``None`` means ``b``.
    rtol
        Stop when every column's relative change ``||h_new - h|| / ||h_new||``
        falls below it: between snapshots with variance reduction, between
        steps without.
    seed
        Seed of the batch order (and of the preconditioner's sketch), for
        reproducible results.
    variance_reduction
        Use snapshots and control variates (see above).
    preconditioner
        ``"nystrom"`` (default), ``None``, or a
        :class:`~influx.solvers.preconditioners.Preconditioner`.
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
        variance_reduction: bool = True,
        preconditioner: Preconditioner | str | None = "nystrom",
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
        self.variance_reduction = bool(variance_reduction)
        self.preconditioner = make_preconditioner(preconditioner)

    def init(self, operator: LinearOperator, *, progress: bool = False) -> LissaState:
        fitted = None
        if self.preconditioner is not None:
            dtype = accumulation_dtype(operator.like)
            fitted = self.preconditioner.fit(operator, dtype, progress=progress)
        if self.scale is not None:
            return LissaState(operator, float(self.scale), None, fitted)
        lam = _largest_eigenvalue(operator, fitted, self.seed, progress)
        if operator.samples_per_pass > 1:
            lam = max(lam, _largest_batch_eigenvalue(operator, fitted, self.seed))
        if not lam > 0:
            raise InputError(
                f"LiSSA needs a positive definite Hessian, but its largest eigenvalue "
                f"is {lam:.3e}: raise hessian_regularization."
            )
        return LissaState(operator, AUTO_SCALE_FACTOR * lam, lam, fitted)

    def solve(
        self, state: LissaState, rhs: Any, *, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        op, scale = state.operator, state.scale
        xp = array_namespace(rhs)
        b = xp.astype(rhs, accumulation_dtype(rhs))
        k = int(b.shape[0])
        h = b if self.h0 is None else initial_guess(self.h0, b, op, "h0")
        rng = np.random.default_rng(self.seed)
        b_norms = to_host(row_norms(b), op)
        precondition = (
            state.preconditioner.apply if state.preconditioner is not None else None
        )
        recursion = _Recursion(op, b, scale, self.dampen, precondition, b_norms)
        samples = op.sample_matvecs(rng)
        reduce_variance = self.variance_reduction and op.samples_per_pass > 1
        with progress_bar(progress, "LiSSA", total=self.maxiter) as bar:
            if reduce_variance:
                h, change, steps = self._variance_reduced(recursion, h, samples, bar)
            else:
                h, change, steps = self._plain(recursion, h, samples, bar)
        x = h / scale
        residual = op.mv(x) - b
        converged = change < self.rtol
        info = SolveInfo(
            method=self.name,
            iterations=np.full(k, steps, dtype=np.int64),
            residual_norms=to_host(row_norms(residual), op),
            rhs_norms=b_norms,
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
                "variance_reduction": reduce_variance,
                "preconditioner": getattr(self.preconditioner, "name", None),
            },
        )
        warn_if_not_converged(info)
        return xp.astype(x, rhs.dtype), info

    def _plain(
        self, recursion: _Recursion, h: Any, samples: Iterator[SampleMatvec], bar: Any
    ) -> tuple[Any, np.ndarray, int]:
        """One sampled product per step; Polyak average when ``rtol`` is missed."""
        average_from = self.maxiter // 2 + 1
        total, averaged = None, 0
        change = np.full(int(h.shape[0]), np.inf)
        steps = 0
        for steps, sample in enumerate(samples, start=1):
            h_new = recursion.step(h, sample(h), steps)
            change = recursion.relative_change(h_new, h)
            h = h_new
            bar.update(1)
            if float(change.max()) < self.rtol:
                return h, change, steps
            if steps >= average_from:
                total = h if total is None else total + h
                averaged += 1
            if steps >= self.maxiter:
                break
        if averaged:
            h = total / averaged
        return h, change, steps

    def _variance_reduced(
        self, recursion: _Recursion, h: Any, samples: Iterator[SampleMatvec], bar: Any
    ) -> tuple[Any, np.ndarray, int]:
        """Epochs of ``samples_per_pass`` steps around an exact snapshot product."""
        xp = array_namespace(h)
        k = int(h.shape[0])
        epoch = recursion.operator.samples_per_pass
        change = np.full(k, np.inf)
        steps = 0
        snapshot = None
        while steps < self.maxiter:
            if snapshot is not None:
                change = recursion.relative_change(h, snapshot)
                if float(change.max()) < self.rtol:
                    break
            snapshot = h
            exact = recursion.operator.mv(snapshot)
            for _ in range(min(epoch, self.maxiter - steps)):
                sample = next(samples)
                both = sample(xp.concat([h, snapshot], axis=0))
                estimate = both[:k] - both[k:] + exact
                steps += 1
                h = recursion.step(h, estimate, steps)
                bar.update(1)
        else:
            if snapshot is not None:
                change = recursion.relative_change(h, snapshot)
        return h, change, steps


@dataclass
class _Recursion:
    """``h <- h + M (b - d h - product / scale)`` with a divergence guard."""

    operator: LinearOperator
    b: Any
    scale: float
    dampen: float
    precondition: Callable[[Any], Any] | None
    b_norms: np.ndarray

    def step(self, h: Any, product: Any, steps: int) -> Any:
        update = self.b - self.dampen * h - product / self.scale
        if self.precondition is not None:
            update = self.precondition(update)
        h_new = h + update
        sizes = to_host(row_norms(h_new), self.operator)
        limit = (
            DIVERGENCE_FACTOR
            * self.scale
            * np.where(self.b_norms > 0, self.b_norms, 1.0)
        )
        if not np.all(sizes < limit):
            raise InputError(
                f"LiSSA diverged at step {steps} (scale={self.scale:.3e}, "
                f"dampen={self.dampen:g}): the Hessian may not be positive "
                "definite. Raise hessian_regularization, raise scale or "
                "dampen, or leave scale=None to choose one."
            )
        return h_new

    def relative_change(self, new: Any, old: Any) -> np.ndarray:
        diff = to_host(row_norms(new - old), self.operator)
        size = to_host(row_norms(new), self.operator)
        return np.where(size > 0, diff / np.where(size > 0, size, 1.0), 0.0)


def _largest_eigenvalue(
    operator: LinearOperator,
    preconditioner: FittedPreconditioner | None,
    seed: int | None,
    progress: bool,
) -> float:
    """``lambda_max(A)``, or ``lambda_max(M A)`` with a preconditioner."""
    target = _Preconditioned(operator, operator.mv, preconditioner)
    return largest_eigenvalue(target, seed=seed, progress=progress)


#: Batches whose largest eigenvalue :meth:`LissaSolver.init` estimates.
BATCH_DRAWS = 8


def _largest_batch_eigenvalue(
    operator: LinearOperator,
    preconditioner: FittedPreconditioner | None,
    seed: int | None,
) -> float:
    """Largest ``lambda_max(M A_t)`` over a few sampled batch operators."""
    rng = np.random.default_rng(None if seed is None else seed + 1)
    samples = operator.sample_matvecs(rng)
    draws = min(operator.samples_per_pass, BATCH_DRAWS)
    largest = 0.0
    for _ in range(draws):
        batch = _Preconditioned(operator, next(samples), preconditioner)
        estimate = largest_eigenvalue(batch, maxiter=30, rtol=1e-2, seed=seed)
        largest = max(largest, estimate)
    return largest


class _Preconditioned(LinearOperator):
    """``M A`` for a product ``A`` (the operator's, or one batch's).

    Not symmetric, but similar to ``M^(1/2) A M^(1/2)``: its eigenvalues are
    real and power iteration finds the largest.
    """

    def __init__(
        self,
        operator: LinearOperator,
        product: SampleMatvec,
        preconditioner: FittedPreconditioner | None,
    ) -> None:
        self._operator, self._product = operator, product
        self._preconditioner = preconditioner
        self.size = operator.size

    @property
    def like(self) -> Any:
        return self._operator.like

    @property
    def backend(self) -> Any:
        return self._operator.backend

    def mv(self, vectors: Any) -> Any:
        image = self._product(vectors)
        if self._preconditioner is None:
            return image
        return self._preconditioner.apply(image)


# -- fitted state, for influx.Influence's save and load -----------------------


def export_state(state: LissaState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host arrays (the preconditioner's factors) and JSON metadata (the scale)."""
    from influx.solvers.preconditioners import export_fitted

    arrays, meta = export_fitted(state.preconditioner, state.operator)
    meta = {
        **meta,
        "scale": float(state.scale),
        "largest_eigenvalue": None
        if state.largest_eigenvalue is None
        else float(state.largest_eigenvalue),
    }
    return arrays, meta


def import_state(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], operator: LinearOperator
) -> LissaState:
    """The state :func:`export_state` wrote, on ``operator`` (the shifted Hessian)."""
    from influx.solvers.preconditioners import import_fitted

    largest = meta.get("largest_eigenvalue")
    return LissaState(
        operator,
        float(meta["scale"]),
        None if largest is None else float(largest),
        import_fitted(arrays, meta, operator),
    )
