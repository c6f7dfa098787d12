"""LiSSA: the stochastic Neumann-series recursion of Agarwal et al. (2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._progress import progress_bar
from influx.errors import InputError
from influx.operators import LinearOperator, SampleMatvec, split_shift
from influx.solvers._base import (
    SolveInfo,
    Solver,
    accumulation_dtype,
    from_host,
    initial_guess,
    integer_option,
    real_option,
    row_norms,
    to_host,
    warn_if_not_converged,
)
from influx.solvers.preconditioners import (
    FittedPreconditioner,
    Preconditioner,
    make_preconditioner,
)
from influx.solvers.spectrum import extreme_eigenvalues, largest_eigenvalue

__all__ = ["LissaSolver"]

#: ``scale`` chosen when not given, as a multiple of the largest eigenvalue.
AUTO_SCALE_FACTOR = 1.5
#: ``||h_k|| > DIVERGENCE_FACTOR * scale * ||b_k||`` is taken as divergence.
DIVERGENCE_FACTOR = 1e8
#: A result with ``||A x - b|| > DIVERGED_RESIDUAL * ||b||`` (worse than
#: ``x = 0``) is refused as diverged.
DIVERGED_RESIDUAL = 1.0


@dataclass(frozen=True)
class LissaState:
    """The operator, the preconditioner and the scale the recursion divides by."""

    operator: LinearOperator
    scale: float
    largest_eigenvalue: float | None
    preconditioner: FittedPreconditioner | None = field(default=None)
    spectrum: Spectrum | None = field(default=None)


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

    ``scale=None`` sets ``scale = 1.5 * lambda``, with ``lambda`` the largest
    over *every* batch operator ``A_t`` (as drawn, with its unbiasing weight
    ``num_batches * batch_size / N``) of an estimate of ``lambda_max(M A_t)``.
    A single batch's Hessian can have eigenvalues many times those of the
    average (one high-leverage point), and a step with such a batch amplifies
    instead of contracting, so :meth:`init` runs Lanczos on all batch
    operators at once, one vector each (each step one pass over the data, at
    most ``BATCH_STEPS``), and takes each Ritz value plus its residual. A step
    is stable while ``lambda_max(M A_t) < 2 * scale``: three times the
    estimate, the margin for its underestimation. Before that, a short
    Lanczos on ``A`` itself (at most ``HESSIAN_STEPS`` passes) estimates its
    smallest and largest eigenvalues, and an ``A`` shown to be indefinite is
    refused with the regularization that fixes it.

    Every run checks the result: ``||A x - b|| > ||b||`` (worse than
    ``x = 0``), or iterates that grow without bound, raise an
    :class:`~influx.InputError` stating the scale, the step, the measured
    eigenvalues and a fix that fits the settings; a run that only converges
    slowly warns (:class:`~influx.NotConvergedWarning`).

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
        Initial ``h``, ``[P]`` or ``[K, P]``; ``None`` means ``b``. Kept for
        the seed's functions: prefer a guess of the solution for each solve,
        ``solve(state, rhs, x0=...)`` (the recursion then starts at
        ``h = scale * x0``), which takes precedence.
    rtol
        Stop when every column's relative change ``||h_new - h|| / ||h_new||``
        falls below it: between snapshots with variance reduction, between
        steps without.
    seed
        Seed of the batch draws and of the scale's random start vectors: the
        default 0 makes every run give the same result; ``None`` draws fresh
        entropy each solve. (The preconditioner has its own seed, 0 by
        default: ``NystromPreconditioner(seed=...)``.)
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
        seed: int | None = 0,
        variance_reduction: bool = True,
        preconditioner: Preconditioner | str | None = "nystrom",
    ) -> None:
        self.maxiter = integer_option(maxiter, "maxiter", minimum=1)
        self.dampen = real_option(dampen, "dampen", minimum=0.0)
        if not self.dampen < 1.0:
            raise InputError(f"dampen must be in [0, 1), got {dampen!r}.")
        self.scale = real_option(scale, "scale", optional=True)
        if self.scale is not None and not self.scale > 0:
            raise InputError(f"scale must be positive or None, got {scale!r}.")
        self.rtol = real_option(rtol, "rtol", minimum=0.0)
        self.h0 = h0
        self.seed = integer_option(seed, "seed", optional=True)
        self.variance_reduction = bool(variance_reduction)
        self.preconditioner = make_preconditioner(preconditioner)

    def init(
        self,
        operator: LinearOperator,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> LissaState:
        fitted = None
        if self.preconditioner is not None:
            dtype = accumulation_dtype(operator.like)
            fitted = self.preconditioner.fit(operator, dtype, progress=progress)
        if self.scale is not None:
            return LissaState(operator, float(self.scale), None, fitted)
        spectrum = _measure_spectrum(operator, fitted, self.seed, progress)
        lam = spectrum.step_eigenvalue
        return LissaState(operator, AUTO_SCALE_FACTOR * lam, lam, fitted, spectrum)

    def solve(
        self, state: LissaState, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        """Run the recursion; ``x0`` is this solve's guess of the solution.

        The recursion starts at ``h = scale * x0``, else at the ``h0``
        option, else at ``b``.
        """
        op, scale = state.operator, state.scale
        xp = array_namespace(rhs)
        b = xp.astype(rhs, accumulation_dtype(rhs))
        k = int(b.shape[0])
        if x0 is not None:
            h = scale * initial_guess(x0, b, op, "x0")
        else:
            h = b if self.h0 is None else initial_guess(self.h0, b, op, "h0")
        rng = np.random.default_rng(self.seed)
        b_norms = to_host(row_norms(b), op)
        precondition = (
            state.preconditioner.apply if state.preconditioner is not None else None
        )
        recursion = _Recursion(
            op, b, scale, self.dampen, precondition, b_norms, self._diagnosis(state)
        )
        samples = op.sample_matvecs(rng)
        reduce_variance = self.variance_reduction and op.samples_per_pass > 1
        with progress_bar(progress, "LiSSA", total=self.maxiter) as bar:
            if reduce_variance:
                h, change, steps = self._variance_reduced(recursion, h, samples, bar)
            else:
                h, change, steps = self._plain(recursion, h, samples, bar)
        x = h / scale
        residual = op.mv(x) - b
        residual_norms = to_host(row_norms(residual), op)
        relative = residual_norms / np.where(b_norms > 0, b_norms, 1.0)
        if np.any(relative > DIVERGED_RESIDUAL):
            raise InputError(
                f"LiSSA diverged: after {steps} steps the relative residual "
                f"||A x - b|| / ||b|| is {float(relative.max()):.2e} for "
                f"{int((relative > DIVERGED_RESIDUAL).sum())} of {k} right-hand "
                "sides (above 1: worse than x = 0). " + recursion.diagnosis
            )
        converged = change < self.rtol
        info = SolveInfo(
            method=self.name,
            iterations=np.full(k, steps, dtype=np.int64),
            residual_norms=residual_norms,
            rhs_norms=b_norms,
            converged=converged,
            message=""
            if converged.all()
            else (
                f"the relative change of {int((~converged).sum())} of {k} columns "
                f"stayed above rtol={self.rtol:g} after maxiter={self.maxiter} steps "
                f"(max {float(change.max()):.2e}; relative residual up to "
                f"{float(relative.max()):.2e}): raise maxiter, or raise rtol. "
                + self._slow_hint(state)
            ),
            extra={
                "scale": scale,
                "largest_eigenvalue": state.largest_eigenvalue,
                "spectrum": state.spectrum,
                "relative_change": change,
                "variance_reduction": reduce_variance,
                "preconditioner": getattr(self.preconditioner, "name", None),
            },
        )
        warn_if_not_converged(info)
        return xp.astype(x, rhs.dtype), info

    def _diagnosis(self, state: LissaState) -> str:
        """What was measured and chosen, and the fix that fits these settings."""
        scale, spectrum = state.scale, state.spectrum
        chosen = (
            f"scale={scale:.3e} (given; step 1/scale={1 / scale:.3e})"
            if spectrum is None
            else f"scale={scale:.3e} (step 1/scale={1 / scale:.3e}), chosen as "
            f"{AUTO_SCALE_FACTOR:g} x {spectrum.describe()}"
        )
        text = (
            f"Measured: {chosen}; dampen={self.dampen:g}, variance_reduction="
            f"{self.variance_reduction}, preconditioner="
            f"{getattr(self.preconditioner, 'name', None)!r}. "
        )
        if spectrum is None:
            return text + (
                "The recursion contracts only when scale is above half the "
                "largest eigenvalue of every batch's Hessian (of M A_t with a "
                "preconditioner M): leave scale=None to estimate it for every "
                "batch, or raise scale; if the Hessian is not positive definite, "
                "raise hessian_regularization."
            )
        return text + (
            "The Hessian may not be positive definite (a negative eigenvalue the "
            "estimate missed, or batches with negative curvature): raise "
            "hessian_regularization; or pass a larger scale, e.g. "
            f"scale={10 * scale:.3g}."
        )

    def _slow_hint(self, state: LissaState) -> str:
        if state.spectrum is None:
            return (
                f"A smaller scale (now {state.scale:.3e}) converges faster, but "
                "diverges below half the largest eigenvalue of a batch's Hessian."
            )
        return (
            f"scale={state.scale:.3e} was chosen as {AUTO_SCALE_FACTOR:g} x "
            f"{state.spectrum.describe()}; below half that eigenvalue the "
            "recursion diverges."
        )

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
    diagnosis: str

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
            ratio = float(np.nanmax(sizes / limit)) * DIVERGENCE_FACTOR
            raise InputError(
                f"LiSSA diverged at step {steps}: ||h|| grew to {ratio:.2e} "
                f"times scale * ||b|| (the limit is {DIVERGENCE_FACTOR:.0e}). "
                + self.diagnosis
            )
        return h_new

    def relative_change(self, new: Any, old: Any) -> np.ndarray:
        diff = to_host(row_norms(new - old), self.operator)
        size = to_host(row_norms(new), self.operator)
        return np.where(size > 0, diff / np.where(size > 0, size, 1.0), 0.0)


#: Lanczos steps at most for the extreme eigenvalues of the whole Hessian.
HESSIAN_STEPS = 30
#: Lanczos steps at most for the largest eigenvalue of each batch operator.
BATCH_STEPS = 20
#: Numbers (rows times P) in one stack of batch vectors; more batches than
#: fit are estimated a group at a time.
GROUP_NUMBERS = 2**22
#: A smallest Ritz value below ``-NEGATIVE_TOL * largest`` proves the Hessian
#: is not positive definite.
NEGATIVE_TOL = 1e-8


@dataclass(frozen=True)
class Spectrum:
    """What :meth:`LissaSolver.init` measured to choose the scale.

    Attributes
    ----------
    smallest, largest
        Lanczos estimates of the extreme eigenvalues of ``A`` (Ritz values:
        ``lambda_min <= smallest`` and ``largest <= lambda_max``).
    step_eigenvalue
        The largest over the batch operators ``t`` of the estimate of
        ``lambda_max(M A_t)`` plus its Ritz residual (``M = I`` without a
        preconditioner); ``scale`` is ``AUTO_SCALE_FACTOR`` times this.
    batch
        The batch it came from (``None`` when the operator is not sampled).
    num_batches
        Batch operators estimated.
    preconditioned
        Whether ``M`` is a preconditioner.
    passes
        Products with the operator this cost, in passes over the data.
    """

    smallest: float
    largest: float
    step_eigenvalue: float
    batch: int | None
    num_batches: int
    preconditioned: bool
    passes: float

    def describe(self) -> str:
        """One phrase: the eigenvalue behind the scale, and the Hessian's."""
        target = "M A_t" if self.preconditioned else "A_t"
        where = (
            "the Hessian"
            if self.batch is None
            else f"{target} over the {self.num_batches} batch operators (batch "
            f"{self.batch})"
        )
        return (
            f"{self.step_eigenvalue:.3e}, the largest eigenvalue estimate of {where}; "
            f"the Hessian's eigenvalue estimates lie in [{self.smallest:.3e}, "
            f"{self.largest:.3e}]"
        )


