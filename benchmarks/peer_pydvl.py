"""Benchmark pyDVL's influence functions on a benchmark workload (peer runner).

Runs in a peer environment (``benchmarks/.envs/pydvl-*``) with whichever pyDVL
is installed there: the 0.7 functional API (``compute_influences``) or the
0.10 object API (``DirectInfluence``, ``CgInfluence``, ...). Weights and data
come from :mod:`_workloads`, timing from :mod:`_measure`, so the numbers are
comparable with influx's runners.

Usage::

    python benchmarks/peer_pydvl.py --workload W1 --method cg --out DIR \
        [--repeats 3] [--threads N] [--max-seconds S]

On the S workloads (issue 9; pyDVL 0.10 only) the methods are ``ekfac``,
``nystroem`` and ``block-cg`` (see :data:`SCALE_METHODS`), single thread by
default, with ``fit`` and the query (factors of the test points, then scores
against the training set in chunks) timed apart.

The result is written with :func:`_measure.write_result`, already mapped to
influx's convention (positive up-weighting influence: up-weighting the
training point lowers the test loss). A pyDVL failure or a NaN result is
recorded in ``result.json`` (``error`` / ``nan``) and the runner still exits 0.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pydvl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import Measurement, measure, write_result
from _models import torch_module
from _workloads import Workload, load

METHODS = ("direct", "cg", "lissa", "arnoldi", "direct-pert")

#: pyDVL returns <H^-1 grad l(test), grad l(train)> (0.7 and 0.10 alike),
#: which is influx's sign already (checked against a float64 reference).
SIGN = 1.0

#: Refuse a dense Hessian larger than this (bytes, float32).
MAX_DENSE_HESSIAN_BYTES = 4 * 2**30

#: Up to this many warnings / log records of pyDVL are kept in the meta.
MAX_NOTES = 5

#: Seed for pyDVL's random choices (LiSSA shuffles the training batches).
SEED = 0

#: The benchmark's settings of the iterative methods.
CG_RTOL = 1e-7
LISSA = {"maxiter": 100, "scale": 100.0, "dampen": 0.001}
ARNOLDI_RANK = 30
#: pyDVL's default Krylov dimension for ``ARNOLDI_RANK`` (both versions).
ARNOLDI_KRYLOV = max(2 * ARNOLDI_RANK + 1, 20)


@dataclass
class Plan:
    """What to run: pyDVL's inversion method, influence mode and options.

    Attributes
    ----------
    inversion
        ``"direct"``, ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
    mode
        ``"up"`` or ``"perturbation"``.
    options
        Keyword arguments passed to pyDVL (besides model, loss, data and the
        regularization), under this version's names.
    notes
        Human-readable remarks on how the options were chosen.
    """

    inversion: str
    mode: str
    options: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- #
# Model and data
# --------------------------------------------------------------------------- #


def build_model(workload: Workload) -> torch.nn.Sequential:
    """The workload's MLP in float32, eval mode (the shared builder's)."""
    return torch_module(workload.weights, "float32")


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits, mean over the batch."""
    return torch.nn.functional.cross_entropy(logits, target)


@dataclass(frozen=True)
class Data:
    """The workload as torch tensors and (unshuffled) data loaders."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_loader: DataLoader
    test_loader: DataLoader


def build_data(workload: Workload) -> Data:
    """Tensors and loaders with ``batch_size = spec.batch_size``, no shuffle.

    Parameters
    ----------
    workload
        The loaded workload.

    Returns
    -------
    Data
        float32 inputs, int64 labels, and a loader for each split.
    """
    x_train = torch.from_numpy(workload.x_train).float()
    y_train = torch.from_numpy(workload.y_train).long()
    x_test = torch.from_numpy(workload.x_test).float()
    y_test = torch.from_numpy(workload.y_test).long()
    batch = workload.spec.batch_size
    return Data(
        x_train,
        y_train,
        x_test,
        y_test,
        DataLoader(TensorDataset(x_train, y_train), batch_size=batch, shuffle=False),
        DataLoader(TensorDataset(x_test, y_test), batch_size=batch, shuffle=False),
    )


# --------------------------------------------------------------------------- #
# Version detection and planning
# --------------------------------------------------------------------------- #


def is_legacy_api() -> bool:
    """Whether this pyDVL has the 0.7 functional API (no ``DirectInfluence``)."""
    try:
        from pydvl.influence.torch import DirectInfluence  # noqa: F401
    except ImportError:
        return True
    return False


def pydvl_hvp(
    legacy: bool, inversion: str, model: torch.nn.Module, loader: DataLoader
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Hessian-vector product that pyDVL iterates with, for timing it.

    Parameters
    ----------
    legacy
        Whether pyDVL has the 0.7 API.
    inversion
        ``"cg"`` or ``"arnoldi"``.
    model
        The model.
    loader
        The training data.

    Returns
    -------
    Callable
        ``v -> H v`` over the whole training set, built from pyDVL's own
        pieces: in 0.7, CG's ``mvp`` on the batch-weighted mean gradient
        (kept as a graph) and Arnoldi's ``get_hvp_function``; in 0.10, the
        ``HessianOperator`` that both methods use.
    """
    if not legacy:
        from pydvl.influence.torch.operator import HessianOperator

        return HessianOperator(model, loss_fn, loader).apply
    if inversion == "arnoldi":
        from pydvl.influence.torch.functional import get_hvp_function

        return get_hvp_function(model, loss_fn, loader, use_hessian_avg=True)
    from pydvl.influence.torch import TorchTwiceDifferentiable

    wrapped = TorchTwiceDifferentiable(model, loss_fn)
    total: torch.Tensor | float = 0.0
    count = 0
    for x, y in loader:
        total = total + wrapped.grad(x, y, create_graph=True) * len(x)
        count += len(x)
    mean_grad = total / count
    return lambda v: wrapped.mvp(mean_grad, v, wrapped.parameters)


