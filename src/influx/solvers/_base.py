"""What every solver shares: the result record and the init/solve contract."""

from __future__ import annotations

import abc
import inspect
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from influx.errors import InputError, NotConvergedWarning
from influx.operators import LinearOperator

__all__ = [
    "SolveInfo",
    "Solver",
    "accumulation_dtype",
    "deprecated_option",
    "dense_matrix",
    "from_host",
    "initial_guess",
    "integer_option",
    "numpy_dtype",
    "real_option",
    "row_norms",
    "working_dtype",
]


@dataclass(frozen=True)
class SolveInfo:
    """How a solve went, one entry per right-hand side.

    Attributes
    ----------
    method
        The inversion method's name.
    iterations
        ``[K]`` iterations (operator products) each right-hand side took.
    residual_norms
        ``[K]`` final ``||A x_k - b_k||``.
    rhs_norms
        ``[K]`` ``||b_k||``.
    converged
        ``[K]`` whether each right-hand side met the method's tolerance.
    message
        Empty when everything converged; otherwise what went wrong and which
        option to change.
    extra
        Method-specific diagnostics (eigenvalues, scale, ...).
    """

    method: str
    iterations: np.ndarray
    residual_norms: np.ndarray
    rhs_norms: np.ndarray
    converged: np.ndarray
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_residuals(self) -> np.ndarray:
        """``[K]`` ``||A x_k - b_k|| / ||b_k||`` (0 where ``b_k = 0``)."""
        safe = np.where(self.rhs_norms > 0, self.rhs_norms, 1.0)
        return np.where(self.rhs_norms > 0, self.residual_norms / safe, 0.0)

    @property
    def all_converged(self) -> bool:
        """Whether every right-hand side converged."""
        return bool(np.all(self.converged))

    def __str__(self) -> str:
        k = len(self.converged)
        status = "converged" if self.all_converged else "NOT converged"
        relative = self.relative_residuals
        if k and bool(np.all(np.isnan(relative))):
            # Not computed (Arnoldi without residuals=True), not a failure.
            worst = "not computed"
        else:
            worst = f"{float(np.nanmax(relative)) if k else 0.0:.2e}"
        text = (
            f"{self.method}: {status} on {int(np.sum(self.converged))}/{k} right-hand "
            f"sides, max iterations {int(np.max(self.iterations)) if k else 0}, "
            f"max relative residual {worst}"
        )
        return f"{text}. {self.message}" if self.message else text


