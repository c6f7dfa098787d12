"""Jobs described by a TOML file: ``influx run job.toml``.

A job file names a factory function that builds the model and the data, the
backend, the method, the output stores and the cluster; ``influx run`` fits,
scores every training point against every test point into a resumable zarr
store, and optionally computes self-influence and the top ``k`` training
points of each test point. Swapping frameworks is the one key ``backend``
(and a factory written for the other framework).

The file::

    backend = "torch"                  # or "jax"
    factory = "examples.torch.factory:build"
    python_path = ["../.."]            # optional: folders (relative to this file)
                                       # to import the factory from

    [factory_args]                     # optional keyword arguments of the factory
    n_train = 2000

    [influence]
    method = "ekfac"                   # any method name
    hessian_regularization = 1e-3      # default 0
    curvature = "ggn"                  # optional
    options = { fisher = "empirical" } # the method's options, optional

    [data]                             # optional
    batch_size = 256                   # default 64
    partition_size = 4096              # points per task and per store chunk
    test_batch_size = 256              # default: batch_size

    [output]                           # paths relative to this file
    scores = "scores.zarr"             # the influences store [N_test, N_train]
    self_influence = "self.zarr"       # optional, [N_train]
    top_k = 10                         # optional, saved as scores.top_k.npz
    overwrite = false                  # replace stores of another job

    [cluster]                          # optional: without it, this process
    scheduler = "tcp://host:8786"      # a running dask scheduler, or
    local_workers = 2                  # a LocalCluster of that many processes
    threads_per_worker = 1             # for local_workers, default 1
    timeout = 10                       # seconds to connect to the scheduler

The factory contract: ``factory`` is ``"module:function"``, importable from
``python_path`` (folders relative to the job file), the working directory or
``PYTHONPATH``, and ``function(**factory_args)`` returns a mapping with

- ``"model"``: the framework's model (a ``torch.nn.Module``; for JAX an
  ``apply_fn(params, x)``, a flax or equinox module), or a model already
  wrapped by :func:`influx.twice_differentiable` (then ``loss`` and
  ``params`` are not given);
- ``"loss"``: ``loss(predictions, targets) -> scalar``, a batch mean;
- ``"params"``: for a JAX ``apply_fn``, its parameter pytree;
- ``"train"`` and ``"test"``: each a pair ``(x, y)`` of arrays (numpy, memmaps,
  zarr, dask or framework arrays; wrapped in :class:`influx.ArraySource` with
  the ``[data]`` settings) or an :class:`influx.Source` used as it is.

The factory runs once, on the client. Workers receive the wrapped model by
pickling, so a custom module class or loss function must be importable on them
too: the job puts its ``python_path`` folders and the working directory first
on every worker's ``sys.path`` (a worker plugin, so also on workers that
replace lost ones), which serves a local cluster, and a scheduler's workers
when they see the same file system.

Running a job again resumes it: the stores record which chunks are done, so
only the missing ones are computed. The fitted state is saved next to the
scores store (``scores.fit-<hash>.npz``, see :meth:`influx.Influence.save`;
the hash is the scores' fingerprint), and a rerun loads it instead of fitting
again (direct, arnoldi, block, kfac, ekfac; cg and lissa fit again). When
every chunk is done nothing runs, and only the top-k is read again from the
scores. The saved fit also serves later queries: ``influx.Influence.load(path,
model)``.

A store that holds another job's results (another model, method, lambda,
data) is refused unless ``overwrite = true``. Stores and the top-k file are
written by the client process and, for stores, by the workers: on a cluster
the paths must be on a file system they share.

Everything is checked before any work and before any store is opened for
writing: unknown keys, the factory and what it returns, the backend, the
method and its options, stores of another job, the scheduler. Errors are
:class:`JobError` (an :class:`~influx.InputError`); the command line prints
them without a traceback and exits with status 2.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from influx._job_cluster import connect
from influx._job_plan import (
    FIT_INFIX,
    REUSABLE_FITS,
    Plan,
    StoreState,
    fingerprints,
    fit_path,
    make_plan,
)
from influx.errors import InputError

__all__ = [
    "Job",
    "JobError",
    "JobResult",
    "Plan",
    "StoreState",
    "load_job",
    "run_job",
    "top_k_of_store",
]

#: Suffix of the top-k file written next to the scores store.
TOP_K_SUFFIX = ".top_k.npz"
#: Seconds to wait for a scheduler when the job file does not say.
DEFAULT_TIMEOUT = 10.0

_NUMBER = (int, float)

#: Allowed keys of each table: name -> (types, required).
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "": {
        "backend": ((str,), True),
        "factory": ((str,), True),
        "python_path": ((list,), False),
        "factory_args": ((dict,), False),
        "influence": ((dict,), True),
        "data": ((dict,), False),
        "output": ((dict,), True),
        "cluster": ((dict,), False),
    },
    "influence": {
        "method": ((str,), True),
        "hessian_regularization": (_NUMBER, False),
        "curvature": ((str,), False),
        "options": ((dict,), False),
    },
    "data": {
        "batch_size": ((int,), False),
        "partition_size": ((int,), False),
        "test_batch_size": ((int,), False),
    },
    "output": {
        "scores": ((str,), True),
        "self_influence": ((str,), False),
        "top_k": ((int,), False),
        "overwrite": ((bool,), False),
    },
    "cluster": {
        "scheduler": ((str,), False),
        "local_workers": ((int,), False),
        "threads_per_worker": ((int,), False),
        "timeout": (_NUMBER, False),
    },
}


class JobError(InputError):
    """A job file that cannot run; the message names the file and the key."""


# -- the parsed job -------------------------------------------------------------


@dataclass
class Job:
    """A checked job file with its model and data built.

    Built by :func:`load_job`; run by :func:`run_job`.

    Attributes
    ----------
    path
        The job file.
    config
        The parsed TOML.
    backend
        The backend's name.
    model
        The wrapped model (:func:`influx.twice_differentiable`).
    train, test
        The training data (an :class:`influx.Source`, partitioned) and the
        test data (batches, read on the client).
    method, hessian_regularization, curvature, options
        The :class:`influx.Influence` settings.
    scores, self_influence
        Output stores (``self_influence`` may be ``None``).
    top_k
        ``k`` of the top-k output, or ``None``.
    overwrite
        Whether stores of another job are replaced.
    scheduler, local_workers, threads_per_worker, timeout
        The cluster (both ``None``: this process).
    python_path
        Folders the factory was imported from (given to local workers).
    """

    path: Path
    config: dict[str, Any]
    backend: str
    factory: str
    model: Any
    train: Any
    test: Any
    method: str
    hessian_regularization: float
    curvature: str | None
    options: dict[str, Any]
    scores: Path
    self_influence: Path | None
    top_k: int | None
    overwrite: bool
    scheduler: str | None = None
    local_workers: int | None = None
    threads_per_worker: int = 1
    timeout: float = DEFAULT_TIMEOUT
    python_path: tuple[str, ...] = ()

    def influence(self, progress: bool = False) -> Any:
        """A new, unfitted :class:`influx.Influence` with the job's settings."""
        from influx.attribution import Influence

        return Influence(
            self.model,
            self.method,
            self.hessian_regularization,
            curvature=self.curvature,
            progress=progress,
            **self.options,
        )

    @property
    def top_k_path(self) -> Path | None:
        """Where the top-k result goes: next to the scores store."""
        if self.top_k is None:
            return None
        return self.scores.with_name(self.scores.stem + TOP_K_SUFFIX)

    @property
    def num_test(self) -> int:
        """``N_test``."""
        return int(self.test.num_samples)

    def plan(self, workers: int | None = None) -> Plan:
        """The job's sizes, chunks and memory, without computing anything.

        Parameters
        ----------
        workers
            Workers of a connected cluster, when known.
        """
        return make_plan(self, workers)


