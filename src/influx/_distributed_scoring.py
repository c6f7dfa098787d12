"""Scoring split in chunks: on dask workers, into a resumable store, or both.

:class:`influx.Influence`'s queries take ``client=`` (a
``dask.distributed.Client``) and ``out="path.zarr"``. Either way the input
points are cut in *chunks* of consecutive whole batches: a
:class:`~influx.sources.Source`'s partitions, or (single process only) groups
of the batches of any other re-iterable input. One task per chunk:

1. the test factors are computed once, here (the test data is read here),
   and sent to each worker once with the job (``Executor.broadcast``); so is
   the wrapped model, pickled here once per Influence and client
   (:class:`ModelBytes`) and unpickled once per worker;
2. a task scores its chunk with the same loop as the single-process call
   (:func:`influx._scoring.score`, :func:`~influx._scoring.up_blocks`, or
   :meth:`Influence.self_influence` on an Influence rebuilt on the worker from
   :meth:`Influence.save`'s bytes), so the numbers are the same;
3. with a store, the task writes its block, then marks the chunk done
   (:class:`influx._store.ChunkWriter`), and first checks whether the chunk
   is done already (a task rerun by dask after its worker died writes
   nothing twice). Without a store the blocks come back and are joined here.

Each worker keeps one prepared job (the guarded model, the native factors,
the rebuilt Influence) per query, the last few queries' (:data:`KEPT_JOBS`).
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from influx._executor import Executor, LocalExecutor, executor_for
from influx._output import check_out, check_out_shape, count_points
from influx._progress import progress_iter
from influx._scoring import score, up_blocks
from influx._store import ChunkWriter, ResultStore, is_store_path
from influx.data import DataReader, ordered_loader
from influx.errors import InputError
from influx.methods import InfluenceType
from influx.sources import DEFAULT_PARTITION_POINTS, Partition, Source

if TYPE_CHECKING:
    from influx.attribution import Influence

__all__ = [
    "KEPT_JOBS",
    "distributed_influences",
    "distributed_self_influence",
    "distributed_top_k",
]

#: Prepared jobs (model, factors, fitted state) kept per process.
KEPT_JOBS = 4


def require_source(data: Any, name: str, client: Any) -> None:
    """With a client, ``data`` must be a Source that workers read themselves."""
    if client is not None and not isinstance(data, Source):
        raise InputError(
            f"With client=..., {name} must be a data source that the workers read "
            f"themselves, got {type(data).__name__}: wrap arrays in "
            "influx.ArraySource(x, y, batch_size=...) (memory-mapped .npy files, "
            "zarr or dask arrays) or influx.FactorySource('module:function', ...). "
            "Test data may stay any re-iterable: it is read here."
        )


# -- chunks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Chunk ``number``: points ``[start, stop)`` of non-source data, its batches."""

    number: int
    start: int
    stop: int
    batches: list[Any] = field(repr=False)


@dataclass(frozen=True)
class Plan:
    """How the input points split in chunks."""

    num_points: int
    chunk_size: int
    num_chunks: int
    item_shape: tuple[int, ...]
    batch_size: int
    source: bool

    def chunks(self, data: Any, name: str) -> Iterator[Any]:
        """The chunks in order: partitions, or groups of batches read here."""
        if isinstance(data, Source):
            yield from data.partitions
            return
        per_group = self.chunk_size // self.batch_size
        loader = ordered_loader(data, name, True)[0]
        batches: list[Any] = []
        start = 0
        for batch in loader:
            batches.append(batch)
            if len(batches) == per_group:
                yield self._group(len_of_batches(batches), start, batches, name)
                start += self.chunk_size
                batches = []
        if batches:
            yield self._group(len_of_batches(batches), start, batches, name)

    def _group(self, size: int, start: int, batches: list[Any], name: str) -> Group:
        number = start // self.chunk_size
        last = number == self.num_chunks - 1
        expected = self.num_points - start if last else self.chunk_size
        if size != expected or number >= self.num_chunks:
            raise InputError(
                f"{name} changed size or its batches differ in size: chunk {number} "
                f"holds {size} points where {expected} were expected (batches of "
                f"{self.batch_size}, the last one shorter). Stored results need "
                "batches of one size: use influx.batches(x, y, batch_size=...) or "
                "influx.ArraySource."
            )
        return Group(number, start, start + size, batches)


