"""Block-diagonal solve: the exact operator restricted to per-layer blocks.

For models where the direct solve's ``[P, P]`` matrix does not fit, but the
diagonal blocks of the operator do: one block per recognised layer (its
weight and bias together) and one per remaining parameter tensor, as
:func:`influx.layers.parameter_groups` lists them.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from influx._distributed_fit import partitioned_block_rows
from influx._memory import GIB, available_memory
from influx._progress import progress_iter
from influx.data import DataReader
from influx.errors import InputError, NotPositiveDefiniteWarning
from influx.layers import parameter_groups
from influx.operators import IDENTITY_CHUNK, DenseOperator, LinearOperator
from influx.solvers import direct as _direct
from influx.solvers._base import (
    SolveInfo,
    Solver,
    row_norms,
    to_host,
    working_dtype,
)

__all__ = ["BlockSolver", "BlockState"]

#: ``[P_b, P_b]`` matrices per block alive at the end of ``init``: the block
#: and its Cholesky factor (or eigenvectors); a third while it is factorised.
BLOCK_MATRICES = 3


@dataclass(frozen=True)
class BlockState:
    """The diagonal blocks of the operator, each factorised like direct.

    Attributes
    ----------
    names
        One name per block (a layer, a parameter tensor).
    indices
        One int64 array ``[P_b]`` per block: its positions in ``theta``.
        The blocks partition ``[0, P)``.
    blocks
        One :class:`~influx.solvers.direct.DirectState` per block, holding
        ``A[index, index]`` (``[P_b, P_b]``) and its factorisation.
    operator
        The operator the blocks were taken from.
    """

    names: tuple[str, ...]
    indices: tuple[np.ndarray, ...]
    blocks: tuple[_direct.DirectState, ...]
    operator: LinearOperator

    @property
    def positive_definite(self) -> bool:
        """Whether every block's Cholesky factorisation succeeded."""
        return all(block.positive_definite for block in self.blocks)

    @property
    def min_eigenvalue(self) -> float | None:
        """Smallest eigenvalue over the blocks that fell back, else ``None``."""
        values = [b.min_eigenvalue for b in self.blocks if b.min_eigenvalue is not None]
        return min(values) if values else None