def _measure_spectrum(
    operator: LinearOperator,
    preconditioner: FittedPreconditioner | None,
    seed: int | None,
    progress: bool,
) -> Spectrum:
    """Extremes of ``A`` (to refuse an indefinite one) and the step's bound.

    The step ``1 / scale`` must be safe for every batch the recursion can
    draw, so ``lambda_max(M A_t)`` is estimated for every batch operator
    ``A_t`` (with its unbiasing weight), by Lanczos on all of them at once,
    one vector each: every step costs one product per batch, one pass over
    the data. The largest of them bounds ``lambda_max(M A)`` too, since
    ``A`` is the mean of the ``A_t``.
    """
    rng = np.random.default_rng(seed)
    like = _accumulation_like(operator)
    with progress_bar(progress, "LiSSA scale", total=None) as bar:
        start = from_host(rng.standard_normal((1, operator.size)), like, operator)
        whole = extreme_eigenvalues(
            operator.mv, start, operator, maxiter=HESSIAN_STEPS, rtol=1e-3
        )
        bar.update(whole.steps)
        smallest, largest = float(whole.smallest[0]), float(whole.largest[0])
        _refuse_indefinite(operator, smallest, largest)
        products = operator.batch_matvecs()
        if products is None:  # a custom operator: a pass of sampled draws
            draws = operator.sample_matvecs(np.random.default_rng(rng.integers(2**32)))
            products = [next(draws) for _ in range(operator.samples_per_pass)]
        passes = float(whole.steps)
        if len(products) == 1 and preconditioner is None:
            estimates = whole.largest + whole.largest_error
        else:
            estimates, batch_passes = _batch_largest(
                operator, products, preconditioner, rng, like
            )
            passes += batch_passes
    batch = int(np.argmax(estimates))
    return Spectrum(
        smallest=smallest,
        largest=largest,
        step_eigenvalue=float(estimates[batch]),
        batch=None if operator.samples_per_pass == 1 else batch,
        num_batches=len(products),
        preconditioned=preconditioner is not None,
        passes=passes,
    )


