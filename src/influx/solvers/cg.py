"""Conjugate gradients on all right-hand sides at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from influx._progress import progress_bar
from influx.operators import LinearOperator
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

__all__ = ["CgSolver"]


@dataclass(frozen=True)
class CgState:
    """The operator and the fitted preconditioner (``None`` for plain CG)."""

    operator: LinearOperator
    preconditioner: FittedPreconditioner | None


class CgSolver(Solver):
    """Preconditioned conjugate gradients, batched over right-hand sides.

    By default (``block=True``) all right-hand sides share one Krylov space
    (block conjugate gradients, O'Leary 1980): each iteration applies the
    operator once to a block of at most ``K`` search directions built from
    all the residuals still running, so every right-hand side gains from the
    directions the others found, and fewer passes over the training data are
    needed than with one Krylov space each. The small ``K x K`` systems are
    solved by symmetric eigendecompositions that drop directions which became
    linearly dependent (duplicated right-hand sides, residuals that converge
    together) instead of dividing by zero.

    With ``block=False`` each right-hand side runs its own CG; every
    iteration applies the operator once to the stack of their search
    directions, so a pass over the training data still serves all of them.

    Either way, each right-hand side stops on its own when ``||r_k|| <=
    max(rtol * ||b_k||, atol)``; the finished ones leave the stack. The
    recursion runs in float64 when the model is float32 (where the framework
    and device support float64), which keeps the residuals honest at tight
    tolerances.

    By default ``init`` builds a randomised Nyström preconditioner of rank 100
    (:class:`~influx.solvers.preconditioners.NystromPreconditioner`) from one
    batched pass over the training data. It removes the few large eigenvalues
    that make a Hessian ill conditioned, which cuts the iterations several
    fold; ``preconditioner=None`` runs unpreconditioned CG.

    Parameters
    ----------
    rtol
        Relative tolerance on the residual norm. The default ``1e-4`` keeps
        the influences within a Pearson correlation of ``1 - 1e-6`` of a
        tight solve on the benchmark workloads (``docs/performance.md``,
        "CG tolerance"); ranking training points needs no more. Lower it
        when the solutions themselves are wanted to more digits.
    atol
        Absolute tolerance on the residual norm.
    maxiter
        Iteration limit (operator passes); ``None`` means ``10 * P``.
    x0
        Initial guess, ``[P]`` (shared) or ``[K, P]``; ``None`` means zero.
        Kept for the seed's functions: prefer the guess of each solve,
        ``solve(state, rhs, x0=...)``, which takes precedence.
    preconditioner
        ``"nystrom"`` (default), ``None``, or a
        :class:`~influx.solvers.preconditioners.Preconditioner` such as
        ``NystromPreconditioner(rank=50, seed=1)``.
    block
        Block CG (default) or, with ``False``, one Krylov space per
        right-hand side (influx before issue 9). Under block CG, a Hessian
        that is not positive definite on the search space stops all the
        right-hand sides still running (the message says so).
    """

    name = "cg"

    def __init__(
        self,
        *,
        rtol: float = 1e-4,
        atol: float = 1e-7,
        maxiter: int | None = None,
        x0: Any = None,
        preconditioner: Preconditioner | str | None = "nystrom",
        block: bool = True,
    ) -> None:
        self.rtol = real_option(rtol, "rtol", minimum=0.0)
        self.atol = real_option(atol, "atol", minimum=0.0)
        self.maxiter = integer_option(maxiter, "maxiter", minimum=1, optional=True)
        self.x0 = x0
        self.preconditioner = make_preconditioner(preconditioner)
        if not isinstance(block, bool | np.bool_):
            raise TypeError(f"block must be True or False, got {block!r}.")
        self.block = bool(block)

    def init(
        self,
        operator: LinearOperator,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> CgState:
        if self.preconditioner is None:
            return CgState(operator, None)
        dtype = accumulation_dtype(operator.like)
        fitted = self.preconditioner.fit(operator, dtype, progress=progress)
        return CgState(operator, fitted)

    def solve(
        self, state: CgState, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        """CG from ``x0`` (this solve's guess), else the ``x0`` option, else 0."""
        op = state.operator
        xp = array_namespace(rhs)
        acc = accumulation_dtype(rhs)
        b = xp.astype(rhs, acc)
        size = int(b.shape[1])
        maxiter = self.maxiter if self.maxiter is not None else 10 * size
        b_norms = to_host(row_norms(b), op)
        thresholds = np.maximum(self.rtol * b_norms, self.atol)

        guess = self.x0 if x0 is None else x0
        if guess is None:
            x = xp.zeros_like(b)
            r = b
        else:
            x = initial_guess(guess, b, op, "x0")
            r = b - op.mv(x)
        precondition = (
            _identity if state.preconditioner is None else (state.preconditioner.apply)
        )
        if self.block:
            return self._solve_block(
                op, rhs, b, x, r, b_norms, thresholds, maxiter, precondition, progress
            )
        x, info = self._solve_plain(
            op, x, r, b_norms, thresholds, maxiter, precondition, progress
        )
        warn_if_not_converged(info)
        return xp.astype(x, rhs.dtype), info

    def _solve_plain(
        self,
        op: LinearOperator,
        x: Any,
        r: Any,
        b_norms: np.ndarray,
        thresholds: np.ndarray,
        maxiter: int,
        precondition: Any,
        progress: bool,
    ) -> tuple[Any, SolveInfo]:
        """One CG per right-hand side from ``x`` with residuals ``r = b - A x``.

        Returns the solutions in the accumulation dtype and the info, without
        warning.
        """
        xp = array_namespace(r)
        k = int(r.shape[0])
        p = precondition(r)
        rr = xp.sum(r * r, axis=1)
        rz = xp.sum(r * p, axis=1)

        iterations = np.zeros(k, dtype=np.int64)
        residuals = np.sqrt(np.maximum(to_host(rr, op), 0.0))
        converged = np.zeros(k, dtype=bool)
        breakdown = np.zeros(k, dtype=bool)
        rows = np.arange(k)  # original index of each row of x, r, p
        running = np.ones(k, dtype=bool)  # rows still iterating
        done_x: list[Any] = []
        done_rows: list[np.ndarray] = []

        with progress_bar(progress, "CG", total=maxiter) as bar:
            for iteration in range(maxiter + 1):
                norms = np.sqrt(np.maximum(to_host(rr, op), 0.0))
                residuals[rows[running]] = norms[running]
                finished = running & (norms <= thresholds[rows])
                converged[rows[finished]] = True
                if iteration == maxiter:
                    finished = running.copy()  # out of iterations: all stop here
                running &= ~finished
                if running.any():
                    ap = op.mv(p)
                    pap = xp.sum(p * ap, axis=1)
                    stalled = running & (to_host(pap, op) <= 0)
                    breakdown[rows[stalled]] = True
                    running &= ~stalled
                if not running.any():
                    break
                if 2 * int(running.sum()) <= rows.size:
                    # Compact only when half the rows have stopped: the stack
                    # then takes few distinct sizes, which keeps compiled
                    # backends (jax.jit) from recompiling at every size.
                    stopped = np.nonzero(~running)[0]
                    done_x.append(_take(x, stopped))
                    done_rows.append(rows[stopped])
                    keep = np.nonzero(running)[0]
                    rows, running = rows[keep], running[keep]
                    x, r, p, rr, rz, ap, pap = (
                        _take(a, keep) for a in (x, r, p, rr, rz, ap, pap)
                    )
                # stopped rows get zero steps and keep their x and r
                mask = xp.asarray(running, device=array_device(rr))
                alpha = xp.where(mask, rz / xp.where(mask, pap, 1.0), 0.0)
                x = x + alpha[:, None] * p
                r = r - alpha[:, None] * ap
                z = precondition(r)
                rz_new = xp.sum(r * z, axis=1)
                beta = xp.where(mask, rz_new / xp.where(mask, rz, 1.0), 0.0)
                p = xp.where(mask[:, None], z + beta[:, None] * p, p)
                rz = rz_new
                rr = xp.sum(r * r, axis=1)
                iterations[rows[running]] += 1
                bar.update(1)
                bar.set_postfix_str(f"running {int(running.sum())}/{k}")

        done_x.append(x)
        done_rows.append(rows)
        order = np.argsort(np.concatenate(done_rows))
        solution = _take(xp.concat(done_x, axis=0), order)
        info = SolveInfo(
            method=self.name,
            iterations=iterations,
            residual_norms=residuals,
            rhs_norms=b_norms,
            converged=converged,
            message=_message(converged, breakdown, residuals, b_norms, maxiter, self),
            extra={
                "residual": "recursive",
                "preconditioner": getattr(self.preconditioner, "name", None),
            },
        )
        return solution, info

    def _solve_block(
        self,
        op: LinearOperator,
        rhs: Any,
        b: Any,
        x: Any,
        r: Any,
        b_norms: np.ndarray,
        thresholds: np.ndarray,
        maxiter: int,
        precondition: Any,
        progress: bool,
    ) -> tuple[Any, SolveInfo]:
        """Block CG from ``x`` with residuals ``r = b - A x`` (all ``[K, P]``).

        The search block ``D`` ``[s, P]`` (``s <= K`` rows) is kept
        A-orthonormal, ``D A D^T = I``, so the step of every right-hand side
        is ``alpha = D r_k`` and the next block is the preconditioned
        residuals made A-orthogonal to ``D``, then orthonormalised with the
        dependent directions dropped.
        """
        xp = array_namespace(b)
        k = int(b.shape[0])
        eps = float(xp.finfo(b.dtype).eps)
        iterations = np.zeros(k, dtype=np.int64)
        residuals = np.zeros(k)
        converged = np.zeros(k, dtype=bool)
        breakdown = np.zeros(k, dtype=bool)
        running = np.ones(k, dtype=bool)
        directions = images = None  # D [s, P] and A D, row-wise
        passes, widths, stalled = 0, [], False
        fallback: np.ndarray | None = None
        with progress_bar(progress, "Block CG", total=maxiter) as bar:
            for iteration in range(maxiter + 1):
                norms = np.sqrt(np.maximum(to_host(xp.sum(r * r, axis=1), op), 0.0))
                residuals[running] = norms[running]
                finished = running & (norms <= thresholds)
                converged |= finished
                running &= ~finished
                if iteration == maxiter or not running.any():
                    break
                active = np.nonzero(running)[0]
                z = precondition(_take(r, active))  # [Ka, P]
                if directions is not None:
                    z = z - (z @ images.T) @ directions  # A-orthogonal to D
                candidates = _independent_rows(z, op, DEFLATION * eps)
                if candidates is None:  # nothing new to search: stagnation
                    stalled = True
                    break
                product = op.mv(candidates)
                passes += 1
                gram = to_host(candidates @ product.T, op)  # [s, s]: D A D^T
                values, vectors = np.linalg.eigh((gram + gram.T) / 2)
                if values[0] <= 0:
                    # A is not positive definite on the shared search space:
                    # go on with one CG per right-hand side (below), so that
                    # only the columns whose own direction meets negative
                    # curvature stop, as plain CG does.
                    fallback = active
                    break
                keep = values > values[-1] * eps * values.size
                transform = from_host(
                    (vectors[:, keep] / np.sqrt(values[keep])).T, candidates, op
                )
                directions = transform @ candidates  # D A D^T = I
                images = transform @ product
                steps = np.array(to_host(directions @ r.T, op))  # [s, K], writable
                steps[:, ~running] = 0.0  # stopped columns keep their x and r
                alpha = from_host(steps.T, directions, op)  # [K, s]
                x = x + alpha @ directions
                r = r - alpha @ images
                iterations[active] += 1
                widths.append(int(directions.shape[0]))
                bar.update(1)
                bar.set_postfix_str(f"running {active.size}/{k}")

        plain_passes = 0
        if fallback is not None:
            rest = max(maxiter - int(iterations.max(initial=0)), 0)
            solved, plain = self._solve_plain(
                op,
                _take(x, fallback),
                _take(r, fallback),
                b_norms[fallback],
                thresholds[fallback],
                rest,
                precondition,
                progress,
            )
            x = _replace_rows(x, fallback, solved)
            iterations[fallback] += plain.iterations
            residuals[fallback] = plain.residual_norms
            converged[fallback] = plain.converged
            breakdown[fallback] = ~plain.converged & (plain.iterations < rest)
            plain_passes = int(plain.iterations.max(initial=0)) + 1
        message = _message(converged, breakdown, residuals, b_norms, maxiter, self)
        if stalled:
            late = ~converged
            relative = residuals[late] / np.where(b_norms[late] > 0, b_norms[late], 1)
            message = (
                f"block CG stopped after {passes} iterations with {int(late.sum())} "
                f"of {k} right-hand sides above rtol={self.rtol:g} / atol="
                f"{self.atol:g} (max relative residual {float(relative.max()):.2e}): "
                "their preconditioned residuals left no new search direction, "
                "lost to rounding. Loosen rtol or atol; raising maxiter does not "
                "help."
            )
        info = SolveInfo(
            method=self.name,
            iterations=iterations,
            residual_norms=residuals,
            rhs_norms=b_norms,
            converged=converged,
            message=message,
            extra={
                "residual": "recursive",
                "preconditioner": getattr(self.preconditioner, "name", None),
                "block": True,
                "operator_passes": passes + plain_passes,
                "plain_after_indefinite": fallback is not None,
                "block_widths": widths,
            },
        )
        warn_if_not_converged(info)
        return xp.astype(x, rhs.dtype), info


#: Directions of the next search block whose squared singular value, relative
#: to the largest, is below this many ``eps`` are dependent and dropped.
DEFLATION = 1e4


def _independent_rows(rows: Any, op: LinearOperator, cutoff: float) -> Any | None:
    """Orthonormal rows spanning ``rows`` ``[K, P]``, dependent ones dropped.

    Each row is scaled to unit norm first, so that a nearly converged
    residual is not mistaken for a dependent one. The Gram matrix's
    eigendecomposition (host, float64) gives the basis; directions whose
    eigenvalue is below ``cutoff`` times the largest are dropped. ``None``
    when no row is left.
    """
    xp = array_namespace(rows)
    norms = to_host(xp.sqrt(xp.sum(rows * rows, axis=1)), op)
    nonzero = np.isfinite(norms) & (norms > 0)
    if not nonzero.any():
        return None
    scale = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
    unit = rows * from_host(scale[:, None], rows, op)
    gram = to_host(unit @ unit.T, op)
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    keep = values > values[-1] * cutoff
    transform = (vectors[:, keep] / np.sqrt(values[keep])).T  # [s, K]
    return from_host(transform, rows, op) @ unit


def _replace_rows(array: Any, rows: np.ndarray, values: Any) -> Any:
    """``array`` with ``array[rows] = values`` (no in-place writes: JAX arrays)."""
    xp = array_namespace(array)
    others = np.setdiff1d(np.arange(int(array.shape[0])), rows)
    joined = xp.concat([_take(array, others), xp.astype(values, array.dtype)], axis=0)
    order = np.argsort(np.concatenate([others, rows]))
    return _take(joined, order)


def _identity(residuals: Any) -> Any:
    return residuals


def _take(array: Any, indices: np.ndarray) -> Any:
    xp = array_namespace(array)
    if indices.size == array.shape[0] and np.array_equal(
        indices, np.arange(indices.size)
    ):
        return array
    index = xp.asarray(indices, device=array_device(array))
    return xp.take(array, index, axis=0)


def _message(
    converged: np.ndarray,
    breakdown: np.ndarray,
    residuals: np.ndarray,
    b_norms: np.ndarray,
    maxiter: int,
    solver: CgSolver,
) -> str:
    parts = []
    k = converged.size
    if np.any(breakdown):
        parts.append(
            f"{int(breakdown.sum())} of {k} right-hand sides stopped because the "
            "Hessian is not positive definite along their search direction "
            "(p.Hp <= 0): raise hessian_regularization"
        )
    late = ~converged & ~breakdown
    if np.any(late):
        relative = residuals[late] / np.where(b_norms[late] > 0, b_norms[late], 1.0)
        parts.append(
            f"{int(late.sum())} of {k} right-hand sides did not reach rtol="
            f"{solver.rtol:g} / atol={solver.atol:g} in maxiter={maxiter} iterations "
            f"(max relative residual {float(relative.max()):.2e}): raise maxiter, or "
            "raise hessian_regularization to improve the conditioning"
        )
    return "; ".join(parts) + ("." if parts else "")


# -- fitted state, for influx.Influence's save and load -----------------------


def export_state(state: CgState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host arrays (the preconditioner's factors) and JSON metadata."""
    from influx.solvers.preconditioners import export_fitted

    return export_fitted(state.preconditioner, state.operator)


def import_state(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], operator: LinearOperator
) -> CgState:
    """The state :func:`export_state` wrote, on ``operator`` (the shifted Hessian)."""
    from influx.solvers.preconditioners import import_fitted

    return CgState(operator, import_fitted(arrays, meta, operator))
