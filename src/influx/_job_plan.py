"""The plan of an ``influx run`` job: sizes, chunks, stores, memory per worker.

:func:`make_plan` computes it without computing any influence: the number of
parameters and points, the partitions (one task and one store chunk each), what
each output path holds (chunks done by an earlier run of the same job, or a
store of another job, found with the fingerprints the queries will write), the
result's size and the memory a worker holds at once. ``str(plan)`` is what
``influx run --dry-run`` prints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from influx.job import Job

__all__ = ["Plan", "StoreState", "fingerprints", "fit_path", "make_plan"]

#: The fitted state is saved next to the scores store as
#: ``<stem>.fit-<first 12 hex digits of the scores' fingerprint>.npz``.
FIT_INFIX = ".fit-"
#: Methods whose saved fit is reused by a rerun: their queries need no pass
#: over the training data (cg and lissa fit little and multiply by the
#: Hessian in every query, so a rerun fits them again, on the cluster).
REUSABLE_FITS = ("direct", "arnoldi", "block", "kfac", "ekfac")


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

    @property
    def complete(self) -> bool:
        """Whether a run of this job finished every chunk already."""
        return (
            self.exists
            and not self.replaced
            and self.problem is None
            and self.done == self.chunks
        )

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
    fit: str = ""

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
        if self.fit:
            lines.append(f"fit          {self.fit}")
        lines.append(f"result size  {_bytes(self.result_bytes)}")
        lines.append(
            f"memory       about {_bytes(self.memory_per_worker)} per worker, of which"
        )
        shapes = {
            "model": "[P]",
            "factors": "[N_test, P]",
            "gradients": "[batch, P], one batch at a time",
            "block": "[N_test, partition], one chunk of scores",
            "state": f"the fitted {self.method} state",
        }
        for key, value in self.memory.items():
            lines.append(f"  {key:<10} {_bytes(value):>10}  {shapes.get(key, '')}")
        return "\n".join(lines)


# -- sizes ----------------------------------------------------------------------


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


def make_plan(job: Job, workers: int | None) -> Plan:
    """The plan of ``job`` (:meth:`influx.job.Job.plan`)."""
    from influx.attribution import Influence

    model = job.model
    influence: Influence = job.influence()
    dtype = _dtype_name(model)
    itemsize = _itemsize(dtype)
    num_params = int(model.num_params)
    num_train = int(job.train.num_samples)
    num_test = job.num_test
    widths = [p.num_samples for p in job.train.partitions]
    wanted = fingerprints(job, influence)
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
        fit=_fit_plan(job, influence, wanted["scores"], stores),
    )


def fit_path(job: Job, wanted: dict[str, Any]) -> Path:
    """Where the fit of the job with scores fingerprint ``wanted`` is saved."""
    from influx._store import fingerprint_hash

    digest = fingerprint_hash(wanted)[:12]
    return job.scores.with_name(f"{job.scores.stem}{FIT_INFIX}{digest}.npz")


def _fit_plan(job: Job, influence: Any, wanted: dict[str, Any], stores: Any) -> str:
    """What the run does for the fit, in words."""
    if all(state.complete for _, state, _ in stores):
        return "none: every chunk is done"
    path = fit_path(job, wanted)
    if influence.method in REUSABLE_FITS and path.exists() and not job.overwrite:
        return f"loaded from {path} (an earlier run's)"
    return f"{influence.method} on the training data, saved to {path}"


def fingerprints(job: Job, influence: Any) -> dict[str, dict[str, Any]]:
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