def time_hvp(hvp: Callable[[torch.Tensor], torch.Tensor], size: int) -> float:
    """Median seconds of three calls of ``hvp`` (after one warm-up call).

    Parameters
    ----------
    hvp
        From :func:`pydvl_hvp`.
    size
        The number of parameters.

    Returns
    -------
    float
        Seconds per Hessian-vector product.
    """
    vector = torch.randn(size, generator=torch.Generator().manual_seed(SEED))
    hvp(vector)
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        hvp(vector)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def iteration_caps(
    max_seconds: float | None,
    legacy: bool,
    method: str,
    model: torch.nn.Module,
    data: Data,
) -> dict[str, Any]:
    """CG ``maxiter`` or ARPACK ``max_iter`` that fits in ``max_seconds``.

    Both pyDVL versions run CG on the test points one after the other, one
    HVP per iteration, so ``cg_maxiter = max_seconds / (n_test * t_hvp)``. An
    ARPACK restart costs up to ``ARNOLDI_KRYLOV`` HVPs, so
    ``arnoldi_max_iter = max_seconds / (ARNOLDI_KRYLOV * t_hvp)``. ``t_hvp``
    is timed on pyDVL's own HVP, outside the timed call.

    Parameters
    ----------
    max_seconds
        The time budget of the solve, or ``None`` for pyDVL's defaults.
    legacy
        Whether pyDVL has the 0.7 API.
    method
        One of :data:`METHODS`; only ``"cg"`` and ``"arnoldi"`` get a cap.
    model
        The model.
    data
        The workload's data.

    Returns
    -------
    dict
        ``hvp_s`` and ``cg_maxiter`` or ``arnoldi_max_iter``; empty when
        ``max_seconds`` is ``None`` or the method has no cap.
    """
    if max_seconds is None or method not in ("cg", "arnoldi"):
        return {}
    size = sum(p.numel() for p in model.parameters())
    hvp_s = time_hvp(pydvl_hvp(legacy, method, model, data.train_loader), size)
    if method == "cg":
        per_iteration = len(data.x_test) * hvp_s
        return {"hvp_s": hvp_s, "cg_maxiter": max(1, int(max_seconds / per_iteration))}
    per_restart = ARNOLDI_KRYLOV * hvp_s
    return {"hvp_s": hvp_s, "arnoldi_max_iter": max(1, int(max_seconds / per_restart))}


def plan(method: str, legacy: bool, caps: dict[str, Any]) -> Plan:
    """The options for ``method``, under this pyDVL version's argument names.

    Parameters
    ----------
    method
        One of :data:`METHODS`.
    legacy
        Whether pyDVL has the 0.7 API.
    caps
        Iteration caps from :func:`iteration_caps` (may be empty).

    Returns
    -------
    Plan
        The inversion method, influence mode and keyword options.
    """
    rank_name = "rank_estimate" if legacy else "rank"
    if method in ("direct", "direct-pert"):
        mode = "perturbation" if method == "direct-pert" else "up"
        return Plan("direct", mode, {})
    if method == "cg":
        options: dict[str, Any] = {"rtol": CG_RTOL}
        notes = []
        if "cg_maxiter" in caps:
            options["maxiter"] = caps["cg_maxiter"]
            notes.append(
                f"CG maxiter={caps['cg_maxiter']} from --max-seconds "
                f"(pyDVL's HVP over the training set ~{caps['hvp_s']:.3g} s)"
            )
        return Plan("cg", "up", options, notes)
    if method == "lissa":
        return Plan("lissa", "up", dict(LISSA))
    if method == "arnoldi":
        options = {rank_name: ARNOLDI_RANK}
        notes = []
        if "arnoldi_max_iter" in caps:
            options["max_iter"] = caps["arnoldi_max_iter"]
            notes.append(
                f"ARPACK max_iter={caps['arnoldi_max_iter']} from --max-seconds "
                f"(pyDVL's HVP over the training set ~{caps['hvp_s']:.3g} s)"
            )
        return Plan("arnoldi", "up", options, notes)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# --------------------------------------------------------------------------- #
