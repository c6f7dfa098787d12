"""Data sources that split into partitions a worker reads by itself.

A distributed run (``client=`` on :class:`influx.Influence`) never ships the
training data from the client: each task gets a :class:`Partition`, a small
picklable description of a contiguous range of points, and reads those points
on the worker. Where the points come from is the source's job:

- :class:`ArraySource` over arrays that pickle by reference: a
  ``numpy.memmap`` (or the path of a ``.npy`` file, opened memory-mapped), a
  zarr array, or a dask array; an in-memory numpy array works too, and then
  each partition carries its own slice (and only it);
- :class:`FactorySource` over a function ``"module:function"`` that returns
  the arrays, called once per process on each worker (and once on the client
  to learn the sizes).

A source is also an ordinary re-iterable of ``(x, y)`` batches (a sequence of
them, like :func:`influx.batches`), so every single-process call accepts it
unchanged, and a partition is one too.

Partitions hold whole batches: ``partition_size`` is a multiple of
``batch_size``, so the batches of the partitions, read one after another, are
exactly the source's batches, with the same global batch index. Seeded
per-batch draws (K-FAC's Monte Carlo probes) and error messages ("batch 17")
are then the same distributed or not.
"""

from __future__ import annotations

import functools
import importlib
import math
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from influx.errors import InputError

__all__ = ["ArraySource", "FactorySource", "Partition", "Source"]

#: Points per partition when ``partition_size`` is not given (rounded up to a
#: multiple of the batch size).
DEFAULT_PARTITION_POINTS = 4096


