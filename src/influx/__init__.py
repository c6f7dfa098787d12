"""influx: influence functions for PyTorch and JAX models through one API.

The core imports no framework; each framework is a backend found through the
entry-point group ``influx.backends`` and loaded on first use.
"""

from __future__ import annotations

from influx._compile_cache import enable_compilation_cache
from influx._store import Results, open_results
from influx.attribution import Influence
from influx.backends import (
    BackendNotInstalledError,
    available_backends,
    get_backend,
    use_backend,
)
from influx.data import Batches, batches
from influx.errors import (
    InfluxWarning,
    InputError,
    NotConvergedWarning,
    NotPositiveDefiniteWarning,
)
from influx.influence import (
    compute_influence_factors,
    compute_influences,
    compute_influences_pert,
    compute_influences_up,
)
from influx.layers import Layer, LayerBatch, LayerStructured
from influx.methods import InfluenceType, InversionMethod
from influx.models import twice_differentiable
from influx.operators import HessianOperator, LinearOperator
from influx.protocols import Backend, TwiceDifferentiable
from influx.solvers import (
    ArnoldiSolver,
    BlockSolver,
    CgSolver,
    DirectSolver,
    LissaSolver,
    NystromPreconditioner,
    Preconditioner,
    SolveInfo,
    Solver,
    make_solver,
    register_solver,
)
from influx.sources import ArraySource, FactorySource

__version__ = "0.1.0"

__all__ = [
    "ArnoldiSolver",
    "ArraySource",
    "BlockSolver",
    "Backend",
    "BackendNotInstalledError",
    "Batches",
    "CgSolver",
    "DirectSolver",
    "FactorySource",
    "HessianOperator",
    "Influence",
    "InfluenceType",
    "InfluxWarning",
    "InputError",
    "InversionMethod",
    "Layer",
    "LayerBatch",
    "LayerStructured",
    "LinearOperator",
    "LissaSolver",
    "NotConvergedWarning",
    "NotPositiveDefiniteWarning",
    "NystromPreconditioner",
    "Preconditioner",
    "Results",
    "SolveInfo",
    "Solver",
    "TwiceDifferentiable",
    "available_backends",
    "batches",
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
    "enable_compilation_cache",
    "get_backend",
    "make_solver",
    "open_results",
    "register_solver",
    "twice_differentiable",
    "use_backend",
]