# The timed calls
# --------------------------------------------------------------------------- #


def legacy_solver(inversion: str) -> Callable[..., Any]:
    """The registered solver of pyDVL 0.7 for ``inversion`` (for its defaults)."""
    from pydvl.influence.inversion import InversionMethod, InversionRegistry
    from pydvl.influence.torch import TorchTwiceDifferentiable

    return InversionRegistry.get(TorchTwiceDifferentiable, InversionMethod(inversion))


def modern_class(inversion: str) -> type:
    """The influence-function model class of pyDVL 0.10 for ``inversion``."""
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        LissaInfluence,
    )

    return {
        "direct": DirectInfluence,
        "cg": CgInfluence,
        "lissa": LissaInfluence,
        "arnoldi": ArnoldiInfluence,
    }[inversion]


def legacy_call(
    model: torch.nn.Module, data: Data, the_plan: Plan, regularization: float
) -> Callable[[], torch.Tensor]:
    """The timed call for pyDVL 0.7: ``compute_influences`` on the loaders.

    Parameters
    ----------
    model
        The trained model (eval mode).
    data
        Loaders of the training and test data.
    the_plan
        Inversion method, influence type and solver options.
    regularization
        ``hessian_regularization``: lambda added to the mean-loss Hessian.

    Returns
    -------
    Callable
        The timed call; it returns pyDVL's ``[n_test, n_train(, D)]`` tensor.
    """
    from pydvl.influence import InfluenceType, InversionMethod, compute_influences
    from pydvl.influence.torch import TorchTwiceDifferentiable

    def call() -> torch.Tensor:
        torch.manual_seed(SEED)
        return compute_influences(
            TorchTwiceDifferentiable(model, loss_fn),
            training_data=data.train_loader,
            test_data=data.test_loader,
            input_data=data.train_loader,
            inversion_method=InversionMethod(the_plan.inversion),
            influence_type=InfluenceType(the_plan.mode),
            hessian_regularization=regularization,
            **the_plan.options,
        )

    return call


def modern_call(
    model: torch.nn.Module, data: Data, the_plan: Plan, regularization: float
) -> Callable[[], torch.Tensor]:
    """The timed call for pyDVL 0.10: ``fit(train_loader)``, ``influences``.

    ``influences`` takes tensors: all test points against all training points
    in one call, as pyDVL's documentation does for data that fits in memory.

    Parameters
    ----------
    model
        The trained model (eval mode).
    data
        The training loader (for ``fit``) and the tensors.
    the_plan
        Influence-model class, influence mode and constructor options.
    regularization
        ``regularization``: lambda added to the mean-loss Hessian.

    Returns
    -------
    Callable
        The timed call; it returns pyDVL's ``[n_test, n_train(, D)]`` tensor.
    """
    from pydvl.influence import InfluenceMode

    cls = modern_class(the_plan.inversion)

    def call() -> torch.Tensor:
        torch.manual_seed(SEED)
        fitted = cls(
            model, loss_fn, regularization=regularization, **the_plan.options
        ).fit(data.train_loader)
        return fitted.influences(
            data.x_test,
            data.y_test,
            data.x_train,
            data.y_train,
            mode=InfluenceMode(the_plan.mode),
        )

    return call


