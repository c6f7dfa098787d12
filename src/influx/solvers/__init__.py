"""Solvers for ``A x = b`` with many right-hand sides, one module each.

Each solver is an object built from its options; ``init(operator)`` does the
expensive part once and ``solve(state, rhs)`` answers a stack of right-hand
sides ``[K, P]``, returning the solutions ``[K, P]`` and a :class:`SolveInfo`.
"""

from __future__ import annotations

from typing import Any

from influx.methods import InversionMethod, parse_inversion_method
from influx.solvers._base import SolveInfo, Solver
from influx.solvers.arnoldi import ArnoldiSolver
from influx.solvers.cg import CgSolver
from influx.solvers.direct import DirectSolver
from influx.solvers.lissa import LissaSolver
from influx.solvers.preconditioners import NystromPreconditioner, Preconditioner

__all__ = [
    "ArnoldiSolver",
    "CgSolver",
    "DirectSolver",
    "LissaSolver",
    "NystromPreconditioner",
    "Preconditioner",
    "SolveInfo",
    "Solver",
    "make_solver",
]

SOLVERS: dict[InversionMethod, type[Solver]] = {
    InversionMethod.Direct: DirectSolver,
    InversionMethod.Cg: CgSolver,
    InversionMethod.Lissa: LissaSolver,
    InversionMethod.Arnoldi: ArnoldiSolver,
}


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


def make_solver(method: InversionMethod | str, **options: Any) -> Solver:
    """Build the solver of ``method`` with its keyword ``options``.

    Raises
    ------
    ValueError
        If ``method`` is not an inversion method.
    TypeError
        If an option is not one of the method's; the message lists the valid
        ones.
    """
    solver_class = SOLVERS[parse_inversion_method(method)]
    valid = solver_class.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        misplaced = "".join(
            f" {name!r} is not a solver option but an argument of "
            f"{TOP_LEVEL_ARGUMENTS[name]}: pass it there."
            for name in unknown
            if name in TOP_LEVEL_ARGUMENTS
        )
        raise TypeError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for inversion method "
            f"{solver_class.name!r}. Valid options: {', '.join(valid) or 'none'}."
            + misplaced
        )
    return solver_class(**options)
