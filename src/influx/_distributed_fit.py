"""Fitting on the partitions of a :class:`~influx.sources.Source`, here or on dask.

``Influence.fit(source, client=...)`` maps the fit's statistics over the
source's partitions and adds them up with an executor
(:mod:`influx._executor`): the workers read their own partitions, the client
receives one sum per statistic.

- Curvature products ``H V`` (and ``G V`` for ``curvature="ggn"``):
  :class:`PartitionedHessianOperator` broadcasts ``V`` (numpy) per product;
  each partition returns ``sum_b n_b A_b V`` and its point count; the client
  divides the tree-reduced sum by ``N``. Its dense matrix is the sum of the
  partitions' dense sums. Every solver that multiplies by its operator
  (direct, cg at each iteration, arnoldi, the Nystrom sketch) thus runs
  distributed, unchanged.
- The block solver's diagonal blocks: :func:`partitioned_block_rows`, each
  partition's blocks summed in one pass over its data.
- K-FAC factors and EK-FAC corrections: :func:`kfac_factor_sums` and
  :func:`kfac_correction_sums`, called by :mod:`influx.solvers.kfac` when its
  training data is a :class:`PartitionedData` (the eigenvectors are
  broadcast for the corrections). Each batch keeps its global index, so the
  ``"mc"`` draws are those of a single-process fit.
- LiSSA is not distributed: its stochastic steps draw single batches of the
  source on the client (``sample_matvecs``); only its full products (the
  residuals) go to the workers.

The loss-convention check (:mod:`influx._loss_check`) runs once, on the client,
on the first batch of at least two points; the workers skip it. The client
sends the model once (``executor.broadcast``); each worker process keeps one
guarded model (:func:`worker_model`).

Sums are added in another order than a single pass over the batches, so the
fitted state equals the single-process one up to rounding (about ``1e-15``
relative in float64).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from influx._executor import Executor, LocalExecutor, executor_for
from influx._host import computes_on_host, host_view
from influx._loss_check import LossConventionCheck, check_points
from influx.data import DataReader
from influx.errors import InputError
from influx.operators import HessianOperator
from influx.protocols import TwiceDifferentiable
from influx.sources import Partition, Source

__all__ = [
    "ModelHandle",
    "PartitionedData",
    "PartitionedHessianOperator",
    "partitioned_block_rows",
    "kfac_correction_sums",
    "kfac_factor_sums",
    "partitioned_fit",
    "worker_model",
]

#: The name errors give the training data (as a single-process fit does).
_NAME = "training_data"


class PartitionedData(Sequence[tuple[Any, Any]]):
    """The training source of a distributed fit, as a solver's ``init`` gets it.

    A sequence of the source's ``(x, y)`` batches (so a solver that reads its
    training data itself works unchanged, reading it here), which also
    carries the executor and the model's broadcast handle for solvers that
    map their statistics over the partitions (K-FAC, EK-FAC).

    Attributes
    ----------
    source
        The :class:`~influx.sources.Source`.
    executor
        Where the partition tasks run.
    model
        The model's handle from ``executor.broadcast`` (tasks receive the
        model).
    """

    def __init__(self, source: Source, executor: Executor, model: Any) -> None:
        self.source, self.executor, self.model = source, executor, model
        self.partitions: list[Partition] = source.partitions

    @property
    def num_samples(self) -> int:
        """``N``."""
        return self.source.num_samples

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, Any]:  # type: ignore[override]
        return self.source[index]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.source)


def partitioned_fit(
    model: TwiceDifferentiable,
    guarded: TwiceDifferentiable,
    training_data: Any,
    client: Any,
    *,
    progress: bool,
    host: bool,
    curvature: str,
) -> tuple[PartitionedHessianOperator, PartitionedData]:
    """The curvature operator and the solver's training data of a distributed fit.

    Parameters
    ----------
    model
        The user's wrapped model (sent to the workers once).
    guarded
        ``model`` as the client calls it (thread-safe).
    training_data
        A :class:`~influx.sources.Source`.
    client
        A ``distributed.Client`` (or an executor).
    progress, host, curvature
        As for :class:`~influx.operators.HessianOperator`.

    Raises
    ------
    InputError
        If ``training_data`` is not a source.
    TypeError
        If ``client`` is not a ``distributed.Client``.
    """
    if not isinstance(training_data, Source):
        raise InputError(
            "training_data must be a data source when client is given, so that "
            "the workers read their partitions themselves; got "
            f"{type(training_data).__name__}. Wrap arrays in influx.ArraySource("
            "x, y, batch_size=...) (numpy memmaps, .npy paths, zarr or dask "
            "arrays) or influx.FactorySource('module:function', batch_size=...)."
        )
    executor = executor_for(client)
    elsewhere = not isinstance(executor, LocalExecutor)
    handle = executor.broadcast(ModelHandle(model, serialise=elsewhere))
    data = PartitionedData(training_data, executor, handle)
    operator = PartitionedHessianOperator(
        guarded,
        data,
        model=model,
        progress=progress,
        host=host,
        curvature=curvature,
    )
    return operator, data


class PartitionedHessianOperator(HessianOperator):
    """:class:`~influx.operators.HessianOperator` whose passes run per partition.

    :meth:`mv` and :meth:`to_dense` give what a single pass over the source
    gives (up to the order of the additions), computed by the executor's
    workers on their partitions. Single-batch products (LiSSA's draws) run
    here, reading the source.

    Parameters
    ----------
    guarded
        The model as this process calls it.
    data
        The :class:`PartitionedData` (source, executor, model handle).
    model
        The user's model (what the handle holds; kept for pickling).
    progress, host, curvature
        As for :class:`~influx.operators.HessianOperator`.
    """

    def __init__(
        self,
        guarded: TwiceDifferentiable,
        data: PartitionedData,
        *,
        model: TwiceDifferentiable,
        progress: bool = False,
        host: bool = False,
        curvature: str = "hessian",
    ) -> None:
        super().__init__(
            guarded,
            data.source,
            progress=progress,
            host=host,
            curvature=curvature,
            name=_NAME,
        )
        self.data = data
        self._model = model

    @property
    def executor(self) -> Executor:
        """Where the partition tasks run."""
        return self.data.executor

    def _check_loss_here(self) -> None:
        """The loss-convention check, here, on the first batch of >= 2 points."""
        check = self._loss_check
        if check.done:
            return
        for index, x, y in self.reader:
            check(index, *check_points(x, y, self.size))
            if check.done or int(x.shape[0]) >= 2:
                break
        check.done = True

    def weighted_sum(self, vectors: Any) -> tuple[Any, int]:
        """``(sum over partitions of sum_b n_b A_b V, N)``, in ``vectors``' dtype."""
        self._check_loss_here()
        executor = self.executor
        shared = executor.broadcast(_host_array(self, vectors))
        total, count = executor.sum(
            _product_task, self.data.partitions, self.data.model, shared, self.curvature
        )
        return _like_vectors(total, vectors), count

    def dense_sum(self, progress: bool, dtype: Any) -> tuple[Any, int]:
        """``(sum over partitions of S_p, N)``; see ``HessianOperator.dense_sum``."""
        self._check_loss_here()
        xp = array_namespace(self.like)
        name = _numpy_dtype_name(xp, dtype)
        total, count = self.executor.sum(
            _dense_task,
            self.data.partitions,
            self.data.model,
            name,
            self.curvature,
            progress=progress,
            desc="Hessian",
        )
        like = xp.astype(self.like, dtype)
        if isinstance(like, np.ndarray):
            return total, count
        return xp.asarray(total, device=array_device(like)), count

    def __getstate__(self) -> dict[str, Any]:
        # The executor (a client) stays here: a copy multiplies in its process,
        # with the model it holds.
        state = dict(self.__dict__)
        handle = ModelHandle(self._model, serialise=False)
        state["data"] = PartitionedData(self.data.source, LocalExecutor(), handle)
        state["model"] = self._model
        state["_loss_check"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.model = worker_model(self.data.model)
        self._loss_check = LossConventionCheck(self.model, _NAME)
        self._loss_check.done = True


# -- on the workers ------------------------------------------------------------


class ModelHandle:
    """The model as the workers receive it: pickled once, on the client.

    The workers keep the bytes (dask copies them between workers as it
    likes, which is safe for bytes; a model object could be pickled by a
    worker while a task is inside a framework transform of it) and each
    process unpickles them once (:func:`worker_model`). In-process (no
    client) the handle holds the model itself.

    Parameters
    ----------
    model
        The wrapped model.
    serialise
        Pickle it (with ``cloudpickle`` where installed: dask's own).
    """

    def __init__(self, model: TwiceDifferentiable, *, serialise: bool) -> None:
        self.token = uuid.uuid4().hex
        self.model: TwiceDifferentiable | None = None
        self.payload: bytes | None = None
        if serialise:
            self._serialise(model)
        else:
            self.model = model

    def _serialise(self, model: TwiceDifferentiable) -> None:
        self.payload = _pickle_module().dumps(model)
        # the same bytes (the same model, sent again by another fit) find the
        # worker's copy, and the functions a framework compiled for it
        self.token = hashlib.sha256(self.payload).hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        if self.payload is None:
            assert self.model is not None
            self._serialise(self.model)
        state = dict(self.__dict__)
        state["model"] = None
        return state


_WORKER_LOCK = threading.Lock()
_WORKER_MODEL: list[tuple[str, Any]] = []


def worker_model(handle: ModelHandle) -> TwiceDifferentiable:
    """The handle's model as this process calls it (guarded), one per process.

    Unpickled and guarded at the first task of a fit on each worker, then
    reused by the fit's later tasks and by later fits of the same model (the
    same bytes); another model replaces it.
    """
    from influx.attribution import _guard

    if handle.model is not None:
        return _guard(handle.model)
    with _WORKER_LOCK:
        if _WORKER_MODEL and _WORKER_MODEL[0][0] == handle.token:
            return _WORKER_MODEL[0][1]
        assert handle.payload is not None
        guarded = _guard(_pickle_module().loads(handle.payload))
        _WORKER_MODEL[:] = [(handle.token, guarded)]
        return guarded


def _pickle_module() -> Any:
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - dask installs it
        import pickle

        return pickle
    return cloudpickle


def _worker_operator(
    model: TwiceDifferentiable, partition: Partition, curvature: str
) -> HessianOperator:
    """The curvature operator of one partition, without the loss check."""
    guarded = worker_model(model)
    operator = HessianOperator(
        guarded,
        partition,
        host=computes_on_host(guarded.parameters),
        curvature=curvature,
        name=_NAME,
    )
    operator._loss_check.done = True  # done once, on the client
    return operator


def _product_task(
    partition: Partition, model: Any, vectors: np.ndarray, curvature: str
) -> tuple[np.ndarray, int]:
    """``(sum_b n_b A_b V, n)`` over one partition's batches, on the host."""
    operator = _worker_operator(model, partition, curvature)
    native = _from_host_keep_dtype(operator, vectors)
    total, count = operator.weighted_sum(native)
    return _to_host(operator, total), count


def _dense_task(
    partition: Partition, model: Any, dtype: str, curvature: str
) -> tuple[np.ndarray, int]:
    """``(S_p, n)``: one partition's dense sum ``[P, P]``, on the host."""
    operator = _worker_operator(model, partition, curvature)
    xp = array_namespace(operator.like)
    native_dtype = np.dtype(dtype) if operator.host else getattr(xp, dtype)
    total, count = operator.dense_sum(False, native_dtype)
    return _to_host(operator, total), count


# -- block-diagonal curvature -----------------------------------------------------


def partitioned_block_rows(
    operator: Any,
    indices: tuple[np.ndarray, ...],
    chunks: list[list[tuple[int, int, int]]],
    dtype: Any,
    progress: bool,
) -> list[list[Any]] | None:
    """The diagonal blocks of ``operator = H + mu I`` summed per partition.

    ``None`` unless ``H`` is a :class:`PartitionedHessianOperator`. Each
    worker reads its partition once and multiplies every batch by all the
    column chunks of :func:`influx.solvers.block.factorise_blocks` (keeping
    each block's own rows), so the fit makes one pass over the data instead
    of one per chunk. Returns per block ``[A[b, b]]`` (``[P_b, P_b]``,
    native, ``dtype``).
    """
    from influx.operators import split_shift

    base, shift = split_shift(operator)
    if not isinstance(base, PartitionedHessianOperator):
        return None
    base._check_loss_here()
    xp = array_namespace(base.like)
    name = _numpy_dtype_name(xp, dtype)
    sums, count = base.executor.sum(
        _block_task,
        base.data.partitions,
        base.data.model,
        name,
        base.curvature,
        indices,
        chunks,
        progress=progress,
        desc="Curvature blocks",
    )
    base.num_passes += 1
    like = xp.astype(base.like, dtype)
    rows = []
    for total in sums:
        block = total / count + shift * np.eye(total.shape[0], dtype=total.dtype)
        rows.append([_native(base.model, block, like)])
    return rows


def _block_task(
    partition: Partition,
    model: Any,
    dtype: str,
    curvature: str,
    indices: tuple[np.ndarray, ...],
    chunks: list[list[tuple[int, int, int]]],
) -> tuple[list[np.ndarray], int]:
    """One partition's block sums ``sum_b n_b A_b[blk, blk]`` and point count."""
    from influx.solvers.block import chunk_rows, chunk_vectors

    operator = _worker_operator(model, partition, curvature)
    like = operator.like
    xp = array_namespace(like)
    native_dtype = np.dtype(dtype) if operator.host else getattr(xp, dtype)
    positions = xp.arange(operator.size, device=array_device(like))
    sums: dict[tuple[int, int], Any] = {}
    count = 0
    for index, x, y in operator.reader:
        n = int(x.shape[0])
        for number, chunk in enumerate(chunks):
            vectors = chunk_vectors(xp, indices, chunk, like, positions, native_dtype)
            product = n * operator._batch_hvp(index, x, y, vectors, "the blocks")
            for piece, (_, own) in enumerate(chunk_rows(xp, indices, chunk, product)):
                key = (number, piece)
                sums[key] = own if key not in sums else sums[key] + own
        count += n
    rows: list[list[Any]] = [[] for _ in indices]
    for number, chunk in enumerate(chunks):
        for piece, (block, _, _) in enumerate(chunk):
            rows[block].append(sums.pop((number, piece)))
    return [_to_host(operator, xp.concat(parts, axis=0)) for parts in rows], count


# -- K-FAC and EK-FAC --------------------------------------------------------------


def kfac_factor_sums(
    solver: Any,
    model: TwiceDifferentiable,
    data: PartitionedData,
    host: bool,
    dtype: Any,
    seed: int,
    progress: bool,
) -> tuple[list[Any], list[Any], Any, int, Any]:
    """K-FAC's first pass over the partitions: ``(A sums, G sums, rest, N, layout)``.

    The client checks the loss convention on the first batch and reads the
    layer layout there (an adapter may trace the model on a batch to find
    its layers); the workers return each partition's
    :func:`~influx._kronecker.factor_sums`, added in a tree. The sums come
    back as native arrays of ``dtype`` (numpy in host mode).
    """
    reader = DataReader(data, _NAME, model.backend, model.parameters)
    layouts: list[Any] = []
    first = solver._batches(model, reader, layouts, host, seed, "", False, check=True)
    next(first)  # the loss check, and the layout
    first.close()
    like = _accumulation_like(model, host, dtype)
    a_sums, g_sums, rest, count = data.executor.sum(
        _factor_task,
        data.partitions,
        data.model,
        solver,
        seed,
        progress=progress,
        desc="K-FAC factors",
    )
    return (
        [_native(model, s, like) for s in a_sums],
        [_native(model, s, like) for s in g_sums],
        _native(model, rest, like),
        count,
        layouts[0],
    )


def kfac_correction_sums(
    solver: Any,
    model: TwiceDifferentiable,
    data: PartitionedData,
    host: bool,
    dtype: Any,
    seed: int,
    a_vectors: Sequence[Any],
    g_vectors: Sequence[Any],
    progress: bool,
) -> list[Any]:
    """EK-FAC's second pass over the partitions: per layer ``[d_out, d_a]`` sums.

    The eigenvectors are broadcast (numpy) once.
    """
    like = _accumulation_like(model, host, dtype)
    vectors = data.executor.broadcast(
        ([_host(model, q) for q in a_vectors], [_host(model, q) for q in g_vectors])
    )
    sums = data.executor.sum(
        _correction_task,
        data.partitions,
        data.model,
        solver,
        seed,
        vectors,
        progress=progress,
        desc="EK-FAC eigenvalues",
    )
    return [_native(model, s, like) for s in sums]


def _layer_batches(
    partition: Partition, model: Any, solver: Any, seed: int
) -> tuple[Any, Any, Any, Any, list[Any]]:
    """``(guarded model, host, dtype, batches, layouts)`` of a K-FAC task."""
    from influx.solvers._base import accumulation_dtype

    guarded = worker_model(model)
    host = computes_on_host(guarded.parameters)
    like = _host_like(guarded, host)
    dtype = accumulation_dtype(like)
    reader = DataReader(partition, _NAME, guarded.backend, guarded.parameters)
    layouts: list[Any] = []
    batches = solver._batches(
        guarded, reader, layouts, host, seed, "", False, check=True, check_loss=False
    )
    return guarded, host, dtype, batches, layouts


def _factor_task(
    partition: Partition, model: Any, solver: Any, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, int]:
    """One partition's K-FAC factor sums and point count, on the host."""
    from influx._kronecker import factor_sums

    guarded, _, dtype, batches, layouts = _layer_batches(partition, model, solver, seed)
    a_sums: list[Any] | None = None
    g_sums: list[Any] = []
    rest: Any = None
    count = 0
    for n, batch in batches:
        a_terms, g_terms, rest_term = factor_sums(batch, layouts[0].layers, dtype)
        if a_sums is None:
            a_sums, g_sums, rest = a_terms, g_terms, rest_term
        else:
            a_sums = [s + t for s, t in zip(a_sums, a_terms, strict=True)]
            g_sums = [s + t for s, t in zip(g_sums, g_terms, strict=True)]
            rest = rest + rest_term
        count += n
    assert a_sums is not None  # a partition holds at least one point
    return (
        [_host(guarded, s) for s in a_sums],
        [_host(guarded, s) for s in g_sums],
        _host(guarded, rest),
        count,
    )


def _correction_task(
    partition: Partition,
    model: Any,
    solver: Any,
    seed: int,
    vectors: tuple[list[np.ndarray], list[np.ndarray]],
) -> list[np.ndarray]:
    """One partition's EK-FAC correction sums, on the host."""
    from influx._kronecker import correction_sums

    guarded, host, dtype, batches, layouts = _layer_batches(
        partition, model, solver, seed
    )
    like = _accumulation_like(guarded, host, dtype)
    a_vectors = [_native(guarded, q, like) for q in vectors[0]]
    g_vectors = [_native(guarded, q, like) for q in vectors[1]]
    sums: list[Any] | None = None
    for _, batch in batches:
        terms = correction_sums(batch, layouts[0].layers, a_vectors, g_vectors, dtype)
        if sums is not None:
            terms = [s + t for s, t in zip(sums, terms, strict=True)]
        sums = terms
    assert sums is not None
    return [_host(guarded, s) for s in sums]


# -- conversions -------------------------------------------------------------------


def _host_like(model: Any, host: bool) -> Any:
    return (
        np.asarray(model.backend.to_numpy(model.parameters))
        if host
        else (model.parameters)
    )


def _accumulation_like(model: Any, host: bool, dtype: Any) -> Any:
    like = _host_like(model, host)
    return array_namespace(like).astype(like, dtype)


def _host(model: Any, array: Any) -> np.ndarray:
    """A native (or host-mode numpy) array as numpy, its dtype kept."""
    view = host_view(array)
    if view is not None:
        return np.asarray(view)
    return np.asarray(model.backend.to_numpy(array))


def _native(model: Any, array: np.ndarray, like: Any) -> Any:
    """A numpy array as ``like``'s kind of array, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.asarray(array, dtype=like.dtype)
    return model.backend.asarray(np.ascontiguousarray(array), like=like)


def _host_array(operator: HessianOperator, vectors: Any) -> np.ndarray:
    if isinstance(vectors, np.ndarray):
        return vectors
    return np.asarray(operator.to_numpy(vectors))


def _to_host(operator: HessianOperator, array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    return np.asarray(operator.model.backend.to_numpy(array))


def _from_host_keep_dtype(operator: HessianOperator, array: np.ndarray) -> Any:
    """``array`` on the model's device (numpy in host mode), its dtype kept."""
    if operator.host:
        return array
    xp = array_namespace(operator.model.parameters)
    return xp.asarray(np.array(array), device=array_device(operator.model.parameters))


def _like_vectors(array: np.ndarray, vectors: Any) -> Any:
    """A numpy result as an array like ``vectors`` (kind, dtype, device)."""
    if isinstance(vectors, np.ndarray):
        return array.astype(vectors.dtype, copy=False)
    xp = array_namespace(vectors)
    return xp.asarray(np.ascontiguousarray(array), device=array_device(vectors))


def _numpy_dtype_name(xp: Any, dtype: Any) -> str:
    """The numpy name of a native floating dtype (``torch.float64`` -> float64)."""
    for name in ("float64", "float32", "float16"):
        if getattr(xp, name, None) == dtype:
            return name
    return np.dtype(dtype).name