def effective_options(legacy: bool, the_plan: Plan) -> dict[str, Any]:
    """The options passed, completed with pyDVL's defaults for the rest."""
    if legacy:
        target = legacy_solver(the_plan.inversion)
        skip = {"model", "training_data", "b", "hessian_perturbation"}
    else:
        target = modern_class(the_plan.inversion).__init__
        skip = {"self", "model", "loss", "regularization"}
    defaults = {
        name: param.default
        for name, param in inspect.signature(target).parameters.items()
        if name not in skip and param.default is not inspect.Parameter.empty
    }
    defaults = {name: _plain(value) for name, value in defaults.items()}
    return {**defaults, **the_plan.options}


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: enums by value, other objects by repr."""
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# --------------------------------------------------------------------------- #
# Running and recording
# --------------------------------------------------------------------------- #


class _Collector(logging.Handler):
    """Keeps pyDVL's log records of level WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def collect_messages(into: list[str]) -> Iterator[None]:
    """Gather Python warnings and pyDVL log warnings raised inside the block."""
    handler = _Collector()
    pydvl_logger = logging.getLogger("pydvl")
    pydvl_logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            pydvl_logger.removeHandler(handler)
            into.extend(handler.messages)
            into.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def summarize_messages(messages: list[str]) -> list[str]:
    """Unique messages, first lines only, at most ``MAX_NOTES``."""
    unique: list[str] = []
    for message in messages:
        line = " ".join(str(message).split())[:300]
        if line not in unique:
            unique.append(line)
    return unique[:MAX_NOTES]


