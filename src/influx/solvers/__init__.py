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
        raise TypeError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} for inversion method "
            f"{solver_class.name!r}. Valid options: {', '.join(valid) or 'none'}."
        )
    return solver_class(**options)
