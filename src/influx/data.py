"""Training, test and input data: re-iterable collections of ``(x, y)`` batches.

influx accepts any object that can be iterated over more than once and yields
``(x, y)`` pairs whose leading dimensions are the batch size: a
``torch.utils.data.DataLoader``, a list of tuples, or :func:`batches` over numpy,
torch or JAX arrays. Batches may have different sizes (a short last batch is
weighted by its size). Data is converted to the model's framework by its
backend, batch by batch, when it is used: numpy arrays and arrays of another
framework (a torch ``DataLoader`` feeding a JAX model) are copied through the
host; floating data takes the model's dtype.

Results come back in the data's order. A torch ``DataLoader`` is read in its
dataset's order whatever its sampler's shuffling, every point once (see
:func:`ordered_loader`); other data whose batches differ from pass to pass is
refused where it is an axis of the result.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import zip_longest
from typing import Any

import numpy as np

from influx.errors import InputError
from influx.protocols import Backend

__all__ = ["Batches", "batches"]


class Batches(Sequence[tuple[Any, Any]]):
    """Consecutive mini-batches over a pair of arrays, iterable many times.

    Built by :func:`batches`. Indexing returns the ``(x, y)`` slices of one
    batch; ``len`` is the number of batches and :attr:`num_samples` the number
    of points.
    """

    def __init__(self, x: Any, y: Any, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise TypeError(
                f"batch_size must be a positive int, got {type(batch_size).__name__}."
            )
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}.")
        n_x, n_y = _leading_length(x, "x"), _leading_length(y, "y")
        if n_x != n_y:
            raise InputError(
                f"x and y must have the same number of points, got {n_x} inputs and "
                f"{n_y} targets. Pass one target per input."
            )
        if n_x == 0:
            raise InputError("x and y are empty: pass at least one point.")
        self._x, self._y = x, y
        self.batch_size = int(batch_size)
        self.num_samples = n_x

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, index: int) -> tuple[Any, Any]:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("Batches does not support slicing; index one batch.")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"batch index {index} out of range for {n} batches")
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.num_samples)
        return self._x[start:stop], self._y[start:stop]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (
            f"Batches(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"num_batches={len(self)})"
        )


def batches(x: Any, y: Any, *, batch_size: int = 64) -> Batches:
    """Split arrays into consecutive mini-batches that can be iterated many times.

    Parameters
    ----------
    x
        Inputs, shape ``[N, *S]``: a numpy, torch or JAX array.
    y
        Targets, shape ``[N, *T]``, of the same framework or numpy.
    batch_size
        Points per batch; the last batch holds the remainder.

    Returns
    -------
    Batches
        A sequence of ``(x[i:i+batch_size], y[i:i+batch_size])`` pairs.

    Raises
    ------
    InputError
        (a ``ValueError``) If ``x`` and ``y`` differ in length, are empty, or
        ``batch_size < 1``.

    Examples
    --------
    >>> import numpy as np
    >>> data = batches(np.zeros((10, 3)), np.zeros(10), batch_size=4)
    >>> [len(xb) for xb, _ in data]
    [4, 4, 2]
    """
    return Batches(x, y, batch_size)


def _leading_length(array: Any, name: str) -> int:
    shape = getattr(array, "shape", None)
    if shape is None:
        raise TypeError(
            f"{name} must be an array with a leading batch dimension (numpy, torch "
            f"or JAX), got {type(array).__name__}."
        )
    if len(shape) == 0:
        raise ValueError(f"{name} is a scalar; it needs a leading batch dimension.")
    return int(shape[0])


def check_reiterable(data: Any, name: str) -> None:
    """Raise if ``data`` cannot be iterated over more than once."""
    if data is None:
        raise TypeError(f"{name} is None: pass a re-iterable of (x, y) batches.")
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be a re-iterable of (x, y) batches (a DataLoader, a list "
            f"of tuples or influx.batches(x, y, batch_size=...)), got "
            f"{type(data).__name__}."
        )
    if iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}): influx reads "
            "the data more than once. Pass a list of (x, y) batches, a DataLoader "
            "or influx.batches(x, y, batch_size=...)."
        )


class DataReader:
    """Reads user data as native, validated batches for one model.

    A torch ``DataLoader`` is read through :func:`ordered_loader`: in the
    order of its dataset, every point once, with its batch size and collate
    function, whatever its sampler's shuffling or ``drop_last``. When the order
    of the points matters (``ordered``: the data is an axis of the result),
    data whose order influx cannot see (any other iterable that is not a
    sequence) is checked cheaply: the first batch is read once more and both
    passes must agree, as must every later pass's batch sizes and first batch.

    Parameters
    ----------
    data
        A re-iterable of ``(x, y)`` batches.
    name
        The argument's name, used in error messages (``"training_data"``).
    backend
        The model's backend, which converts each batch.
    like
        A native array whose device and floating dtype the batches take.
    ordered
        Whether the data is an axis of the result, so that every pass must
        yield its points in the same order.
    """

    def __init__(
        self,
        data: Any,
        name: str,
        backend: Backend,
        like: Any,
        *,
        ordered: bool = False,
    ) -> None:
        check_reiterable(data, name)
        self.data = data
        self.name = name
        self.ordered = ordered
        self._backend = backend
        self._like = like
        self._num_samples: int | None = None
        self._num_batches: int | None = None
        self._source: Any = None
        self._check_passes = False
        self._signature: tuple[Any, ...] | None = None

    @property
    def source(self) -> Any:
        """The iterable actually read: ``data``, or its ordered loader."""
        if self._source is None:
            source, deterministic = ordered_loader(self.data, self.name, self.ordered)
            self._check_passes = self.ordered and not deterministic
            self._source = source
        return self._source

    @property
    def first_batch(self) -> int:
        """Index of the first batch (0, or a partition's first batch in its source).

        A :class:`~influx.sources.Partition` keeps its source's numbering.
        """
        from influx.sources import Partition

        return self.data.first_batch if isinstance(self.data, Partition) else 0

    @property
    def num_samples(self) -> int:
        """Total number of points; reads the data once if not known yet."""
        if self._num_samples is None:
            known = getattr(self.source, "num_samples", None)
            if isinstance(known, int):
                self._num_samples = known
            else:
                for _ in self:
                    pass
        assert self._num_samples is not None
        return self._num_samples

    @property
    def num_batches(self) -> int | None:
        """Number of batches if known without reading the data, else ``None``."""
        if self._num_batches is None:
            try:
                self._num_batches = len(self.source)
            except TypeError:
                return None
        return self._num_batches

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        """Yield ``(batch_index, x, y)`` with native ``x`` and ``y``."""
        source = self.source
        if self._check_passes and self._signature is None:
            self._signature = (None, self._probe(source))
        count = 0
        # a partition of a source numbers its batches as the whole source does
        start = self.first_batch
        index = start - 1
        sizes: list[int] = []
        first: Any = None
        for index, batch in enumerate(source, start=start):
            prepared = self.prepare(index, batch)
            if prepared is None:
                sizes.append(0)
                continue
            n = int(prepared[0].shape[0])
            sizes.append(n)
            if self._check_passes and first is None:
                first = self._fingerprint(*prepared)
                self._compare(None, first)
            count += n
            yield (index, *prepared)
        if count == 0:
            raise InputError(
                f"{self.name} is empty ({index + 1 - start} batches, 0 points): pass "
                "at least one (x, y) batch with at least one point."
            )
        if self._check_passes:
            self._compare(tuple(sizes), first)
            self._signature = (tuple(sizes), first)
        self._num_samples = count
        self._num_batches = index + 1 - start

    def _probe(self, source: Any) -> Any:
        """Fingerprint of the first non-empty batch of a fresh pass."""
        for index, batch in enumerate(source):
            prepared = self.prepare(index, batch)
            if prepared is not None:
                return self._fingerprint(*prepared)
        return None

    def _fingerprint(self, x: Any, y: Any) -> tuple[Any, ...]:
        """Shapes and a hash of a strided sample of ``x`` and ``y``, on the host."""
        parts: list[Any] = []
        for array in (x, y):
            shape = tuple(int(d) for d in array.shape)
            size = math.prod(shape)
            flat = array.reshape((size,)) if size else array
            sample = self._backend.to_numpy(flat[:: max(1, size // 1024)])
            digest = hashlib.blake2b(np.ascontiguousarray(sample).tobytes())
            parts.append((shape, str(sample.dtype), digest.hexdigest()))
        return tuple(parts)

    def _compare(self, sizes: tuple[int, ...] | None, first: Any) -> None:
        """Raise if this pass differs from the recorded one."""
        if self._signature is None:
            return
        old_sizes, old_first = self._signature
        if first == old_first and (sizes is None or old_sizes in (None, sizes)):
            return
        raise InputError(
            f"{self.name} yields different batches on each pass (its points come "
            "in a different order, or are augmented at random), so the result's "
            "rows or columns could not be matched to its points. Pass data that "
            "reads the same points in the same order every time: a DataLoader "
            "with shuffle=False, influx.batches(x, y, batch_size=...) or a list "
            "of (x, y) batches."
        )

    def prepare(self, index: int, batch: Any) -> tuple[Any, Any] | None:
        """Validate and convert one batch; ``None`` for an empty batch."""
        x, y = self._split(batch, index)
        n_x, n_y = _leading_length(x, "x"), _leading_length(y, "y")
        if n_x != n_y:
            raise InputError(
                f"{self.name} batch {index}: x has {n_x} points but y has {n_y}. "
                "Each batch needs one target per input."
            )
        if n_x == 0:
            return None
        return self._convert(x, index, "x"), self._convert(y, index, "y")

    def _split(self, batch: Any, index: int) -> tuple[Any, Any]:
        if (
            isinstance(batch, dict)
            or not isinstance(batch, Sequence)
            or len(batch) != 2
        ):
            raise TypeError(
                f"{self.name} batch {index} is a {type(batch).__name__}; each batch "
                "must be an (x, y) pair. Wrap arrays with influx.batches(x, y, "
                "batch_size=...)."
            )
        return batch[0], batch[1]

    def _convert(self, array: Any, index: int, part: str) -> Any:
        backend = self._backend
        if not backend.is_native_array(array) and not isinstance(
            array, np.ndarray | np.generic | list | tuple | int | float
        ):
            from influx.backends import detect_backend

            owner = detect_backend(array)
            if owner is not None and owner.name != backend.name:
                # Another framework's array (a torch DataLoader feeding a JAX
                # model, say): go through the host.
                array = owner.to_numpy(array)
        return backend.asarray(array, like=self._like)


def ordered_loader(data: Any, name: str, ordered: bool) -> tuple[Any, bool]:
    """The iterable to read for ``data``, and whether its order is fixed.

    A sequence (a list, a tuple, :func:`batches`) is read as it is. A torch
    ``DataLoader`` over a map-style dataset is read in a fixed order, every
    point once, with the loader's batch size, collate function and worker
    settings:

    - a ``SequentialSampler`` or a ``RandomSampler`` (without replacement, all
      points): the dataset's order, ``0 .. N-1``;
    - a ``SubsetRandomSampler``: the order of its ``indices``;
    - ``drop_last=True`` is ignored (the last, short batch is read and
      weighted by its size), and ``in_order=False`` is turned off;
    - any other sampler or ``batch_sampler`` is read as it is if it yields the
      same indices on two passes (or if the order does not matter), else it is
      refused;
    - a sampler that draws with replacement, or a number of points other than
      the dataset's (``WeightedRandomSampler``), is refused: its points are
      not a fixed set.

    Any other iterable (a ``DataLoader`` over an ``IterableDataset`` too) is
    read as it is, with the order not known to be fixed. torch is never
    imported here: a ``DataLoader`` can only exist if the user imported it.

    Parameters
    ----------
    data
        The user's re-iterable of ``(x, y)`` batches.
    name
        The argument's name, for errors.
    ordered
        Whether the order of the points matters (a result axis).

    Returns
    -------
    tuple[Any, bool]
        The iterable to read, and ``True`` if it yields the same batches in
        the same order on every pass.

    Raises
    ------
    InputError
        For a loader whose points are drawn at random, or whose custom sampler
        changes order between passes when ``ordered``.
    """
    if isinstance(data, Sequence):
        return data, True
    torch = sys.modules.get("torch")
    utils = getattr(getattr(torch, "utils", None), "data", None)
    loader_class = getattr(utils, "DataLoader", None)
    if loader_class is None or not isinstance(data, loader_class):
        return data, False
    if isinstance(data.dataset, utils.IterableDataset):
        return data, False
    return _ordered_dataloader(data, name, ordered, utils)


def _ordered_dataloader(
    loader: Any, name: str, ordered: bool, utils: Any
) -> tuple[Any, bool]:
    """:func:`ordered_loader` for a ``DataLoader`` over a map-style dataset."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:  # automatic batching off: each item is a batch
        sampler, batch_size, drop_last = loader.sampler, None, False
    elif type(batch_sampler) is utils.BatchSampler:
        sampler = batch_sampler.sampler
        batch_size, drop_last = batch_sampler.batch_size, batch_sampler.drop_last
    else:
        _check_fixed_order(batch_sampler, "batch_sampler", name, ordered)
        return loader, True
    dataset = loader.dataset
    kind = type(sampler)
    out_of_order = loader.num_workers > 0 and not getattr(loader, "in_order", True)
    if kind is utils.SequentialSampler:
        order: Any = sampler
    elif (
        kind is utils.RandomSampler
        and not sampler.replacement
        and (sampler.num_samples == len(dataset))
    ):
        order = utils.SequentialSampler(dataset)
    elif kind is utils.SubsetRandomSampler:
        order = [int(i) for i in sampler.indices]
    elif kind in (utils.RandomSampler, utils.WeightedRandomSampler):
        raise InputError(
            f"{name} is a DataLoader whose sampler ({kind.__name__}) draws its "
            "points at random (with replacement, or a number of points other "
            "than the dataset's), so the points are not a fixed set. Pass "
            "DataLoader(loader.dataset, batch_size=..., shuffle=False) or "
            "influx.batches(x, y, batch_size=...)."
        )
    else:
        _check_fixed_order(sampler, "sampler", name, ordered)
        order = sampler
    if order is sampler and not (drop_last or out_of_order):
        return loader, True
    return _rebuild(loader, utils, order, batch_size), True


def _check_fixed_order(sampler: Any, what: str, name: str, ordered: bool) -> None:
    """Raise if ``ordered`` and two passes of ``sampler`` differ."""
    if not ordered or _same_twice(sampler):
        return
    raise InputError(
        f"{name} is a DataLoader whose {what} ({type(sampler).__name__}) yields "
        "its points in a different order on each pass, so the result's rows or "
        "columns could not be matched to its points. Pass a loader that reads "
        "the data in order: DataLoader(loader.dataset, batch_size=..., "
        "shuffle=False, collate_fn=loader.collate_fn), a list of (x, y) batches "
        "or influx.batches(x, y, batch_size=...)."
    )


def _same_twice(sampler: Any) -> bool:
    """Whether two passes of ``sampler`` yield the same indices."""
    missing = object()
    pairs = zip_longest(iter(sampler), iter(sampler), fillvalue=missing)
    return all(_index_key(a) == _index_key(b) for a, b in pairs)


def _index_key(item: Any) -> Any:
    if isinstance(item, int):
        return item
    if isinstance(item, Iterable):
        return tuple(_index_key(i) for i in item)
    try:
        return int(item)
    except (TypeError, ValueError):
        return item


def _rebuild(loader: Any, utils: Any, order: Any, batch_size: int | None) -> Any:
    """A plain ``DataLoader`` like ``loader``, reading ``order`` without dropping."""
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "shuffle": False,
        "sampler": order,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": False,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": getattr(loader, "pin_memory_device", ""),
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        options["in_order"] = True
    return utils.DataLoader(loader.dataset, **options)