def to_numpy(values: Any) -> np.ndarray:
    """The result of pyDVL as a numpy array, mapped to influx's sign."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return SIGN * np.asarray(values)


def dense_hessian_refusal(workload: Workload, the_plan: Plan) -> str | None:
    """Why a dense Hessian is not attempted, or ``None`` when it fits."""
    if the_plan.inversion != "direct":
        return None
    needed = 4 * workload.num_params**2
    if needed <= MAX_DENSE_HESSIAN_BYTES:
        return None
    return (
        f"skipped: a dense Hessian of {workload.num_params} parameters needs "
        f"{needed / 2**30:.1f} GiB (limit {MAX_DENSE_HESSIAN_BYTES / 2**30:.0f} GiB)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark one workload and method; write the result; return the meta.

    Parameters
    ----------
    args
        The parsed command line (see :func:`parse_args`).

    Returns
    -------
    dict
        The meta written to ``result.json`` (without the measurement).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    legacy = is_legacy_api()
    workload = load(args.workload)
    model = build_model(workload)
    data = build_data(workload)
    regularization = workload.spec.hessian_regularization
    caps = iteration_caps(args.max_seconds, legacy, args.method, model, data)
    the_plan = plan(args.method, legacy, caps)
    meta: dict[str, Any] = {
        "tool": "pydvl",
        "version": pydvl.__version__,
        "api": "compute_influences (0.7)" if legacy else "InfluenceFunctionModel",
        "workload": args.workload,
        "method": args.method,
        "options": effective_options(legacy, the_plan),
        "regularization": regularization,
        "influence_mode": the_plan.mode,
        "sign_applied": SIGN,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": workload.num_params,
        "max_seconds": args.max_seconds,
        "loadavg_before": os.getloadavg()[0],
        "notes": "; ".join(the_plan.notes),
    }
    refusal = dense_hessian_refusal(workload, the_plan)
    if refusal is not None:
        meta["error"] = refusal
        write_result(args.out, meta, None, None)
        return meta
    builder = legacy_call if legacy else modern_call
    call = builder(model, data, the_plan, regularization)
    measurement: Measurement | None = None
    result: np.ndarray | None = None
    messages: list[str] = []
    with collect_messages(messages):
        try:
            measurement, raw = measure(call, args.repeats)
            result = to_numpy(raw)
        except Exception as exc:  # reported in result.json, not raised
            meta["error"] = repr(exc)
    meta["pydvl_messages"] = summarize_messages(messages)
    if result is not None:
        meta["shape"] = list(result.shape)
        meta["nan"] = bool(not np.all(np.isfinite(result)))
    write_result(args.out, meta, measurement, result)
    return meta


# --------------------------------------------------------------------------- #
# S1 / S2 (issue 9): pyDVL 0.10's EK-FAC, Nystroem sketch and block CG
# --------------------------------------------------------------------------- #

#: Methods on the S workloads: class name and constructor options (pyDVL 0.10).
#: ``ekfac`` is EkfacInfluence with its diagonal refitted (EK-FAC; without it,
#: K-FAC); ``nystroem`` a rank-100 sketch of the Gauss-Newton matrix;
#: ``block-cg`` CG on the Gauss-Newton matrix with all test points in one
#: Krylov space (``solve_simultaneously``), pyDVL's default tolerances.
SCALE_METHODS = ("ekfac", "nystroem", "block-cg")
NYSTROEM_RANK = 100
#: Block CG's iteration cap on the S workloads (pyDVL's default, 10 x 10 test
#: points, would take hours at 1M parameters; issue 9 measured Pearson 0.999
#: with the reference after 10 iterations).
SCALE_CG_MAXITER = 30

#: Training points per chunk of ``influences_from_factors`` (memory bound).
SCALE_CHUNK = 250


def scale_influence_model(method: str, model: torch.nn.Module, lam: float) -> Any:
    """The unfitted pyDVL 0.10 influence model of ``method`` on an S workload."""
    from pydvl.influence.torch import (
        CgInfluence,
        EkfacInfluence,
        NystroemSketchInfluence,
    )
    from pydvl.influence.torch.util import SecondOrderMode

    ggn = SecondOrderMode.GAUSS_NEWTON
    if method == "ekfac":
        return EkfacInfluence(model, update_diagonal=True, hessian_regularization=lam)
    if method == "nystroem":
        return NystroemSketchInfluence(
            model,
            loss_fn,
            regularization=lam,
            rank=NYSTROEM_RANK,
            second_order_mode=ggn,
        )
    return CgInfluence(
        model,
        loss_fn,
        regularization=lam,
        solve_simultaneously=True,
        second_order_mode=ggn,
        maxiter=SCALE_CG_MAXITER,
        warn_on_max_iteration=True,
    )


def scale_run(args: argparse.Namespace) -> dict[str, Any]:
    """Fit and query timed apart on an S workload; write the result."""
    from _scale import load_scale
    from _scale import torch_module as scale_module

    torch.set_num_threads(args.threads or 1)
    workload = load_scale(args.workload)
    spec = workload.spec
    model = scale_module(workload, "float32")
    x_train = torch.from_numpy(workload.x_train)
    y_train = torch.from_numpy(workload.y_train)
    x_test = torch.from_numpy(workload.x_test)
    y_test = torch.from_numpy(workload.y_test)
    loader = DataLoader(
        TensorDataset(x_train, y_train), batch_size=spec.batch_size, shuffle=False
    )
    lam = spec.hessian_regularization
    meta: dict[str, Any] = {
        "tool": "pydvl",
        "version": pydvl.__version__,
        "workload": args.workload,
        "method": args.method,
        "regularization": lam,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": workload.num_params,
        "n_train": len(x_train),
        "loadavg_before": os.getloadavg()[0],
    }
    state: dict[str, Any] = {}

    def fit() -> None:
        torch.manual_seed(SEED)
        unfitted = scale_influence_model(args.method, model, lam)
        state["model"] = unfitted.fit(loader)

    def query() -> torch.Tensor:
        fitted = state["model"]
        factors = fitted.influence_factors(x_test, y_test)
        parts = [
            fitted.influences_from_factors(
                factors, x_train[i : i + SCALE_CHUNK], y_train[i : i + SCALE_CHUNK]
            )
            for i in range(0, len(x_train), SCALE_CHUNK)
        ]
        return torch.cat(parts, dim=1)

    messages: list[str] = []
    result = None
    with collect_messages(messages):
        try:
            fit_m, _ = measure(fit, args.repeats)
            query_m, raw = measure(query, args.repeats)
            result = to_numpy(raw).astype(np.float64)
            peaks = [m["peak_mib"] for m in (fit_m, query_m) if m["peak_mib"]]
            meta.update(
                fit=fit_m,
                query=query_m,
                fit_s=fit_m["median_s"],
                query_s=query_m["median_s"],
                fit_cpu_s=fit_m.get("median_cpu_s"),
                query_cpu_s=query_m.get("median_cpu_s"),
                peak_mib=max(peaks) if peaks else None,
                shape=list(result.shape),
                nan=bool(not np.all(np.isfinite(result))),
            )
        except Exception as exc:  # recorded, not raised
            meta["error"] = repr(exc)[:500]
    meta["pydvl_messages"] = summarize_messages(messages)
    write_result(args.out, meta, None, result)
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=("W1", "W2", "S1", "S2"))
    parser.add_argument("--method", required=True, choices=METHODS + SCALE_METHODS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="cap CG's maxiter and ARPACK's max_iter so that the solve "
        "should take about this long (estimated from one timed HVP)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print a one-line summary, exit 0."""
    args = parse_args(argv)
    if args.workload.startswith("S"):
        meta = scale_run(args)
        print(
            f"pydvl {meta['version']} {meta['workload']} {meta['method']}: "
            f"{meta.get('error') or (meta['fit_s'], meta['query_s'], meta['peak_mib'])}"
        )
        return 0
    meta = run(args)
    status = meta.get("error") or ("NaN" if meta.get("nan") else "ok")
    print(f"pydvl {meta['version']} {meta['workload']} {meta['method']}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