def len_of_batches(batches: list[Any]) -> int:
    return sum(int(_leading(batch[0])) for batch in batches)


def _leading(x: Any) -> int:
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return int(x.shape[0])


def plan_chunks(data: Any, name: str) -> Plan:
    """The chunks of ``data``: a Source's partitions, else groups of its batches."""
    if isinstance(data, Source):
        return Plan(
            data.num_samples,
            data.partition_size,
            data.num_partitions,
            tuple(data.item_shape),
            data.batch_size,
            True,
        )
    counted = count_points(data)
    first = None
    try:
        first = next(iter(ordered_loader(data, name, True)[0]))
    except (StopIteration, TypeError, InputError):
        first = None
    if counted is None or first is None:
        raise InputError(
            f"{name} cannot be split in chunks for out='path.zarr': its points "
            "could not be counted. Pass influx.batches(x, y, batch_size=...) or an "
            "influx.ArraySource."
        )
    points, item_shape = counted
    batch_size = max(1, _leading(first[0]))
    per_group = max(1, math.ceil(DEFAULT_PARTITION_POINTS / batch_size))
    size = per_group * batch_size
    return Plan(points, size, math.ceil(points / size), item_shape, batch_size, False)


def chunk_data(chunk: Any) -> Any:
    """The batches of a chunk (a Partition is a sequence of them)."""
    return chunk if isinstance(chunk, Partition) else chunk.batches


# -- the job a task runs ------------------------------------------------------------


@dataclass
class Job:
    """What every task of one query needs; sent to each worker once.

    ``factors`` are host numpy arrays when sent to workers (native in this
    process); ``saved`` the bytes of :meth:`Influence.save` for the
    self-influence on workers (``influence`` in this process).
    """

    token: str
    mode: str  # "influences", "top_k" or "self_influence"
    name: str
    kind: InfluenceType = InfluenceType.Up
    by_layer: bool = False
    factors: Any = None
    writer: ChunkWriter | None = None
    k: int = 0
    largest: bool = True
    saved: bytes | None = None
    training: Any = None
    influence: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["influence"] = None  # never sent: workers rebuild it from saved
        return state


@dataclass
class Prepared:
    model: Any
    factors: Any = None
    influence: Any = None


_PREPARED: collections.OrderedDict[str, Prepared] = collections.OrderedDict()
_PREPARED_LOCK = threading.Lock()


def _prepared(job: Job, model: Any) -> Prepared:
    """The prepared job in this process: guarded model, native factors, state."""
    with _PREPARED_LOCK:
        found = _PREPARED.get(job.token)
        if found is not None:
            _PREPARED.move_to_end(job.token)
            return found
    from influx.attribution import Influence, _guard

    if job.influence is not None:  # this process: the query's own Influence
        found = Prepared(job.influence._guarded, influence=job.influence)
    elif job.mode == "self_influence":
        assert job.saved is not None
        influence = Influence.load(io.BytesIO(job.saved), model, job.training)
        found = Prepared(influence._guarded, influence=influence)
    else:
        found = Prepared(_guard(model))
    if job.factors is not None:
        backend = found.model.backend
        factors = job.factors
        if not backend.is_native_array(factors):
            factors = backend.asarray(factors, like=found.model.parameters)
        found.factors = factors
    with _PREPARED_LOCK:
        _PREPARED[job.token] = found
        while len(_PREPARED) > KEPT_JOBS:
            _PREPARED.popitem(last=False)
    return found


def _release(token: str) -> None:
    with _PREPARED_LOCK:
        _PREPARED.pop(token, None)