class _ArrayHandle:
    """One array that reads ``[start:stop]`` as numpy, and pickles cheaply.

    Kinds: ``"numpy"`` (in memory: pickled with its data, so a partition keeps
    only its slice), ``"memmap"`` (pickled as file name, dtype, shape and
    offset; opened read-only again in each process), ``"zarr"`` (pickled by
    reference, as zarr does), ``"dask"`` (its graph; computed with the
    synchronous scheduler on the worker).
    """

    def __init__(self, array: Any, name: str) -> None:
        self.name = name
        self._memmap: tuple[str, str, tuple[int, ...], int, str] | None = None
        if isinstance(array, str | os.PathLike):
            path = os.fspath(array)
            if not os.path.exists(path):
                raise InputError(
                    f"{name}={path!r} does not exist: pass the path of a .npy file "
                    "(written with numpy.save), or an array."
                )
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                raise InputError(
                    f"{name}={path!r} is not a .npy file numpy can memory-map "
                    f"({error}): save the array with numpy.save, or pass an array."
                ) from error
        module = type(array).__module__.split(".")[0]
        file_offset = _memmap_offset(array)
        if file_offset is not None:
            self.kind = "memmap"
            self._memmap = (
                array.filename,
                array.dtype.str,
                tuple(int(d) for d in array.shape),
                file_offset,
                "C",
            )
            self._array: Any = array
        elif isinstance(array, np.ndarray):
            self.kind, self._array = "numpy", array
        elif module == "zarr" and hasattr(array, "shape"):
            self.kind, self._array = "zarr", array
        elif module == "dask" and hasattr(array, "compute"):
            self.kind, self._array = "dask", array
        elif hasattr(array, "shape") and hasattr(array, "__array__"):
            # a framework's tensor (torch, JAX): to the host once, here
            self.kind, self._array = "numpy", np.asarray(array)
        else:
            raise TypeError(
                f"{name} must be a numpy array, a numpy.memmap, the path of a .npy "
                f"file, a zarr array or a dask array, got {type(array).__name__}."
            )
        shape = tuple(int(d) for d in self._array.shape)
        if not shape:
            raise InputError(f"{name} is a scalar: pass an array [N, ...].")
        self.shape = shape

    @property
    def length(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """``array[start:stop]`` as a numpy array."""
        array = self._open()
        part = array[start:stop]
        if self.kind == "dask":
            return np.asarray(part.compute(scheduler="synchronous"))
        return np.asarray(part)

    def piece(self, start: int, stop: int) -> _ArrayHandle:
        """A handle of ``[start:stop]`` alone when this one pickles its data."""
        if self.kind != "numpy":
            return self
        piece = object.__new__(_ArrayHandle)
        piece.__dict__.update(self.__dict__)
        piece._array = self._array[start:stop]
        piece.shape = (stop - start, *self.shape[1:])
        piece._offset = start  # type: ignore[attr-defined]
        return piece

    def _open(self) -> Any:
        if self._array is None:
            assert self._memmap is not None
            filename, dtype, shape, offset, order = self._memmap
            self._array = np.memmap(
                filename,
                dtype=np.dtype(dtype),
                mode="r",
                shape=shape,
                offset=offset,
                order=order,
            )
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.kind == "memmap":
            state["_array"] = None
        return state


def _memmap_offset(array: Any) -> int | None:
    """Byte offset in its file of a C-contiguous ``numpy.memmap``'s data.

    ``None`` when ``array`` is no such memmap (then it pickles as data).
    """
    mapped = getattr(array, "_mmap", None)
    if not (
        isinstance(array, np.memmap)
        and isinstance(array.filename, str)
        and mapped is not None
        and array.flags.c_contiguous
    ):
        return None
    start = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    # numpy maps the file from the offset rounded down to the granularity
    aligned = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    return int(aligned + array.ctypes.data - start)


def _read(handle: _ArrayHandle, start: int, stop: int) -> np.ndarray:
    """``handle``'s points ``[start:stop]`` (global indices)."""
    offset = getattr(handle, "_offset", 0)
    return handle.read(start - offset, stop - offset)


class Source(Sequence[tuple[Any, Any]]):
    """A re-iterable of ``(x, y)`` batches split into :class:`Partition` s.

    Subclasses set :attr:`num_samples`, :attr:`batch_size`,
    :attr:`partition_size` and implement :meth:`_arrays`.

    Attributes
    ----------
    num_samples
        ``N``, the number of points.
    batch_size
        Points per batch; the last batch holds the remainder.
    partition_size
        Points per partition, a multiple of ``batch_size``; the last
        partition holds the remainder.
    """

    num_samples: int
    batch_size: int
    partition_size: int

    def _arrays(self) -> tuple[_ArrayHandle, _ArrayHandle]:
        """The ``x`` and ``y`` handles (opened where this runs)."""
        raise NotImplementedError

    def _configure(self, batch_size: int, partition_size: int | None) -> None:
        self.batch_size = _positive_int(batch_size, "batch_size")
        if partition_size is None:
            batches = math.ceil(DEFAULT_PARTITION_POINTS / self.batch_size)
            partition_size = self.batch_size * max(1, batches)
        partition_size = _positive_int(partition_size, "partition_size")
        if partition_size % self.batch_size:
            raise InputError(
                f"partition_size={partition_size} must be a multiple of "
                f"batch_size={self.batch_size}, so that partitions hold whole "
                f"batches: use e.g. partition_size="
                f"{self.batch_size * max(1, partition_size // self.batch_size)}."
            )
        self.partition_size = partition_size

    # -- the sequence of batches -------------------------------------------------

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, index: int) -> tuple[Any, Any]:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError(f"{type(self).__name__} does not support slicing.")
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"batch index {index} out of range for {count} batches")
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.num_samples)
        x, y = self._arrays()
        return _read(x, start, stop), _read(y, start, stop)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for partition in self.partitions:
            yield from partition

    # -- partitions --------------------------------------------------------------

    @property
    def num_partitions(self) -> int:
        """How many partitions the points split into."""
        return math.ceil(self.num_samples / self.partition_size)

    @property
    def partitions(self) -> list[Partition]:
        """The partitions, in order; each pickles without the others' data."""
        x, y = self._arrays()
        found = []
        for index in range(self.num_partitions):
            start = index * self.partition_size
            stop = min(start + self.partition_size, self.num_samples)
            found.append(
                Partition(
                    number=index,
                    start=start,
                    stop=stop,
                    first_batch=start // self.batch_size,
                    batch_size=self.batch_size,
                    x=x.piece(start, stop),
                    y=y.piece(start, stop),
                )
            )
        return found

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one input point ``S`` (``x`` is ``[N, *S]``)."""
        return self._arrays()[0].shape[1:]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, batch_size="
            f"{self.batch_size}, partition_size={self.partition_size}, "
            f"num_partitions={self.num_partitions})"
        )


@dataclass(frozen=True, eq=False)
class Partition(Sequence[tuple[Any, Any]]):
    """Points ``[start, stop)`` of a :class:`Source`: its batches, read where used.

    A sequence of ``(x, y)`` numpy batches of ``batch_size`` points (the last
    may be shorter).

    Attributes
    ----------
    number
        Position among the source's partitions.
    start, stop
        The points it holds, as indices into the whole source.
    first_batch
        Global index of its first batch (``start // batch_size``).
    batch_size
        Points per batch.
    """

    number: int
    start: int
    stop: int
    first_batch: int
    batch_size: int
    x: _ArrayHandle
    y: _ArrayHandle

    @property
    def num_samples(self) -> int:
        """Points in the partition."""
        return self.stop - self.start

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, index: int) -> tuple[Any, Any]:  # type: ignore[override]
        count = len(self)
        if isinstance(index, slice) or not -count <= index < count:
            raise IndexError(f"batch index {index} out of range for {count} batches")
        index %= count
        start = self.start + index * self.batch_size
        stop = min(start + self.batch_size, self.stop)
        return _read(self.x, start, stop), _read(self.y, start, stop)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for index in range(len(self)):
            yield self[index]


class ArraySource(Source):
    """Batches and partitions over a pair of arrays.

    Parameters
    ----------
    x
        Inputs ``[N, *S]``: a ``numpy.memmap`` or the path of a ``.npy`` file
        (memory-mapped; workers open the file themselves, so it must be
        readable at the same path on every worker), a zarr array (workers
        open its store), a dask array (workers compute their slices), or a
        numpy array (each partition then carries its slice of the data).
    y
        Targets ``[N, *T]``, of any of the same kinds.
    batch_size
        Points per batch.
    partition_size
        Points per partition (one task of a distributed run, one chunk of a
        resumable result), a multiple of ``batch_size``; default: the
        smallest multiple of ``batch_size`` that is at least 4096.

    Examples
    --------
    >>> import numpy as np
    >>> source = ArraySource(np.zeros((10, 3)), np.zeros(10), batch_size=2,
    ...                      partition_size=4)
    >>> [p.num_samples for p in source.partitions]
    [4, 4, 2]
    >>> [len(xb) for xb, _ in source]
    [2, 2, 2, 2, 2]
    """

    def __init__(
        self,
        x: Any,
        y: Any,
        *,
        batch_size: int = 64,
        partition_size: int | None = None,
    ) -> None:
        self._x, self._y = _ArrayHandle(x, "x"), _ArrayHandle(y, "y")
        if self._x.length != self._y.length:
            raise InputError(
                f"x and y must have the same number of points, got {self._x.length} "
                f"inputs and {self._y.length} targets."
            )
        if self._x.length == 0:
            raise InputError("x and y are empty: pass at least one point.")
        self.num_samples = self._x.length
        self._configure(batch_size, partition_size)

    def _arrays(self) -> tuple[_ArrayHandle, _ArrayHandle]:
        return self._x, self._y


class FactorySource(Source):
    """Batches and partitions over arrays that a function returns, on each worker.

    Parameters
    ----------
    factory
        ``"module:function"``: an importable function returning ``(x, y)``,
        arrays of any kind :class:`ArraySource` takes (a memory-mapped file
        or a zarr array keeps it cheap). It must be importable on every
        worker and return the same arrays everywhere. It is called once per
        process (on the client, to learn the sizes, and on each worker).
    *args, **kwargs
        Passed to the function (they must pickle).
    batch_size, partition_size
        As for :class:`ArraySource`.
    """

    def __init__(
        self,
        factory: str,
        *args: Any,
        batch_size: int = 64,
        partition_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.factory = factory
        self.args, self.kwargs = args, kwargs
        function = resolve_factory(factory, "factory")
        self._function = function
        x, y = self._arrays()
        if x.length != y.length:
            raise InputError(
                f"factory {factory!r} returned {x.length} inputs and {y.length} "
                "targets: return one target per input."
            )
        if x.length == 0:
            raise InputError(f"factory {factory!r} returned no points.")
        self.num_samples = x.length
        self._configure(batch_size, partition_size)

    def _arrays(self) -> tuple[_ArrayHandle, _ArrayHandle]:
        return _call_factory(self.factory, _Frozen(self.args), _Frozen(self.kwargs))

    @property
    def partitions(self) -> list[Partition]:
        """The partitions; each reads its points through the factory where used."""
        return [
            Partition(
                number=p.number,
                start=p.start,
                stop=p.stop,
                first_batch=p.first_batch,
                batch_size=p.batch_size,
                x=_FactoryArray(self, 0),  # type: ignore[arg-type]
                y=_FactoryArray(self, 1),  # type: ignore[arg-type]
            )
            for p in super().partitions
        ]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_function", None)
        return state


class _FactoryArray:
    """One of a :class:`FactorySource`'s arrays, resolved in the reading process."""

    def __init__(self, source: FactorySource, which: int) -> None:
        self.source, self.which = source, which

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.source._arrays()[self.which].read(start, stop)


class _Frozen:
    """Hashable by identity of content for the per-process factory cache."""

    def __init__(self, value: Any) -> None:
        self.value = value
        try:
            self.key = hash(_freeze(value))
        except TypeError:
            self.key = id(value)

    def __hash__(self) -> int:
        return self.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and (
            self.value is other.value or _same(self.value, other.value)
        )


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(_freeze(a) == _freeze(b))
    except Exception:
        return False


@functools.lru_cache(maxsize=8)
def _call_factory(
    factory: str, args: _Frozen, kwargs: _Frozen
) -> tuple[_ArrayHandle, _ArrayHandle]:
    """The factory's ``(x, y)`` handles, once per process and arguments."""
    function = resolve_factory(factory, "factory")
    result = function(*args.value, **kwargs.value)
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise InputError(
            f"factory {factory!r} must return a pair (x, y) of arrays, got "
            f"{type(result).__name__}."
        )
    return _ArrayHandle(result[0], "x"), _ArrayHandle(result[1], "y")


def resolve_factory(spec: str, name: str) -> Any:
    """The function named by ``"module:function"`` (``"module:obj.attr"`` too).

    Raises
    ------
    InputError
        If ``spec`` is malformed, the module cannot be imported, or it has no
        such callable; the message names ``name`` and ``spec``.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise InputError(f"{name} must be a string 'module:function', got {spec!r}.")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"{name} must be a string 'module:function', got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(
            f"{name}={spec!r}: cannot import the module {module_name!r} ({error}). "
            "Check the name, and that the module is on the Python path (of the "
            "workers too)."
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise InputError(
                f"{name}={spec!r}: the module {module_name!r} has no {attribute!r}."
            )
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{name}={spec!r} is not callable.")
    return target


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}.")
    if value < 1:
        raise InputError(f"{name} must be at least 1, got {value}.")
    return int(value)