@dataclass
class JobResult:
    """What :func:`run_job` computed.

    Attributes
    ----------
    plan
        The plan the run followed.
    scores
        The zarr array ``[N_test, N_train]`` of influences (``None`` for a
        dry run).
    self_influence
        The zarr array ``[N_train]``, or ``None``.
    top_k
        ``(values, indices)``, each ``[N_test, k]``, or ``None``.
    seconds
        Wall time of each stage.
    """

    plan: Plan
    scores: Any = None
    self_influence: Any = None
    top_k: tuple[np.ndarray, np.ndarray] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


# -- loading --------------------------------------------------------------------


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and check a job file, and build its model and data.

    Calls the factory (once). Touches no store and starts no cluster.

    Parameters
    ----------
    path
        The TOML file.

    Returns
    -------
    Job
        The checked job.

    Raises
    ------
    JobError
        For anything that would make the run fail: the message names the file,
        the key and how to fix it.
    """
    file = Path(path)
    config = _read_toml(file)
    _check_schema(config, file)
    where = _Where(file)
    backend = _check_backend(config["backend"], where)
    influence = config["influence"]
    data = config.get("data", {})
    output = config["output"]
    cluster = config.get("cluster", {})
    batch_size = _positive(data.get("batch_size", 64), "[data] batch_size", where)
    partition_size = data.get("partition_size")
    if partition_size is not None:
        partition_size = _positive(partition_size, "[data] partition_size", where)
    test_batch_size = _positive(
        data.get("test_batch_size", batch_size), "[data] test_batch_size", where
    )
    top_k = output.get("top_k")
    if top_k is not None:
        top_k = _positive(top_k, "[output] top_k", where)
    regularization = influence.get("hessian_regularization", 0.0)
    if not math.isfinite(regularization) or regularization < 0:
        raise where.error(
            f"[influence] hessian_regularization must be a finite number >= 0, got "
            f"{regularization!r}."
        )
    scheduler, local_workers, threads, timeout = _check_cluster(cluster, where)
    scores = where.resolve(output["scores"])
    self_path = output.get("self_influence")
    self_store = where.resolve(self_path) if self_path is not None else None
    if self_store is not None and self_store == scores:
        raise where.error(
            "[output] self_influence and scores name the same store: give them "
            "different paths."
        )

    if partition_size is not None and partition_size % batch_size:
        raise where.error(
            f"[data] partition_size = {partition_size} must be a multiple of "
            f"batch_size = {batch_size} (partitions hold whole batches): use "
            f"{batch_size * max(1, partition_size // batch_size)}."
        )
    # the method, its options and the curvature's name need no model: checked
    # before the factory runs
    from influx.operators import CURVATURES
    from influx.solvers import make_solver

    try:
        make_solver(influence["method"], **influence.get("options", {}))
    except (InputError, TypeError, ValueError) as error:
        raise where.error(f"[influence]: {error}") from None
    curvature = influence.get("curvature")
    if curvature is not None and curvature.strip().lower() not in CURVATURES:
        raise where.error(
            f"[influence] curvature must be one of {', '.join(map(repr, CURVATURES))}"
            f", got {curvature!r}."
        )
    python_path = _python_path(config.get("python_path", []), where)
    built = _call_factory(
        config["factory"], config.get("factory_args", {}), python_path, where
    )
    model = _wrap(built, backend, config["factory"], where)
    train = _source(
        built["train"],
        "train",
        batch_size,
        partition_size,
        where,
        data,
        ("batch_size", "partition_size"),
    )
    test = _source(
        built["test"], "test", test_batch_size, None, where, data, ("test_batch_size",)
    )
    job = Job(
        path=file,
        config=config,
        backend=backend,
        factory=config["factory"],
        model=model,
        train=train,
        test=test,
        method=influence["method"],
        hessian_regularization=float(regularization),
        curvature=influence.get("curvature"),
        options=dict(influence.get("options", {})),
        scores=scores,
        self_influence=self_store,
        top_k=top_k,
        overwrite=bool(output.get("overwrite", False)),
        scheduler=scheduler,
        local_workers=local_workers,
        threads_per_worker=threads,
        timeout=timeout,
        python_path=python_path,
    )
    try:
        job.influence()
    except (InputError, TypeError, ValueError) as error:
        raise where.error(f"[influence]: {error}") from None
    if top_k is not None and top_k > train.num_samples:
        raise where.error(
            f"[output] top_k = {top_k} is larger than the {train.num_samples} "
            "training points: lower it."
        )
    return job


class _Where:
    """The job file, for messages and relative paths."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def error(self, message: str) -> JobError:
        return JobError(f"{self.file}: {message}")

    def resolve(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.file.parent / path


def _read_toml(file: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(file, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise JobError(f"{file}: no such job file.") from None
    except IsADirectoryError:
        raise JobError(f"{file} is a folder: pass a job file (.toml).") from None
    except tomllib.TOMLDecodeError as error:
        raise JobError(f"{file} is not valid TOML: {error}.") from None


def _check_schema(config: dict[str, Any], file: Path) -> None:
    """Unknown and missing keys, and the type of each value."""
    for table, keys in _SCHEMA.items():
        values = config if not table else config.get(table)
        if values is None:
            continue
        label = f"[{table}] " if table else ""
        for key, value in values.items():
            if key not in keys:
                hint = difflib.get_close_matches(key, list(keys), n=1)
                allowed = ", ".join(keys)
                raise JobError(
                    f"{file}: unknown key {label}{key!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f". Allowed keys{' in [' + table + ']' if table else ''}: "
                    f"{allowed}."
                )
            types, _ = keys[key]
            if isinstance(value, bool) and bool not in types:
                types = ()
            if not isinstance(value, types):
                kind = " or ".join(t.__name__ for t in keys[key][0])
                kind = {"dict": "a table", "list": "a list"}.get(kind, kind)
                raise JobError(
                    f"{file}: {label}{key} must be {kind}, got "
                    f"{type(value).__name__} {value!r}."
                )
        for key, (_, required) in keys.items():
            if required and key not in values:
                raise JobError(f"{file}: {label}{key} is missing; it is required.")


def _check_backend(name: str, where: _Where) -> str:
    from influx.backends import BackendNotInstalledError, get_backend

    try:
        backend = get_backend(name)
    except BackendNotInstalledError as error:
        raise where.error(f"backend = {name!r} is not installed: {error}") from None
    except ValueError as error:
        raise where.error(f"backend = {name!r}: {error}") from None
    return str(backend.name)


def _check_cluster(
    cluster: dict[str, Any], where: _Where
) -> tuple[str | None, int | None, int, float]:
    scheduler = cluster.get("scheduler")
    local_workers = cluster.get("local_workers")
    if scheduler is not None and local_workers is not None:
        raise where.error(
            "[cluster] has both scheduler and local_workers: keep one (a running "
            "scheduler, or a local cluster of that many worker processes)."
        )
    if local_workers is not None:
        local_workers = _positive(local_workers, "[cluster] local_workers", where)
    if scheduler is not None and not scheduler.strip():
        raise where.error("[cluster] scheduler is empty: give an address.")
    threads = _positive(
        cluster.get("threads_per_worker", 1), "[cluster] threads_per_worker", where
    )
    if "threads_per_worker" in cluster and local_workers is None:
        raise where.error(
            "[cluster] threads_per_worker applies to local_workers only: remove "
            "it, or set local_workers."
        )
    timeout = float(cluster.get("timeout", DEFAULT_TIMEOUT))
    if not timeout > 0:
        raise where.error(f"[cluster] timeout must be > 0 seconds, got {timeout}.")
    return scheduler, local_workers, threads, timeout


def _positive(value: Any, key: str, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise where.error(f"{key} must be a positive integer, got {value!r}.")
    return int(value)


def _python_path(entries: list[Any], where: _Where) -> tuple[str, ...]:
    paths = []
    for entry in entries:
        if not isinstance(entry, str):
            raise where.error(
                f"python_path must be a list of folders, got {entry!r} in it."
            )
        folder = where.resolve(entry).resolve()
        if not folder.is_dir():
            raise where.error(
                f"python_path entry {entry!r} is not a folder ({folder}): paths are "
                "relative to the job file."
            )
        paths.append(str(folder))
    paths.append(os.getcwd())
    return tuple(dict.fromkeys(paths))


@contextlib.contextmanager
def _on_path(folders: tuple[str, ...]) -> Iterator[None]:
    """``folders`` at the front of ``sys.path`` for the block, then restored."""
    saved = list(sys.path)
    sys.path[:0] = [f for f in folders if f not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


_KEYS = ("model", "loss", "params", "train", "test")


def _call_factory(
    spec: str, kwargs: dict[str, Any], python_path: tuple[str, ...], where: _Where
) -> dict[str, Any]:
    from influx.sources import resolve_factory

    with _on_path(python_path):
        try:
            function = resolve_factory(spec, "factory")
        except InputError as error:
            raise where.error(
                f"{error} Folders searched first: {', '.join(python_path)} (set "
                "python_path in the job file, relative to it)."
            ) from None
        try:
            built = function(**kwargs)
        except TypeError as error:
            if kwargs:
                raise where.error(
                    f"factory {spec!r} does not take the [factory_args] "
                    f"{sorted(kwargs)}: {error}"
                ) from error
            raise
    if not isinstance(built, Mapping):
        raise where.error(
            f"factory {spec!r} must return a mapping with the keys 'model', 'loss', "
            f"'train', 'test' (and 'params' for JAX), got {type(built).__name__}."
        )
    unknown = sorted(set(built) - set(_KEYS))
    if unknown:
        raise where.error(
            f"factory {spec!r} returned unknown keys {unknown}; allowed: "
            f"{', '.join(_KEYS)}."
        )
    missing = [key for key in ("model", "train", "test") if key not in built]
    if missing:
        raise where.error(
            f"factory {spec!r} returned no {', '.join(map(repr, missing))}: return "
            "a mapping with 'model', 'loss', 'train', 'test' (and 'params' for JAX)."
        )
    return dict(built)


def _wrap(built: dict[str, Any], backend: str, spec: str, where: _Where) -> Any:
    """The factory's model wrapped for ``backend`` (or checked, if wrapped)."""
    from influx.models import twice_differentiable
    from influx.protocols import TwiceDifferentiable

    model = built["model"]
    if isinstance(model, TwiceDifferentiable):
        extra = [key for key in ("loss", "params") if built.get(key) is not None]
        if extra:
            raise where.error(
                f"factory {spec!r} returned a wrapped model together with "
                f"{' and '.join(extra)}: the wrapper has them already; return "
                "the bare model, or drop them."
            )
        own = model.backend.name
        if own != backend:
            raise where.error(
                f"backend = {backend!r}, but the factory {spec!r} returned a model "
                f"wrapped for the {own} backend: set backend = {own!r}, or return "
                f"a {backend} model."
            )
        return model
    if "loss" not in built:
        raise where.error(
            f"factory {spec!r} returned no 'loss': return loss(predictions, "
            "targets) -> scalar (a batch mean) with the model."
        )
    try:
        return twice_differentiable(
            model, built["loss"], params=built.get("params"), backend=backend
        )
    except (TypeError, InputError, ValueError) as error:
        raise where.error(
            f"backend = {backend!r}: the model from factory {spec!r} cannot be "
            f"wrapped: {error}"
        ) from None


def _source(
    value: Any,
    name: str,
    batch_size: int,
    partition_size: Any,
    where: _Where,
    data: dict[str, Any],
    keys: tuple[str, ...],
) -> Any:
    """The factory's ``name`` data as a Source (arrays: an ArraySource)."""
    from influx.sources import ArraySource, Source

    if isinstance(value, Source):
        given = [key for key in keys if key in data]
        if given:
            raise where.error(
                f"the factory's {name!r} is an influx Source, which has its own "
                f"batch and partition sizes ({value!r}), but [data] sets "
                f"{', '.join(given)} for it: remove them from [data], or return "
                "arrays (x, y) from the factory."
            )
        return value
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise where.error(
            f"the factory's {name!r} must be a pair (x, y) of arrays or an "
            f"influx Source, got {type(value).__name__}."
        )
    try:
        return ArraySource(
            value[0], value[1], batch_size=batch_size, partition_size=partition_size
        )
    except (InputError, TypeError) as error:
        raise where.error(f"the factory's {name!r} data: {error}") from None


# -- running --------------------------------------------------------------------


def run_job(job: Job, *, dry_run: bool = False, progress: bool = True) -> JobResult:
    """Run a job: fit, score into the store, then self-influence and top-k.

    Parameters
    ----------
    job
        From :func:`load_job`.
    dry_run
        Only check the stores and the cluster and return the plan (a
        scheduler is connected to, to count its workers; no local cluster is
        started).
    progress
        Print each stage and show progress bars.

    Returns
    -------
    JobResult
        The plan and the results (zarr arrays; top-k as numpy arrays).

    Raises
    ------
    JobError
        Before any work: a store of another job (without ``overwrite``), a
        scheduler that cannot be reached.
    """
    say = _printer(progress)
    if dry_run:
        workers = None
        if job.scheduler is not None:
            with connect(job) as client:
                workers = len(client.scheduler_info().get("workers", {}))
        plan = job.plan(workers)
        _check_stores(plan)
        return JobResult(plan=plan)
    plan = job.plan()
    _check_stores(plan)
    seconds: dict[str, float] = {}
    result = JobResult(plan=plan, seconds=seconds)
    if all(state.complete for _, state, _ in plan.stores):
        # nothing to compute: no cluster, no fit
        from influx._store import open_results

        say("every chunk of every store is done: nothing to compute")
        result.scores = open_results(job.scores).scores
        if job.self_influence is not None:
            result.self_influence = open_results(job.self_influence).scores
    else:
        _compute(job, plan, result, say, progress)
    if job.top_k is not None:
        start = time.perf_counter()
        target = job.top_k_path
        say(f"top-k: k = {job.top_k} from the scores -> {target}")
        values, indices = top_k_of_store(result.scores, job.top_k, progress=progress)
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as handle:
            np.savez(handle, values=values, indices=indices)
        os.replace(partial, target)
        result.top_k = (values, indices)
        seconds["top_k"] = time.perf_counter() - start
        for row in range(min(3, values.shape[0])):
            say(f"  test point {row}: training points {indices[row].tolist()}")
    say("done: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return result


def _compute(job: Job, plan: Plan, result: JobResult, say: Any, progress: bool):
    """Fit, then fill the stores (their missing chunks), on the job's cluster."""
    seconds = result.seconds
    with connect(job) as client:
        if client is not None:
            workers = len(client.scheduler_info().get("workers", {}))
            say(f"cluster: {client.scheduler.address}, {workers} workers")
        extra = {} if client is None else {"client": client}
        start = time.perf_counter()
        influence = _fitted(job, plan, extra, say, progress)
        seconds["fit"] = time.perf_counter() - start

        start = time.perf_counter()
        say(f"influences: [{plan.num_test}, {plan.num_train}] -> {job.scores}")
        result.scores = influence.influences(
            job.test, job.train, out=str(job.scores), overwrite=job.overwrite, **extra
        )
        seconds["influences"] = time.perf_counter() - start

        if job.self_influence is not None:
            start = time.perf_counter()
            say(f"self-influence: [{plan.num_train}] -> {job.self_influence}")
            result.self_influence = influence.self_influence(
                job.train,
                out=str(job.self_influence),
                overwrite=job.overwrite,
                **extra,
            )
            seconds["self_influence"] = time.perf_counter() - start


def _fitted(
    job: Job, plan: Plan, extra: dict[str, Any], say: Any, progress: bool
) -> Any:
    """The job's fitted Influence: loaded from an earlier run's file, or fitted.

    A new fit is saved (written to a temporary file, then renamed: a killed
    run leaves no partial file) and replaces older fits of the scores store.
    """
    from influx.attribution import Influence

    influence = job.influence(progress=progress)
    path = fit_path(job, fingerprints(job, influence)["scores"])
    stem = job.scores.stem + FIT_INFIX
    if influence.method in REUSABLE_FITS and path.exists() and not job.overwrite:
        say(f"fit: loading {path.name}, saved by an earlier run of this job")
        return Influence.load(path, job.model, job.train, progress=progress)
    say(f"fit: {plan.method} on {plan.num_train} training points")
    influence.fit(job.train, **extra)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        influence.save(handle)
    os.replace(partial, path)
    for old in job.scores.parent.glob(f"{glob.escape(stem)}*.npz"):
        if old != path:
            old.unlink()
    return influence


def _check_stores(plan: Plan) -> None:
    """Raise (with the plan attached) if a store cannot be used."""
    problems = [state.problem for _, state, _ in plan.stores if state.problem]
    if problems:
        error = JobError(f"{plan.job}: [output] " + " ".join(problems))
        error.plan = plan  # type: ignore[attr-defined]
        raise error


def top_k_of_store(
    scores: Any, k: int, *, largest: bool = True, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``scores``, read chunk by chunk.

    Parameters
    ----------
    scores
        ``[N_test, N]`` array (a zarr array: read one chunk of columns at a
        time).
    k
        Entries per row, ``k <= N``.
    largest
        Largest (default) or most negative.

    Returns
    -------
    values, indices
        ``[N_test, k]`` each, sorted; ties go to the smaller index (as
        :meth:`influx.Influence.top_k`).
    """
    from influx._progress import progress_iter
    from influx.attribution import _RunningTopK

    best = _RunningTopK(k, largest)
    width = int(getattr(scores, "chunks", scores.shape)[1]) or int(scores.shape[1])
    starts = range(0, int(scores.shape[1]), width)
    for start in progress_iter(starts, progress, "Top-k", total=len(starts)):
        best.add(np.asarray(scores[:, start : start + width]))
    return best.result()


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"influx run: {message}", file=sys.stderr, flush=True)

    return say