def run_chunk(chunk: Any, job: Job, model: Any) -> tuple[int, Any]:
    """One task: ``(chunk number, host result or None once stored)``.

    ``model``: the wrapped model, or its :class:`ModelBytes` on a worker.

    A chunk already marked done in the store is skipped (a rerun task).
    """
    writer = job.writer
    if writer is not None and writer.is_done(chunk.number):
        return chunk.number, None
    prepared = _prepared(job, worker_model(model))
    result = compute_chunk(job, prepared, chunk)
    if writer is not None:
        writer.write(chunk.number, result)
        return chunk.number, None
    return chunk.number, result


def compute_chunk(job: Job, prepared: Prepared, chunk: Any) -> Any:
    """The host result of one chunk (the loops of the single-process queries)."""
    data = chunk_data(chunk)
    model = prepared.model
    backend = model.backend
    if job.mode == "influences":
        block = score(
            job.kind,
            model,
            data,
            prepared.factors,
            False,
            job.name,
            by_layer=job.by_layer,
        )
        return np.asarray(backend.to_numpy(block))
    if job.mode == "self_influence":
        values = prepared.influence.self_influence(data)
        return np.asarray(backend.to_numpy(values))
    from influx.attribution import _RunningTopK, _to_host

    reader = DataReader(data, job.name, backend, model.parameters, ordered=True)
    best = _RunningTopK(job.k, job.largest)
    best.seen = int(chunk.start)  # indices into the whole input
    for block in up_blocks(model, reader, prepared.factors, False, "Top-k"):
        best.add(_to_host(block))
    return best.result()


@dataclass(frozen=True)
class ModelBytes:
    """The wrapped model as the workers hold it: pickled once, here.

    dask copies data between workers whenever it likes (a worker that joined
    late fetches it from a peer); bytes are safe to copy, whereas a live
    model could be pickled by a worker while one of its tasks is inside a
    framework transform of it (torch swaps the module's tensors). Each
    process unpickles the bytes once (:func:`worker_model`).
    """

    token: str
    payload: bytes = field(repr=False)


_MODELS: collections.OrderedDict[str, Any] = collections.OrderedDict()


def worker_model(model: Any) -> Any:
    """The model a task calls: ``model`` itself, or :class:`ModelBytes` unpickled.

    One unpickled copy per process and model (the last :data:`KEPT_JOBS`),
    so that every query of an Influence reuses it and what it compiled.
    """
    if not isinstance(model, ModelBytes):
        return model
    with _PREPARED_LOCK:
        found = _MODELS.get(model.token)
        if found is None:
            import cloudpickle

            found = cloudpickle.loads(model.payload)
            _MODELS[model.token] = found
            while len(_MODELS) > KEPT_JOBS:
                _MODELS.popitem(last=False)
        else:
            _MODELS.move_to_end(model.token)
        return found


def _model_handle(inf: Influence, executor: Executor) -> Any:
    """The wrapped model on the workers, sent once per Influence and cluster.

    Every query of an Influence on the same client reuses the workers' copy
    (and so the functions compiled there); sent again only if it was lost.
    """
    client = getattr(executor, "client", None)
    key = getattr(client, "id", id(client))
    with inf._lock:
        handles = inf.__dict__.setdefault("_worker_models", {})
        handle = handles.get(key)
        if handle is None or getattr(handle, "status", "finished") != "finished":
            import cloudpickle

            payload = cloudpickle.dumps(inf.model)
            handle = executor.broadcast(ModelBytes(uuid.uuid4().hex, payload))
            handles[key] = handle
        return handle


def _token(inf: Influence, what: str) -> str:
    """A name of ``inf``'s ``what`` that stays the same across its queries."""
    with inf._lock:
        own = inf.__dict__.setdefault("_worker_token", uuid.uuid4().hex)
    return f"{own}-{what}"