def _accumulation_like(operator: LinearOperator) -> Any:
    xp = array_namespace(operator.like)
    return xp.astype(operator.like, accumulation_dtype(operator.like))


def _refuse_indefinite(
    operator: LinearOperator, smallest: float, largest: float
) -> None:
    """Raise when the Ritz values prove ``A`` is not positive definite."""
    if largest > 0 and smallest >= -NEGATIVE_TOL * largest:
        return
    _, shift = split_shift(operator)
    raise InputError(
        "LiSSA needs a positive definite Hessian, but Lanczos estimates its "
        f"smallest eigenvalue at {smallest:.3e} and its largest at {largest:.3e} "
        "(the true extremes lie at least this far out). Raise "
        f"hessian_regularization by more than {max(-smallest, 0.0):.3g} (from "
        f"{shift:.3g} to above {shift + max(-smallest, 0.0):.3g})."
    )


def _batch_largest(
    operator: LinearOperator,
    products: list[SampleMatvec],
    preconditioner: FittedPreconditioner | None,
    rng: np.random.Generator,
    like: Any,
) -> tuple[np.ndarray, float]:
    """``[S]`` upper estimates of ``lambda_max(M A_t)``, and the passes spent."""
    sqrt = _sqrt_of(preconditioner)
    if preconditioner is not None and sqrt is None:
        # No M^(1/2): power iteration on the non-symmetric M A_t, batch by batch.
        estimates = [
            largest_eigenvalue(
                _Preconditioned(operator, product, preconditioner),
                maxiter=30,
                rtol=1e-2,
                seed=int(rng.integers(2**32)),
            )
            for product in products
        ]
        return np.asarray(estimates), 30.0
    xp = array_namespace(like)
    group = max(1, min(len(products), GROUP_NUMBERS // max(operator.size, 1)))
    estimates, passes = [], 0.0
    for first in range(0, len(products), group):
        chunk = products[first : first + group]

        def apply(vectors: Any, chunk: list[SampleMatvec] = chunk) -> Any:
            if sqrt is not None:
                vectors = sqrt(vectors)
            rows = [p(vectors[i : i + 1]) for i, p in enumerate(chunk)]
            image = xp.concat(rows, axis=0)
            return image if sqrt is None else sqrt(image)

        start = rng.standard_normal((len(chunk), operator.size))
        found = extreme_eigenvalues(
            apply,
            from_host(start, like, operator),
            operator,
            maxiter=BATCH_STEPS,
            rtol=1e-2,
            both=False,
        )
        estimates.append(found.largest + found.largest_error)
        passes += found.steps * len(chunk) / len(products)
    return np.concatenate(estimates), passes


def _sqrt_of(
    preconditioner: FittedPreconditioner | None,
) -> Callable[[Any], Any] | None:
    """``M^(1/2)`` if the preconditioner offers it."""
    if preconditioner is None:
        return None
    if type(preconditioner).apply_sqrt is FittedPreconditioner.apply_sqrt:
        return None
    return preconditioner.apply_sqrt


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
