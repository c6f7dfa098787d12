"""Preconditioners for the iterative solvers.

A preconditioner is built once from the operator (``fit``) and then applied
to stacks of residuals ``[K, P]`` (``apply``). It approximates the inverse of
the operator ``A = H + mu I`` cheaply, so that CG needs far fewer products
with ``A``: the number of CG iterations grows with the square root of the
condition number, and a Hessian's condition number comes from its few large
eigenvalues.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx.errors import InputError
from influx.operators import LinearOperator, split_shift
from influx.solvers._base import from_host, integer_option, to_host

__all__ = [
    "FittedPreconditioner",
    "NystromPreconditioner",
    "Preconditioner",
    "make_preconditioner",
]


class FittedPreconditioner(abc.ABC):
    """A preconditioner ready to apply: ``apply(R) ~ A^{-1} R`` row-wise."""

    @abc.abstractmethod
    def apply(self, residuals: Any) -> Any:
        """``[K, P] -> [K, P]``, in the dtype of ``residuals``."""

    def apply_sqrt(self, residuals: Any) -> Any:
        """``M^(1/2) R`` row-wise, for the symmetric ``M^(1/2) A M^(1/2)``.

        Optional: LiSSA uses it to estimate the eigenvalues of ``M A`` by
        Lanczos, and falls back to power iteration where it is missing.
        """
        raise NotImplementedError


class Preconditioner(abc.ABC):
    """Builds a :class:`FittedPreconditioner` for an operator."""

    #: Name used in ``SolveInfo`` and error messages.
    name: str

    @abc.abstractmethod
    def fit(
        self, operator: LinearOperator, dtype: Any, *, progress: bool = False
    ) -> FittedPreconditioner:
        """Do the setup (products with ``operator``) once; arrays in ``dtype``."""


@dataclass(frozen=True)
class _LowRankPlusIdentity(FittedPreconditioner):
    """``(lambda_r + mu) U^T (Lambda + mu)^{-1} U + (I - U^T U)``.

    ``U`` holds orthonormal rows ``[r, P]``; ``Lambda`` the matching
    eigenvalue estimates ``[r]`` of the unshifted operator.
    """

    vectors: Any
    eigenvalues: Any
    shift: float
    floor: float

    def apply(self, residuals: Any) -> Any:
        xp = array_namespace(residuals)
        vectors = xp.astype(self.vectors, residuals.dtype)
        eigenvalues = xp.astype(self.eigenvalues, residuals.dtype)
        coefficients = residuals @ vectors.T
        scaled = coefficients * (self.floor / (eigenvalues + self.shift))
        return residuals + (scaled - coefficients) @ vectors

    def apply_sqrt(self, residuals: Any) -> Any:
        xp = array_namespace(residuals)
        vectors = xp.astype(self.vectors, residuals.dtype)
        eigenvalues = xp.astype(self.eigenvalues, residuals.dtype)
        coefficients = residuals @ vectors.T
        scaled = coefficients * xp.sqrt(self.floor / (eigenvalues + self.shift))
        return residuals + (scaled - coefficients) @ vectors


class NystromPreconditioner(Preconditioner):
    """Randomised Nyström preconditioner (Frangella, Tropp and Udell, 2023).

    ``fit`` applies the operator's unshifted part ``H`` once to ``rank``
    random orthonormal vectors (one batched pass over the training data) and
    forms the Nyström approximation ``H ~ U^T diag(Lambda) U`` of rank
    ``rank``. For ``A = H + mu I`` the preconditioner is

    ``P^{-1} = (Lambda_r + mu) U^T (Lambda + mu)^{-1} U + (I - U^T U)``,

    which maps the top ``rank`` eigenvalues of ``A`` close to
    ``Lambda_r + mu`` and leaves the rest: CG then converges at the speed set
    by ``(Lambda_r + mu) / (lambda_min + mu)`` instead of the full condition
    number. Eigenvalue estimates below zero (an indefinite Hessian) are
    clipped to zero.

    Parameters
    ----------
    rank
        Sketch size ``r``; capped at ``P``. Memory is ``r * P`` numbers.
    seed
        Seed of the random sketch.
    """

    name = "nystrom"

    def __init__(self, rank: int = 100, seed: int | None = 0) -> None:
        self.rank = integer_option(rank, "rank", minimum=1)
        self.seed = integer_option(seed, "seed", optional=True)

    def fit(
        self, operator: LinearOperator, dtype: Any, *, progress: bool = False
    ) -> FittedPreconditioner:
        base, shift = split_shift(operator)
        size = operator.size
        rank = min(self.rank, size)
        rng = np.random.default_rng(self.seed)
        xp = array_namespace(operator.like)
        like = xp.astype(operator.like, dtype)
        gaussian = from_host(rng.standard_normal((size, rank)), like, operator)
        # Thin QR on the backend's device: [P, r] -> orthonormal columns.
        test = xp.linalg.qr(gaussian, mode="reduced")[0].T  # [r, P]
        del gaussian
        image = base.mv(test)  # [r, P]: rows H @ omega_i
        # A small shift nu keeps the core matrix well conditioned in floating
        # point; it is removed from the eigenvalues again below.
        eps = float(xp.finfo(test.dtype).eps)
        norm = float(to_host(xp.sqrt(xp.sum(image * image)), operator))
        nu = float(np.sqrt(size) * eps * norm)
        nu = max(nu, np.finfo(np.float64).tiny)
        image = image + nu * test
        core = to_host(test @ image.T, operator).astype(np.float64)  # [r, r]
        del test
        core = (core + core.T) / 2
        values, vectors = np.linalg.eigh(core)
        keep = values > values.max() * rank * np.finfo(np.float64).eps
        if not np.any(keep):
            raise InputError(
                "The Nystrom sketch of the Hessian is zero or negative: the "
                "Hessian has no positive curvature to precondition. Raise "
                "hessian_regularization to make it positive definite, or use "
                "preconditioner=None."
            )
        inverse_root = vectors[:, keep] / np.sqrt(values[keep])  # [r, r']
        factor = from_host(inverse_root.T, image, operator)  # [r', r]
        b = factor @ image  # [r', P]; H + nu I ~ b^T b
        del image
        # The right singular vectors of b from the eigenpairs of its small
        # Gram matrix b b^T = W diag(s^2) W^T: rows diag(1/s) W^T b. No SVD of
        # [r', P] and nothing [P, P].
        gram = to_host(b @ b.T, operator)
        squares, left = np.linalg.eigh((gram + gram.T) / 2)
        squares, left = squares[::-1], left[:, ::-1]  # descending, as an SVD
        eigenvalues = np.maximum(squares - nu, 0.0)
        usable = eigenvalues + shift > eigenvalues.max() * rank * eps
        if not np.any(usable):
            raise InputError(
                "The Nystrom preconditioner needs a positive definite operator: "
                "raise hessian_regularization, or use preconditioner=None."
            )
        eigenvalues = eigenvalues[usable]
        floor = float(eigenvalues.min()) + shift
        # Directions whose s^2 is lost in rounding of the Gram matrix carry no
        # curvature above the floor (their weight 1 - floor / (lambda + mu) is
        # about 0): leave them to the identity part instead of dividing by ~0.
        resolved = usable & (squares > squares[0] * 10 * rank * eps)
        count = int(resolved.sum())
        combination = (left[:, :count] / np.sqrt(squares[:count])).T  # [r'', r']
        rows = from_host(combination, b, operator) @ b  # [r'', P] orthonormal
        eigenvalues = eigenvalues[:count]
        native = from_host(eigenvalues, rows, operator)
        return _LowRankPlusIdentity(rows, native, shift, floor)


PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    NystromPreconditioner.name: NystromPreconditioner,
}


def make_preconditioner(
    spec: Preconditioner | str | None, **options: Any
) -> Preconditioner | None:
    """``None``, a :class:`Preconditioner`, or one built from its name."""
    if spec is None or isinstance(spec, Preconditioner):
        if options:
            raise InputError(
                f"preconditioner options {sorted(options)} need preconditioner "
                "given by name, e.g. preconditioner='nystrom'."
            )
        return spec
    if isinstance(spec, str) and spec.lower() in PRECONDITIONERS:
        return PRECONDITIONERS[spec.lower()](**options)
    raise InputError(
        f"preconditioner must be None, a Preconditioner or one of "
        f"{sorted(PRECONDITIONERS)}, got {spec!r}."
    )


# -- fitted state, for influx.Influence's save and load -----------------------


def export_fitted(
    fitted: FittedPreconditioner | None, operator: LinearOperator
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host arrays and JSON metadata of a fitted preconditioner (``None``: none).

    Raises
    ------
    TypeError
        For a preconditioner other than the built-in low-rank one.
    """
    if fitted is None:
        return {}, {"preconditioner": None}
    if not isinstance(fitted, _LowRankPlusIdentity):
        raise TypeError(
            f"cannot save a fitted {type(fitted).__name__}: only the built-in "
            "Nystrom preconditioner's state can be saved."
        )
    arrays = {
        "preconditioner.vectors": operator.to_numpy(fitted.vectors),
        "preconditioner.eigenvalues": operator.to_numpy(fitted.eigenvalues),
    }
    meta = {
        "preconditioner": "low_rank_plus_identity",
        "shift": float(fitted.shift),
        "floor": float(fitted.floor),
    }
    return arrays, meta


def import_fitted(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], operator: LinearOperator
) -> FittedPreconditioner | None:
    """The preconditioner :func:`export_fitted` wrote, in the saved dtype."""
    if meta.get("preconditioner") is None:
        return None
    xp = array_namespace(operator.like)
    native = []
    for key in ("preconditioner.vectors", "preconditioner.eigenvalues"):
        host = arrays[key]
        like = operator.like
        if host.dtype == np.float64:
            like = xp.astype(like, xp.float64)
        native.append(from_host(host, like, operator))
    return _LowRankPlusIdentity(
        native[0], native[1], float(meta["shift"]), float(meta["floor"])
    )