def _run_all(
    executor: Executor,
    plan: Plan,
    data: Any,
    name: str,
    job: Job,
    inf: Influence,
    skip: set[int],
    progress: bool,
    desc: str,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(chunk number, result)`` of every chunk not in ``skip``."""
    if isinstance(executor, LocalExecutor):
        chunks = (c for c in plan.chunks(data, name) if c.number not in skip)
        total = plan.num_chunks - len(skip)
        try:
            for chunk in progress_iter(chunks, progress, desc, total=total):
                yield run_chunk(chunk, job, inf.model)
        finally:
            _release(job.token)
        return
    todo = [p for p in plan.chunks(data, name) if p.number not in skip]
    if not todo:
        return
    job_handle = executor.broadcast(job)
    model_handle = _model_handle(inf, executor)
    for _, result in executor.map(
        run_chunk, todo, job_handle, model_handle, progress=progress, desc=desc
    ):
        yield result


# -- fingerprints -------------------------------------------------------------------


def digest_test_data(model: Any, test_data: Any) -> tuple[int, str]:
    """``(N_test, SHA-256 of the test batches' host bytes)``, read once here."""
    backend = model.backend
    reader = DataReader(test_data, "test_data", backend, model.parameters, ordered=True)
    digest = hashlib.sha256()
    count = 0
    for _, x, y in reader:
        count += _leading(x)
        _feed(digest, backend, x)
        _feed(digest, backend, y)
    return count, digest.hexdigest()


def _feed(digest: Any, backend: Any, value: Any) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode())
            _feed(digest, backend, value[key])
        return
    if isinstance(value, list | tuple):
        for item in value:
            _feed(digest, backend, item)
        return
    host = np.ascontiguousarray(backend.to_numpy(value))
    digest.update(f"{host.dtype.str}{host.shape}".encode())
    digest.update(host.tobytes())


def fingerprint(
    inf: Influence,
    query: dict[str, Any],
    plan: Plan,
    shape: tuple[int, ...],
    dtype: np.dtype,
    test: tuple[int, str] | None,
) -> dict[str, Any]:
    """What a stored result depends on (compared when a store is reopened)."""
    from influx.attribution import _encode_options, _model_facts

    facts = _model_facts(inf.model)
    facts.pop("framework_version", None)
    options, arrays = _encode_options(inf.solver)
    for key, value in arrays.items():
        options[key] = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    _warn_unseeded(inf.solver, options)
    found: dict[str, Any] = {
        **facts,
        "method": inf.method,
        "options": options,
        "hessian_regularization": inf.hessian_regularization,
        "curvature": inf.curvature,
        "num_training_samples": inf.num_training_samples,
        **query,
        "input": {
            "num_points": plan.num_points,
            "chunk_size": plan.chunk_size,
            "batch_size": plan.batch_size,
            "source": plan.source,
        },
        "shape": list(shape),
        "result_dtype": str(dtype),
    }
    if test is not None:
        found["test"] = {"num_points": test[0], "sha256": test[1]}
    return found


def _warn_unseeded(solver: Any, options: dict[str, Any]) -> None:
    """Warn when the method draws random numbers without a fixed seed."""
    random = {"lissa", "arnoldi"}
    unseeded = []
    if solver.name in random and options.get("seed", 0) is None:
        unseeded.append("seed")
    if solver.name in ("kfac", "ekfac") and options.get("fisher") == "mc":
        if options.get("seed", 0) is None:
            unseeded.append("seed")
    for name, value in options.items():
        if isinstance(value, dict) and "preconditioner" in value:
            if value.get("seed", 0) is None:
                unseeded.append(f"{name}'s seed")
    if unseeded:
        warnings.warn(
            f"method {solver.name!r} draws random numbers with {', '.join(unseeded)}"
            "=None: a resumed run would mix chunks computed from different draws. "
            "Pass an integer seed for results that resume consistently.",
            RuntimeWarning,
            stacklevel=4,
        )


def _result_dtype(model: Any) -> np.dtype:
    dtype = np.asarray(model.backend.to_numpy(model.parameters)).dtype
    return dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)


def _measurement_name(measurement: Any) -> str | None:
    if measurement is None:
        return None
    module = getattr(measurement, "__module__", None) or "?"
    name = getattr(measurement, "__qualname__", None) or type(measurement).__qualname__
    return f"{module}.{name}"


