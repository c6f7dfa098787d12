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
too (a :class:`~dask.distributed.LocalCluster` started by the job gets the
job's ``python_path`` and working directory on its path).

Everything is checked before any work and before any store is opened for
writing: unknown keys, the factory and what it returns, the backend, the
method and its options, stores of another job, the scheduler. Errors are
:class:`JobError` (an :class:`~influx.InputError`); the command line prints
them without a traceback and exits with status 2.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


@dataclass(frozen=True)
class StoreState:
    """What an output path holds before the run.

    Attributes
    ----------
    path
        The store's path.
    exists
        Whether something is at the path.
    chunks
        Chunks of the result (along the training points).
    done
        Chunks an earlier run of this job finished (0 for a new store or one
        that will be overwritten).
    replaced
        Whether the run deletes what is there (``overwrite``).
    problem
        Why the run cannot use the path (a store of another job, something
        that is not a store), or ``None``.
    """

    path: Path
    exists: bool
    chunks: int
    done: int
    replaced: bool = False
    problem: str | None = None

    def status(self) -> str:
        """One line: new, replaced, complete, partly done, or the problem."""
        if self.problem is not None:
            return f"ERROR: {self.problem}"
        if self.replaced:
            return "exists, replaced ([output] overwrite = true)"
        if not self.exists:
            return "new"
        if self.done == self.chunks:
            return f"complete ({self.done} of {self.chunks} chunks done)"
        return (
            f"{self.done} of {self.chunks} chunks done, "
            f"{self.chunks - self.done} to compute"
        )


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
        return _num_samples(self.test)

    def plan(self, workers: int | None = None) -> Plan:
        """The job's sizes, chunks and memory, without computing anything.

        Parameters
        ----------
        workers
            Workers of a connected cluster, when known.
        """
        return _plan(self, workers)


@dataclass(frozen=True)
class Plan:
    """What a job will do: sizes, chunks, stores and memory per worker.

    ``str(plan)`` is the report ``influx run --dry-run`` prints. Byte counts
    use the model's dtype.
    """

    job: Path
    backend: str
    factory: str
    num_params: int
    dtype: str
    method: str
    curvature: str
    hessian_regularization: float
    options: dict[str, Any]
    num_train: int
    num_test: int
    batch_size: int
    partition_size: int
    chunk_widths: list[int]
    cluster: str
    workers: int | None
    stores: list[tuple[str, StoreState, tuple[int, ...]]]
    top_k: int | None
    result_bytes: int
    memory: dict[str, int] = field(default_factory=dict)

    @property
    def memory_per_worker(self) -> int:
        """Estimated bytes a worker holds at once."""
        return sum(self.memory.values())

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        lines = [
            f"job          {self.job}",
            f"backend      {self.backend} (factory {self.factory})",
            f"model        P = {self.num_params:,} parameters, {self.dtype}",
            f"method       {self.method}, curvature {self.curvature}, lambda = "
            f"{self.hessian_regularization:g}" + (f", {options}" if options else ""),
            f"data         N_train = {self.num_train:,}, N_test = {self.num_test:,}, "
            f"batch {self.batch_size}",
            f"partitions   {len(self.chunk_widths)}: {_widths(self.chunk_widths)} "
            "points (one task and one store chunk each)",
            f"cluster      {self.cluster}",
        ]
        for name, state, shape in self.stores:
            lines.append(
                f"{name:<12} {state.path}  {list(shape)}  "
                f"{_bytes(math.prod(shape) * _itemsize(self.dtype))}  "
                f"{state.status()}"
            )
        if self.top_k is not None:
            lines.append(f"top_k        k = {self.top_k} per test point (from scores)")
        lines.append(f"result size  {_bytes(self.result_bytes)}")
        parts = ", ".join(f"{k} {_bytes(v)}" for k, v in self.memory.items())
        lines.append(
            f"memory       about {_bytes(self.memory_per_worker)} per worker ({parts})"
        )
        return "\n".join(lines)


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

    # the method and its options need no model: checked before the factory runs
    from influx.solvers import make_solver

    try:
        make_solver(influence["method"], **influence.get("options", {}))
    except (InputError, TypeError, ValueError) as error:
        raise where.error(f"[influence]: {error}") from None
    python_path = _python_path(config.get("python_path", []), where)
    built = _call_factory(
        config["factory"], config.get("factory_args", {}), python_path, where
    )
    model = _wrap(built, backend, config["factory"], where)
    train = _source(built["train"], "train", batch_size, partition_size, where)
    test = _test_data(built["test"], test_batch_size, where)
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


def _source(value: Any, name: str, batch_size: int, partition_size: Any, where: _Where):
    from influx.sources import ArraySource, Source

    if isinstance(value, Source):
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


def _test_data(value: Any, batch_size: int, where: _Where) -> Any:
    return _source(value, "test", batch_size, None, where)


def _num_samples(data: Any) -> int:
    return int(data.num_samples)


# -- the plan -------------------------------------------------------------------


def _itemsize(dtype: str) -> int:
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 4


def _dtype_name(model: Any) -> str:
    return str(model.dtype).rsplit(".", 1)[-1]


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def _widths(widths: list[int]) -> str:
    """``[4, 4, 2]`` as ``"2 x 4 + 1 x 2"``."""
    counts: dict[int, int] = {}
    for width in widths:
        counts[width] = counts.get(width, 0) + 1
    return " + ".join(f"{n} x {w}" for w, n in counts.items())


def _state_entries(job: Any, model: Any) -> int:
    """Entries of the method's fitted state (held by each worker that scores it)."""
    method = str(job.method).strip().lower()
    options = job.options
    num_params = int(model.num_params)
    if method == "direct":
        return num_params * num_params
    if method == "arnoldi":
        rank = int(options.get("rank_estimate", 10))
        return rank * (num_params + 1)
    if method in ("kfac", "ekfac", "block"):
        groups = _layer_shapes(job, model)
        if groups is None:
            return num_params
        total = 0
        for d_out, d_a, size in groups:
            if method == "block" or d_out is None:
                total += size * size
            else:
                total += d_out * d_out + d_a * d_a + d_out + d_a
                if method == "ekfac":
                    total += d_out * d_a
        return total
    return 0  # cg, lissa: Hessian-vector products, no stored matrix


def _layer_shapes(job: Any, model: Any) -> list[tuple[Any, Any, int]] | None:
    """``(d_out, d_a, size)`` of each layer (``None, None, size``: other groups)."""
    from influx.layers import has_layers, parameter_groups

    try:
        if has_layers(model) and hasattr(model, "find_layers"):
            x, _ = job.train[0]
            model.find_layers(model.backend.asarray(x, like=model.parameters))
        shapes: list[tuple[Any, Any, int]] = []
        layers = list(model.layers) if has_layers(model) else []
        for layer in layers:
            shapes.append((layer.d_out, layer.d_a, layer.num_params))
        named = {layer.name for layer in layers}
        for name, index in parameter_groups(model):
            if name not in named:
                shapes.append((None, None, int(index.size)))
        return shapes
    except Exception:
        return None


def _plan(job: Job, workers: int | None) -> Plan:
    from influx.attribution import Influence

    model = job.model
    influence: Influence = job.influence()
    dtype = _dtype_name(model)
    itemsize = _itemsize(dtype)
    num_params = int(model.num_params)
    num_train = int(job.train.num_samples)
    num_test = job.num_test
    widths = [p.num_samples for p in job.train.partitions]
    wanted = _fingerprints(job, influence)
    stores = [
        (
            "scores",
            _store_state(job, job.scores, wanted["scores"], len(widths)),
            (num_test, num_train),
        )
    ]
    if job.self_influence is not None:
        state = _store_state(job, job.self_influence, wanted["self"], len(widths))
        stores.append(("self", state, (num_train,)))
    result = sum(math.prod(shape) for _, _, shape in stores) * itemsize
    batch = int(job.train.batch_size)
    memory = {
        "model": num_params * itemsize,
        "factors": num_test * num_params * itemsize,
        "gradients": batch * num_params * itemsize,
        "block": num_test * max(widths) * itemsize,
        "state": _state_entries(job, model) * itemsize,
    }
    if job.scheduler is not None:
        cluster = f"scheduler {job.scheduler}" + (
            f", {workers} workers" if workers is not None else ""
        )
    elif job.local_workers is not None:
        cluster = (
            f"local cluster of {job.local_workers} worker processes "
            f"({job.threads_per_worker} thread{'s' * (job.threads_per_worker > 1)} "
            "each)"
        )
        workers = job.local_workers
    else:
        cluster = "this process"
    return Plan(
        job=job.path,
        backend=job.backend,
        factory=job.factory,
        num_params=num_params,
        dtype=dtype,
        method=influence.method,
        curvature=influence.curvature,
        hessian_regularization=job.hessian_regularization,
        options=job.options,
        num_train=num_train,
        num_test=num_test,
        batch_size=batch,
        partition_size=int(job.train.partition_size),
        chunk_widths=widths,
        cluster=cluster,
        workers=workers,
        stores=stores,
        top_k=job.top_k,
        result_bytes=result,
        memory=memory,
    )


def _fingerprints(job: Job, influence: Any) -> dict[str, dict[str, Any]]:
    """The fingerprints the job's stores will carry, known before the fit.

    The same as :meth:`influx.Influence.influences` and
    :meth:`~influx.Influence.self_influence` compute when they open a store,
    with the number of training points (``N``, known once fitted) filled in.
    """
    import warnings

    from influx._distributed_scoring import (
        _result_dtype,
        digest_test_data,
        fingerprint,
        plan_chunks,
    )

    model = influence.model
    chunks = plan_chunks(job.train, "input_data")
    dtype = _result_dtype(model)
    test = digest_test_data(model, job.test)
    up = {
        "query": "influences",
        "influence_type": "up",
        "by_layer": False,
        "measurement": None,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unseeded method: warned by the run
        found = {
            "scores": fingerprint(
                influence, up, chunks, (test[0], chunks.num_points), dtype, test
            ),
            "self": fingerprint(
                influence,
                {"query": "self_influence"},
                chunks,
                (chunks.num_points,),
                dtype,
                None,
            ),
        }
    for value in found.values():
        value["num_training_samples"] = int(job.train.num_samples)
    return found


def _store_state(
    job: Job, path: Path, wanted: dict[str, Any], chunks: int
) -> StoreState:
    """What ``path`` holds, and whether this job may use it.

    Mirrors the store's own checks, so that they fail here, before any work.
    """
    from influx._store import _differences, _is_zarr, _read, fingerprint_hash

    target = str(path)
    if not os.path.lexists(target):
        return StoreState(path, False, chunks, 0)
    group, header = _read(target)
    if header is None:
        if path.is_dir() and not any(path.iterdir()):
            return StoreState(path, False, chunks, 0)
        if job.overwrite and _is_zarr(target):
            return StoreState(path, True, chunks, 0, replaced=True)
        return StoreState(
            path,
            True,
            chunks,
            0,
            problem=f"{path} exists and is not an influx results store: influx "
            "never deletes it; move it, or name another path in [output].",
        )
    if job.overwrite:
        return StoreState(path, True, chunks, 0, replaced=True)
    if header.get("fingerprint_sha256") != fingerprint_hash(wanted):
        differences = "; ".join(_differences(header["fingerprint"], wanted))
        return StoreState(
            path,
            True,
            chunks,
            0,
            problem=f"{path} holds the results of another job ("
            + (differences or "its fingerprint differs")
            + "): set [output] overwrite = true to replace it, or name another "
            "path.",
        )
    done = int(np.count_nonzero(np.asarray(group["done"][:])))
    return StoreState(path, True, chunks, done)


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
            with _client(job) as client:
                workers = len(client.scheduler_info().get("workers", {}))
        plan = job.plan(workers)
        _check_stores(plan)
        return JobResult(plan=plan)
    plan = job.plan()
    _check_stores(plan)
    seconds: dict[str, float] = {}
    result = JobResult(plan=plan, seconds=seconds)
    with _client(job) as client:
        if client is not None:
            workers = len(client.scheduler_info().get("workers", {}))
            say(f"cluster: {client.scheduler.address}, {workers} workers")
        influence = job.influence(progress=progress)
        extra = {} if client is None else {"client": client}

        start = time.perf_counter()
        say(f"fit: {plan.method} on {plan.num_train} training points")
        influence.fit(job.train, **extra)
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

    if job.top_k is not None:
        start = time.perf_counter()
        target = job.top_k_path
        say(f"top-k: k = {job.top_k} from the scores -> {target}")
        values, indices = top_k_of_store(result.scores, job.top_k, progress=progress)
        np.savez(target, values=values, indices=indices)
        result.top_k = (values, indices)
        seconds["top_k"] = time.perf_counter() - start
        for row in range(min(3, values.shape[0])):
            say(f"  test point {row}: training points {indices[row].tolist()}")
    say("done: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return result


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


@contextlib.contextmanager
def _client(job: Job) -> Iterator[Any]:
    """The job's dask client (``None``: this process), closed on exit."""
    if job.scheduler is None and job.local_workers is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise JobError(
            f"{job.path}: [cluster] needs dask.distributed ({error}): pip install "
            '"influx[dask]".'
        ) from None
    if job.scheduler is not None:
        try:
            client = Client(job.scheduler, timeout=job.timeout)
        except (OSError, TimeoutError) as error:
            raise JobError(
                f"{job.path}: cannot reach the scheduler [cluster] scheduler = "
                f"{job.scheduler!r} within {job.timeout:g} s ({error}). Check the "
                "address and that the scheduler runs, or raise [cluster] timeout."
            ) from None
        with client:
            client.register_plugin(_path_plugin(job.python_path))
            yield client
        return
    # Local workers are spawned with this process's sys.path (an environment
    # PYTHONPATH would come too late); the plugin adds the job's folders, also
    # to workers that replace lost ones.
    env = {"JAX_ENABLE_X64": "1"} if job.backend == "jax" and _jax_x64() else {}
    with (
        LocalCluster(
            n_workers=job.local_workers,
            threads_per_worker=job.threads_per_worker,
            processes=True,
            dashboard_address=":0",  # any free port (None still tries 8787)
            worker_dashboard_address=None,
            silence_logs=40,
            env=env,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_path_plugin(job.python_path))
        yield client


def _path_plugin(folders: tuple[str, ...]) -> Any:
    """A worker plugin putting ``folders`` first on each worker's ``sys.path``.

    So that the workers import the factory's module (a custom model class or
    loss pickled by reference) as the client did.
    """
    from distributed import WorkerPlugin

    class ImportPath(WorkerPlugin):  # pickled by value (cloudpickle)
        name = "influx-job-python-path"

        def __init__(self, folders: list[str]) -> None:
            self.folders = folders

        def setup(self, worker: Any) -> None:
            import sys

            for folder in reversed(self.folders):
                if folder not in sys.path:
                    sys.path.insert(0, folder)

    return ImportPath(list(folders))


def _jax_x64() -> bool:
    jax = sys.modules.get("jax")
    return bool(jax is not None and jax.config.jax_enable_x64)