class BlockSolver(Solver):
    """The operator's diagonal blocks, one per layer or parameter tensor.

    ``init`` takes the groups of :func:`influx.layers.parameter_groups` of the
    model: each recognised layer (weight and bias together), then each
    remaining parameter tensor (a model without the layer structure: each
    parameter tensor). It builds every block ``A[b, b]`` from batched
    products of the operator with the identity columns of that block (the
    columns of several small blocks share one product of at most 256
    vectors; only each block's own rows are kept), and factorises each block
    as :class:`~influx.DirectSolver` does: Cholesky, or, for a block that is
    not positive definite, an eigendecomposition and a pseudo-inverse with a
    :class:`~influx.NotPositiveDefiniteWarning` naming the block. ``solve``
    applies each block's inverse to its part of the right-hand sides.

    Cost: ``P`` operator products, like direct (about ``P / 256`` passes over
    the training data, each of at most 256 vectors), but memory ``sum_b
    |b|^2`` instead of ``P^2`` and factorisation ``sum_b |b|^3`` instead of
    ``P^3``; a solve of ``K`` right-hand sides costs ``O(K sum_b |b|^2)``.
    The approximation drops the curvature between the groups; with a single
    group it is the direct solve. The blocks are those of whatever operator
    it is given: the Hessian, or the Gauss-Newton matrix with
    ``curvature="ggn"``. Needs the ``model`` in ``init``
    (:meth:`influx.Influence.fit` passes it).
    """

    name = "block"

    def __init__(self) -> None:
        pass

    def init(
        self,
        operator: LinearOperator,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> BlockState:
        if model is None:
            raise InputError(
                "method='block' takes its blocks from the model's layers and "
                "parameter tensors: pass model= to init (influx.Influence.fit "
                "does)."
            )
        groups = _model_groups(model, training_data)
        if int(model.num_params) != operator.size:
            raise InputError(
                f"The model has {model.num_params} parameters but the operator "
                f"acts on {operator.size}: pass the model the operator belongs to."
            )
        return factorise_blocks(operator, groups, progress)

    def solve(
        self, state: BlockState, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        """``A_b^{-1} b_k[b]`` for every block; ``x0`` is ignored (exact per block)."""
        xp = array_namespace(rhs)
        direct = _direct.DirectSolver()
        pieces, squared = [], None
        min_eigenvalue = state.min_eigenvalue
        for index, block in zip(state.indices, state.blocks, strict=True):
            part = xp.take(rhs, _like_index(xp, index, rhs), axis=1)
            x, info = direct.solve(block, part)
            pieces.append(x)
            term = info.residual_norms**2
            squared = term if squared is None else squared + term
        x = _join(xp, pieces, state.indices, rhs)
        k = int(rhs.shape[0])
        residuals = np.sqrt(squared) if squared is not None else np.zeros(k)
        info = SolveInfo(
            method=self.name,
            iterations=np.ones(k, dtype=np.int64),
            residual_norms=residuals,
            rhs_norms=to_host(row_norms(rhs), state.operator),
            converged=np.ones(k, dtype=bool),
            extra={
                "positive_definite": state.positive_definite,
                "min_eigenvalue": min_eigenvalue,
                "blocks": list(state.names),
            },
        )
        return x, info


def _model_groups(model: Any, training_data: Any) -> list[tuple[str, np.ndarray]]:
    """:func:`~influx.layers.parameter_groups` of ``model``.

    An adapter that finds its layers by tracing a batch (JAX) raises an
    :class:`~influx.InputError` until it has seen one: it is shown the first
    training batch (one :meth:`layer_batch`) and asked again.
    """
    try:
        return parameter_groups(model)
    except InputError:
        if training_data is None or not callable(getattr(model, "layer_batch", None)):
            raise
    reader = DataReader(training_data, "training_data", model.backend, model.parameters)
    for _, x, y in reader:
        model.layer_batch(x, y)
        break
    return parameter_groups(model)


def factorise_blocks(
    operator: LinearOperator,
    groups: list[tuple[str, np.ndarray]],
    progress: bool = False,
) -> BlockState:
    """The blocks ``A[index, index]`` of ``groups`` and their factorisations.

    Parameters
    ----------
    operator
        ``A``, symmetric, of size ``P``.
    groups
        ``(name, index)`` pairs whose int64 ``index`` arrays partition
        ``[0, P)``.
    progress
        Show a progress bar over the products.

    Raises
    ------
    InputError
        If the groups do not partition ``[0, P)``, or the blocks would not
        fit in memory.
    """
    size = operator.size
    names = tuple(name for name, _ in groups)
    indices = tuple(np.asarray(index, dtype=np.int64) for _, index in groups)
    _check_partition(indices, size)
    xp = array_namespace(operator.like)
    dtype = working_dtype(operator.like)
    itemsize = xp.finfo(dtype).bits // 8
    _check_blocks_fit([int(i.size) for i in indices], size, itemsize)
    chunks = list(_column_chunks([int(i.size) for i in indices]))
    # A distributed fit sums each partition's blocks in one pass on its worker.
    rows = partitioned_block_rows(operator, indices, chunks, dtype, progress)
    if rows is None:
        rows = [[] for _ in indices]
        like = operator.like
        positions = xp.arange(size, device=array_device(like))
        desc = "Curvature blocks"
        for chunk in progress_iter(chunks, progress, desc, total=len(chunks)):
            vectors = chunk_vectors(xp, indices, chunk, like, positions, dtype)
            product = operator.mv(vectors)  # [C, P]: row j is A e_{columns[j]}
            for b, own in chunk_rows(xp, indices, chunk, product):
                rows[b].append(own)
            del product, vectors
    blocks, messages = [], []
    direct = _direct.DirectSolver()
    for name, parts in zip(names, rows, strict=True):
        matrix = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        parts.clear()
        dense = DenseOperator(matrix, operator.tags, operator.backend)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NotPositiveDefiniteWarning)
            state = direct.init(dense)
        # The full operator, not the block's: the state keeps no second copy.
        blocks.append(dataclasses.replace(state, operator=operator))
        for warning in caught:
            if issubclass(warning.category, NotPositiveDefiniteWarning):
                messages.append(f"block {name!r} ({int(matrix.shape[0])}): ")
                messages[-1] += str(warning.message)
            else:
                warnings.warn_explicit(
                    warning.message,
                    warning.category,
                    warning.filename,
                    warning.lineno,
                )
        del matrix, dense
    if messages:
        warnings.warn(
            "method='block': " + " ".join(messages),
            NotPositiveDefiniteWarning,
            stacklevel=3,
        )
    return BlockState(names, indices, tuple(blocks), operator)


def chunk_vectors(
    xp: Any,
    indices: tuple[np.ndarray, ...],
    chunk: list[tuple[int, int, int]],
    like: Any,
    positions: Any,
    dtype: Any,
) -> Any:
    """The identity columns of ``chunk`` as rows ``[C, P]`` (native, ``dtype``)."""
    columns = np.concatenate([indices[b][lo:hi] for b, lo, hi in chunk])
    wanted = _like_index(xp, columns, like)
    return xp.astype(wanted[:, None] == positions[None, :], dtype)


def chunk_rows(
    xp: Any,
    indices: tuple[np.ndarray, ...],
    chunk: list[tuple[int, int, int]],
    product: Any,
) -> Any:
    """Yield ``(block, rows)``: each block's own entries of ``product`` ``[C, P]``."""
    start = 0
    for b, lo, hi in chunk:
        stop = start + hi - lo
        where = _like_index(xp, indices[b], product)
        yield b, xp.take(product[start:stop], where, axis=1)
        start = stop


def _column_chunks(sizes: list[int]) -> Any:
    """Chunks of at most ``IDENTITY_CHUNK`` columns: ``[(block, lo, hi), ...]``.

    Blocks are taken in order; a small block's columns share a chunk with the
    next blocks', a large block's are split over several chunks.
    """
    chunk: list[tuple[int, int, int]] = []
    filled = 0
    for block, count in enumerate(sizes):
        lo = 0
        while lo < count:
            take = min(count - lo, IDENTITY_CHUNK - filled)
            chunk.append((block, lo, lo + take))
            filled += take
            lo += take
            if filled == IDENTITY_CHUNK:
                yield chunk
                chunk, filled = [], 0
    if chunk:
        yield chunk


def _check_partition(indices: tuple[np.ndarray, ...], size: int) -> None:
    covered = np.zeros(size, dtype=np.int64)
    for index in indices:
        if index.size and (index.min() < 0 or index.max() >= size):
            raise InputError(
                f"method='block': a parameter group indexes outside theta (P={size})."
            )
        np.add.at(covered, index, 1)
    if not bool(np.all(covered == 1)):
        raise InputError(
            "method='block': the parameter groups do not partition theta (a "
            "position is in no group or in two): the adapter's layer structure "
            "is wrong."
        )


def _check_blocks_fit(sizes: list[int], size: int, itemsize: int) -> None:
    """Raise if the blocks and one product of 256 vectors would not fit."""
    squares = sum(n * n for n in sizes)
    largest = max(sizes) if sizes else 0
    needed = (squares * 2 + largest * largest + 2 * IDENTITY_CHUNK * size) * itemsize
    available = available_memory()
    if available is None or needed <= available:
        return
    raise InputError(
        f"method='block' needs the diagonal blocks of the curvature (Hessian or "
        f"Gauss-Newton), sum |b|^2 = "
        f"{squares} entries (largest block {largest}), and their factors: about "
        f"{needed / GIB:.1f} GiB, but only {available / GIB:.1f} GiB of memory is "
        "available. Use method='cg', 'kfac' or 'ekfac', which never form a block "
        "of that size."
    )


def _like_index(xp: Any, index: np.ndarray, like: Any) -> Any:
    if isinstance(like, np.ndarray):
        return index
    return xp.asarray(index, device=array_device(like))


def _join(
    xp: Any, pieces: list[Any], indices: tuple[np.ndarray, ...], like: Any
) -> Any:
    """Per-block ``[K, P_b]`` pieces -> ``[K, P]`` in ``theta`` order."""
    ordered = xp.concat(pieces, axis=1)
    inverse = np.argsort(np.concatenate(indices)).astype(np.int64)
    return xp.take(ordered, _like_index(xp, inverse, like), axis=1)


# -- fitted state, for influx.Influence (quadratic forms, save and load) -------


def quadratic_form(state: BlockState, rhs: Any) -> Any:
    """``<A_bd^{-1} b_k, b_k>`` for every row, the sum over the blocks; ``[K]``."""
    xp = array_namespace(rhs)
    total = None
    for index, block in zip(state.indices, state.blocks, strict=True):
        part = xp.take(rhs, _like_index(xp, index, rhs), axis=1)
        value = _direct.quadratic_form(block, part)
        total = value if total is None else total + value
    return total


def export_state(state: BlockState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host arrays and JSON metadata that :func:`import_state` restores."""
    arrays: dict[str, np.ndarray] = {}
    minima = []
    for number, (index, block) in enumerate(
        zip(state.indices, state.blocks, strict=True)
    ):
        block_arrays, meta = _direct.export_state(block)
        arrays[f"{number}.index"] = index
        for key, value in block_arrays.items():
            arrays[f"{number}.{key}"] = value
        minima.append(meta["min_eigenvalue"])
    return arrays, {"names": list(state.names), "min_eigenvalues": minima}


def import_state(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], operator: LinearOperator
) -> BlockState:
    """The state :func:`export_state` wrote, on ``operator``'s device."""
    names = tuple(str(name) for name in meta["names"])
    indices, blocks = [], []
    for number, minimum in enumerate(meta["min_eigenvalues"]):
        prefix = f"{number}."
        own = {
            key[len(prefix) :]: value
            for key, value in arrays.items()
            if key.startswith(prefix)
        }
        indices.append(np.asarray(own.pop("index"), dtype=np.int64))
        meta_block = {"min_eigenvalue": minimum}
        blocks.append(_direct.import_state(own, meta_block, operator))
    _check_partition(tuple(indices), operator.size)
    return BlockState(names, tuple(indices), tuple(blocks), operator)