def _open_store(
    out: Any,
    fingerprint_: dict[str, Any],
    shape: tuple[int, ...],
    plan: Plan,
    dtype: np.dtype,
    axis: int,
    overwrite: bool,
) -> ResultStore:
    return ResultStore.open(
        out,
        fingerprint_,
        shape,
        plan.chunk_size,
        dtype,
        axis=axis,
        overwrite=bool(overwrite),
    )


def _host_factors(model: Any, factors: Any, executor: Executor) -> Any:
    if isinstance(executor, LocalExecutor):
        return factors
    return np.asarray(model.backend.to_numpy(factors))


def _check_overwrite(overwrite: Any) -> None:
    if not isinstance(overwrite, bool | np.bool_):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}.")


# -- the queries ---------------------------------------------------------------------


def distributed_influences(
    inf: Influence,
    kind: InfluenceType,
    data: Any,
    name: str,
    test_data: Any,
    measurement: Any,
    by_layer: bool,
    out: Any,
    client: Any,
    overwrite: bool,
) -> Any:
    """:meth:`Influence.influences` chunk by chunk (see the module's docstring)."""
    _check_overwrite(overwrite)
    require_source(data, name, client)
    executor = executor_for(client)
    model = inf._guarded
    plan = plan_chunks(data, name)
    store = is_store_path(out)
    test = digest_test_data(model, test_data) if store else None
    rows = test[0] if test is not None else _count_test(test_data)
    if by_layer:
        tail: tuple[int, ...] = (len(_layer_names(inf, data, name)),)
    elif kind is InfluenceType.Up:
        tail = ()
    else:
        tail = tuple(plan.item_shape)
    shape = (rows, plan.num_points, *tail)
    dtype = _result_dtype(model)
    skip: set[int] = set()
    writer = None
    if store:
        query = {
            "query": "influences",
            "influence_type": kind.value,
            "by_layer": bool(by_layer),
            "measurement": _measurement_name(measurement),
        }
        found = _open_store(
            out, fingerprint(inf, query, plan, shape, dtype, test), shape, plan,
            dtype, 1, overwrite,
        )  # fmt: skip
        skip = set(range(plan.num_chunks)) - set(found.missing())
        if len(skip) == plan.num_chunks:
            return found.scores
        writer = found.writer()
    elif out is not None:
        check_out(out)
        check_out_shape(out, shape)
    factors = inf.factors(test_data, measurement=measurement)
    job = Job(
        token=uuid.uuid4().hex,
        mode="influences",
        name=name,
        kind=kind,
        by_layer=bool(by_layer),
        factors=_host_factors(model, factors, executor),
        writer=writer,
    )
    if isinstance(executor, LocalExecutor):
        job.influence = inf
    desc = "Influences (chunks)"
    target = None if store else (out if out is not None else np.empty(shape, dtype))
    for number, block in _run_all(
        executor, plan, data, name, job, inf, skip, inf._progress, desc
    ):
        if target is not None:
            start = number * plan.chunk_size
            target[:, start : start + int(block.shape[1])] = block
    if store:
        return found.scores
    if out is not None:
        return out
    return model.backend.asarray(target, like=model.parameters)


def distributed_self_influence(
    inf: Influence,
    data: Any,
    name: str,
    out: Any,
    client: Any,
    overwrite: bool,
) -> Any:
    """:meth:`Influence.self_influence` chunk by chunk."""
    _check_overwrite(overwrite)
    require_source(data, name, client)
    executor = executor_for(client)
    model = inf._guarded
    plan = plan_chunks(data, name)
    shape = (plan.num_points,)
    dtype = _result_dtype(model)
    store = is_store_path(out)
    skip: set[int] = set()
    writer = None
    if store:
        query = {"query": "self_influence"}
        found = _open_store(
            out, fingerprint(inf, query, plan, shape, dtype, None), shape, plan,
            dtype, 0, overwrite,
        )  # fmt: skip
        skip = set(range(plan.num_chunks)) - set(found.missing())
        if len(skip) == plan.num_chunks:
            return found.scores
        writer = found.writer()
    elif out is not None:
        check_out(out)
        if tuple(int(n) for n in out.shape) != shape:
            raise InputError(
                f"out has shape {tuple(out.shape)} but the self-influence is [N] = "
                f"{shape}: allocate out with that shape."
            )
    # one fitted state per worker, kept across this Influence's queries
    token = _token(inf, "state")
    job = Job(token=token, mode="self_influence", name=name, writer=writer)
    if isinstance(executor, LocalExecutor):
        job.influence = inf
    else:
        job.saved, job.training = _saved_state(inf)
    desc = "Self-influence (chunks)"
    target = None if store else (out if out is not None else np.empty(shape, dtype))
    for number, values in _run_all(
        executor, plan, data, name, job, inf, skip, inf._progress, desc
    ):
        if target is not None:
            start = number * plan.chunk_size
            target[start : start + int(values.shape[0])] = values
    if store:
        return found.scores
    if out is not None:
        return out
    return model.backend.asarray(target, like=model.parameters)


