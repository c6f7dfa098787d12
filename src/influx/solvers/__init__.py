"""Solvers for ``A x = b`` with many right-hand sides, one module each.

Each solver is an object built from its options; ``init(operator, *, model,
training_data)`` does the expensive part once and ``solve(state, rhs, *, x0)``
answers a stack of right-hand sides ``[K, P]``, returning the solutions
``[K, P]`` and a :class:`SolveInfo` (the contract: :class:`Solver`). The
registry :data:`SOLVERS` maps method names to classes; third parties add to it
with :func:`register_solver`.
"""

from __future__ import annotations

from typing import Any

from influx.errors import InputError
from influx.methods import InversionMethod
from influx.solvers._base import SolveInfo, Solver
from influx.solvers.arnoldi import ArnoldiSolver
from influx.solvers.block import BlockSolver
from influx.solvers.cg import CgSolver
from influx.solvers.direct import DirectSolver
from influx.solvers.kfac import EkfacSolver, KfacSolver
from influx.solvers.lissa import LissaSolver
from influx.solvers.preconditioners import NystromPreconditioner, Preconditioner

__all__ = [
    "ArnoldiSolver",
    "BlockSolver",
    "CgSolver",
    "DirectSolver",
    "EkfacSolver",
    "KfacSolver",
    "LissaSolver",
    "NystromPreconditioner",
    "Preconditioner",
    "SolveInfo",
    "Solver",
    "make_solver",
    "register_solver",
]

#: The solver class of each method name (lower case): the built-in ones and
#: those added with :func:`register_solver`.
SOLVERS: dict[str, type[Solver]] = {
    InversionMethod.Direct.value: DirectSolver,
    InversionMethod.Cg.value: CgSolver,
    InversionMethod.Lissa.value: LissaSolver,
    InversionMethod.Arnoldi.value: ArnoldiSolver,
    InversionMethod.Kfac.value: KfacSolver,
    InversionMethod.Ekfac.value: EkfacSolver,
    InversionMethod.Block.value: BlockSolver,
}


def register_solver(
    name: str, solver_class: type[Solver], *, replace: bool = False
) -> None:
    """Make ``method=name`` build ``solver_class`` (with the method's options).

    Names are case-insensitive. The class follows the :class:`Solver`
    contract: keyword options in ``__init__``; ``init(operator, *, model,
    training_data, progress)``, which receives the wrapped model and the
    training data explicitly; ``solve(state, rhs, *, x0, progress) -> (x,
    info)``.

    Parameters
    ----------
    name
        The method's name, e.g. ``"kfac"``.
    solver_class
        A subclass of :class:`Solver`.
    replace
        Allow replacing a solver registered under ``name`` (also a built-in).

    Raises
    ------
    TypeError
        If ``solver_class`` is not a :class:`Solver` subclass.
    ValueError
        If ``name`` is empty, or taken and ``replace`` is false.

    Examples
    --------
    >>> class MySolver(influx.Solver):  # doctest: +SKIP
    ...     name = "mine"
    ...     def init(self, operator, *, model=None, training_data=None,
    ...              progress=False): ...
    ...     def solve(self, state, rhs, *, x0=None, progress=False): ...
    >>> influx.register_solver("mine", MySolver)  # doctest: +SKIP
    >>> influx.Influence(model, method="mine").fit(train)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}.")
    if not (isinstance(solver_class, type) and issubclass(solver_class, Solver)):
        raise TypeError(
            f"solver_class must be a subclass of influx.Solver, got {solver_class!r}."
        )
    key = name.strip().lower()
    known = SOLVERS.get(key)
    if known is not None and known is not solver_class and not replace:
        raise ValueError(
            f"The method name {key!r} is taken by {known.__name__}; pick another "
            "name, or pass replace=True to replace it."
        )
    SOLVERS[key] = solver_class


#: Arguments of the public functions that are not solver options, and the
#: functions that take them, for errors when one is passed as an option.
TOP_LEVEL_ARGUMENTS: dict[str, str] = {
    "hessian_regularization": "compute_influences and compute_influence_factors",
    "hessian_perturbation": "compute_influence_factors and compute_influences",
    "influence_type": "compute_influences",
    "input_data": "compute_influences",
    "test_data": "compute_influences and compute_influence_factors",
    "training_data": "compute_influences and compute_influence_factors",
    "out": "compute_influences, compute_influences_up and compute_influences_pert",
    "return_info": "compute_influence_factors",
    "inversion_method": "compute_influences and compute_influence_factors",
}


def make_solver(method: InversionMethod | str | Solver, **options: Any) -> Solver:
    """Build the solver of ``method`` with its keyword ``options``.

    Parameters
    ----------
    method
        A method's name (built-in or :func:`register_solver`-ed, any case),
        an :class:`~influx.InversionMethod`, or a :class:`Solver` instance,
        returned as it is (its options are set on it already).
    **options
        The method's options; renamed ones warn and are passed on.

    Raises
    ------
    InputError
        (a ``ValueError``) If ``method`` names no solver.
    TypeError
        If an option is not one of the method's (the message lists the valid
        ones), or options come with a solver instance, or ``method`` is a
        solver class rather than an instance.
    """
    if isinstance(method, Solver):
        if options:
            raise TypeError(
                f"method is a solver instance ({method!r}); its options are set "
                f"on it, so the options {sorted(options)} are not allowed. Build "
                "the solver with them, or pass the method's name."
            )
        return method
    if isinstance(method, type) and issubclass(method, Solver):
        raise TypeError(
            f"method must be a name or a solver instance, got the class "
            f"{method.__name__}: instantiate it, e.g. {method.__name__}()."
        )
    key = method.value if isinstance(method, InversionMethod) else method
    solver_class = SOLVERS.get(key.strip().lower()) if isinstance(key, str) else None
    if solver_class is None:
        valid = ", ".join(map(repr, SOLVERS))
        raise InputError(
            f"Unknown inversion_method {method!r}. Valid values: {valid}. A "
            "third-party solver is added with influx.register_solver(name, cls)."
        )
    valid_options = solver_class.option_names()
    accepted = set(valid_options) | set(solver_class.deprecated_options)
    unknown = sorted(set(options) - accepted)
    if unknown and not solver_class.takes_any_option():
        misplaced = "".join(
            f" {name!r} is not a solver option but an argument of "
            f"{TOP_LEVEL_ARGUMENTS[name]}: pass it there."
            for name in unknown
            if name in TOP_LEVEL_ARGUMENTS
        )
        raise TypeError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for inversion method "
            f"{key.strip().lower()!r}. Valid options: "
            f"{', '.join(valid_options) or 'none'}." + misplaced
        )
    return solver_class(**options)