class Solver(abc.ABC):
    """Solves ``A x = b`` for many right-hand sides with one setup.

    The contract, for the built-in solvers and for third-party ones
    (registered by name with :func:`influx.register_solver`, or passed as an
    instance as ``method=``):

    - ``__init__`` takes the method's options as keywords, and nothing else;
      :meth:`option_names` reads them from its signature.
    - ``init(operator, *, model=None, training_data=None, progress=False)``
      does the expensive part once (a factorisation, an eigendecomposition,
      a preconditioner sketch) and returns a state. ``operator`` is the
      regularised Hessian ``A = H + lambda I`` as a
      :class:`~influx.operators.LinearOperator` (products only). ``model``
      (the :class:`~influx.TwiceDifferentiable`) and ``training_data`` (the
      re-iterable of ``(x, y)`` batches the Hessian averages over; read it
      with :class:`influx.data.DataReader`) are passed explicitly for solvers
      that need more than products, such as a block-diagonal or Kronecker
      approximation built from the model's layers: a solver never digs them
      out of the operator. ``influx.Influence.fit`` and the functional API
      always pass both; a solver that needs them raises when they are
      ``None``.
    - ``solve(state, rhs, *, x0=None, progress=False)`` answers right-hand
      sides ``rhs`` ``[K, P]`` and returns ``(x, info)``: ``x`` ``[K, P]`` in
      ``rhs``'s dtype and a :class:`SolveInfo`. ``x0`` is an initial guess of
      the solution for this solve (``[P]`` or ``[K, P]``), for the iterative
      methods; it takes precedence over an initial guess set as a solver
      option, and exact methods ignore it.

    Keyword options that were renamed are listed in
    :attr:`deprecated_options` (old name to new name); they are accepted with
    a :class:`DeprecationWarning` and are not among :meth:`option_names`.
    """

    #: The inversion method's name, as in :class:`influx.InversionMethod`.
    name: ClassVar[str]
    #: Old option names still accepted, mapped to their new names.
    deprecated_options: ClassVar[dict[str, str]] = {}
    #: The curvature the solver approximates whatever operator it gets (K-FAC
    #: and EK-FAC: ``"ggn"``, from the model's layers); ``None`` for a solver
    #: of its operator, whose curvature ``Influence(curvature=...)`` chooses.
    curvature: ClassVar[str | None] = None

    @abc.abstractmethod
    def init(
        self,
        operator: LinearOperator,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> Any:
        """Prepare to solve with ``operator``; returns the solver state."""

    @abc.abstractmethod
    def solve(
        self, state: Any, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        """Solve ``operator @ x_k = rhs[k]`` for every row ``k``."""

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options the solver accepts (deprecated aliases aside)."""
        parameters = inspect.signature(cls.__init__).parameters
        return [
            name
            for name, parameter in parameters.items()
            if name != "self"
            and name not in cls.deprecated_options
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ]

    @classmethod
    def takes_any_option(cls) -> bool:
        """Whether ``__init__`` takes ``**options`` (any keyword is accepted)."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return any(p.kind is p.VAR_KEYWORD for p in parameters)

    def __repr__(self) -> str:
        options = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.option_names()
            if not name.startswith("x0") and name != "h0" and hasattr(self, name)
        )
        return f"{type(self).__name__}({options})"


def deprecated_option(
    solver: type[Solver], old: str, old_value: Any, new: str, new_value: Any
) -> Any:
    """The value of option ``new``, given also under its deprecated name ``old``.

    Warns (:class:`DeprecationWarning`) when ``old`` is used; both at once is
    a ``TypeError``.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(
            f"{solver.name}: {old!r} is the deprecated name of {new!r}; pass only "
            f"{new}={old_value!r}."
        )
    warnings.warn(
        f"The {solver.name} option {old!r} is deprecated: use {new}={old_value!r}.",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def row_norms(array: Any) -> Any:
    """Euclidean norm of each row of ``[K, P]``, shape ``[K]``."""
    xp = array_namespace(array)
    return xp.sqrt(xp.sum(array * array, axis=1))


def accumulation_dtype(like: Any) -> Any:
    """float64 where the namespace and device support it, else float32 or wider.

    JAX without ``jax_enable_x64`` and some accelerators have no float64; there
    the solver accumulates in the model's own dtype, or in float32 for a
    half-precision model (:func:`working_dtype`).
    """
    xp = array_namespace(like)
    if like.dtype == xp.float64:
        return xp.float64
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = xp.zeros(1, dtype=xp.float64, device=array_device(like))
    except (TypeError, RuntimeError, ValueError):
        return working_dtype(like)
    return xp.float64 if probe.dtype == xp.float64 else working_dtype(like)


def warn_if_not_converged(info: SolveInfo) -> None:
    """Emit a :class:`NotConvergedWarning` carrying ``info.message``."""
    if not info.all_converged:
        warnings.warn(str(info), NotConvergedWarning, stacklevel=3)


def to_host(array: Any, operator: LinearOperator) -> np.ndarray:
    """``array`` as float64 numpy, via the operator's backend."""
    return np.asarray(operator.to_numpy(array), dtype=np.float64)


def from_host(array: np.ndarray, like: Any, operator: LinearOperator) -> Any:
    """A host array as a native array with ``like``'s dtype and device."""
    backend = operator.backend
    if backend is not None:
        return backend.asarray(np.ascontiguousarray(array), like=like)
    xp = array_namespace(like)
    return xp.asarray(array, dtype=like.dtype, device=array_device(like))


def initial_guess(value: Any, rhs: Any, operator: LinearOperator, name: str) -> Any:
    """A user's starting point, ``[P]`` or ``[K, P]``, as ``[K, P]`` like ``rhs``."""
    xp = array_namespace(rhs)
    if isinstance(rhs, np.ndarray) and hasattr(value, "shape"):
        value = np.asarray(value)  # a host-mode solve runs in numpy throughout
    if isinstance(value, np.ndarray) or not hasattr(value, "shape"):
        value = operator.from_numpy(np.asarray(value))
    value = xp.astype(value, rhs.dtype)
    if tuple(value.shape) == tuple(rhs.shape[1:]):
        value = xp.broadcast_to(value[None, :], rhs.shape)
    if tuple(value.shape) != tuple(rhs.shape):
        raise InputError(
            f"{name} must have shape [P]={tuple(rhs.shape[1:])} or "
            f"[K, P]={tuple(rhs.shape)}, got {tuple(value.shape)}."
        )
    return value


def numpy_dtype(array: Any) -> np.dtype:
    """The numpy dtype matching a native array's dtype (``torch.float32`` ...)."""
    return np.dtype(str(array.dtype).rsplit(".", 1)[-1])


def integer_option(
    value: Any, name: str, *, minimum: int | None = None, optional: bool = False
) -> int | None:
    """An integer option as a Python ``int`` (any integral number, not a bool).

    Raises
    ------
    TypeError
        For a bool or a non-integral value.
    InputError
        For a value below ``minimum``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        allowed = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {allowed}, got {value!r}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value}.")
    return value


def real_option(
    value: Any, name: str, *, minimum: float | None = None, optional: bool = False
) -> float | None:
    """A real option as a finite Python ``float`` (any real number, not a bool).

    Raises
    ------
    TypeError
        For a bool or a non-real value.
    InputError
        For a value that is not finite or below ``minimum``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        allowed = "a real number or None" if optional else "a real number"
        raise TypeError(f"{name} must be {allowed}, got {value!r}.")
    value = float(value)
    if not np.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}.")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum:g}, got {value:g}.")
    return value


def working_dtype(like: Any) -> Any:
    """``like``'s dtype, or float32 when that is narrower (float16, bfloat16).

    Dense linear algebra (Cholesky, eigh) is not implemented for half
    precision on every backend and loses too much accuracy in it.
    """
    xp = array_namespace(like)
    if xp.finfo(like.dtype).bits < 32:
        return xp.float32
    return like.dtype


def dense_matrix(operator: LinearOperator, progress: bool = False) -> Any:
    """The operator as ``[P, P]`` in :func:`working_dtype` of its arrays.

    Materialised by the operator's own
    :meth:`~influx.operators.LinearOperator.to_dense`; a half-precision
    operator is asked for float32, so that its products (computed in half
    precision by the model) are accumulated in float32.
    """
    dtype = working_dtype(operator.like)
    if dtype == operator.dtype:
        return operator.to_dense(progress)
    return operator.to_dense(progress, dtype=dtype)