def _saved_state(inf: Influence) -> tuple[bytes, Any]:
    """The fitted state's bytes and the training data the workers need."""
    buffer = io.BytesIO()
    inf.save(buffer)
    solver = inf.solver
    needs_data = solver.name in ("cg", "lissa") or bool(
        getattr(solver, "residuals", False)
    )
    training = inf._require_fitted().training_data
    if not needs_data:
        return buffer.getvalue(), None
    if not isinstance(training, Source):
        raise InputError(
            f"self_influence with client=... and method {solver.name!r} solves with "
            "the training Hessian on the workers, so the training data must be a "
            "source they read themselves: fit on influx.ArraySource(...) or "
            "influx.FactorySource(...)."
        )
    return buffer.getvalue(), training


def distributed_top_k(
    inf: Influence,
    test_data: Any,
    data: Any,
    name: str,
    k: int,
    largest: bool,
    measurement: Any,
    client: Any,
) -> tuple[Any, Any]:
    """:meth:`Influence.top_k` on workers: a top-k per chunk, merged here."""
    require_source(data, name, client)
    executor = executor_for(client)
    model = inf._guarded
    plan = plan_chunks(data, name)
    if plan.num_points < k:
        raise InputError(
            f"k={k} is larger than the {plan.num_points} points of {name}: lower k."
        )
    factors = inf.factors(test_data, measurement=measurement)
    job = Job(
        token=uuid.uuid4().hex,
        mode="top_k",
        name=name,
        factors=_host_factors(model, factors, executor),
        k=k,
        largest=bool(largest),
    )
    if isinstance(executor, LocalExecutor):
        job.influence = inf
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    desc = "Top-k influences (chunks)"
    for number, part in _run_all(
        executor, plan, data, name, job, inf, set(), inf._progress, desc
    ):
        parts[number] = part
    values, indices = merge_top_k([parts[n] for n in sorted(parts)], k, largest)
    backend = model.backend
    return backend.asarray(values, like=model.parameters), backend.asarray(indices)


def merge_top_k(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, largest: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of per-chunk candidates (in chunk order), ties to smaller index.

    Each part's candidates among equal values are in index order, and parts
    come in index order, so a stable sort on the value alone breaks ties by
    index.
    """
    values = np.concatenate([p[0] for p in parts], axis=1)
    indices = np.concatenate([p[1] for p in parts], axis=1)
    key = -values if largest else values
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return (
        np.ascontiguousarray(np.take_along_axis(values, order, axis=1)),
        np.ascontiguousarray(np.take_along_axis(indices, order, axis=1)),
    )


def _count_test(test_data: Any) -> int:
    counted = count_points(test_data)
    if counted is None:
        raise InputError(
            "test_data's points could not be counted: pass a re-iterable of (x, y) "
            "batches, e.g. influx.batches(x, y, batch_size=...)."
        )
    return counted[0]


def _layer_names(inf: Influence, data: Any, name: str) -> list[str]:
    """``inf.layer_names``, tracing the model on the first input batch if needed."""
    try:
        return inf.layer_names
    except InputError:
        model = inf._guarded
        reader = DataReader(data, name, model.backend, model.parameters)
        for _, x, _ in reader:
            model.find_layers(x)
            break
        return inf.layer_names
