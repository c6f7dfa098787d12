"""Training, test and input data: re-iterable collections of ``(x, y)`` batches.

influx accepts any object that can be iterated over more than once and yields
``(x, y)`` pairs whose leading dimensions are the batch size: a
``torch.utils.data.DataLoader``, a list of tuples, or :func:`batches` over numpy,
torch or JAX arrays. Batches may have different sizes (a short last batch is
weighted by its size). Data is converted to the model's framework by its
backend, batch by batch, when it is used: numpy arrays and arrays of another
framework (a torch ``DataLoader`` feeding a JAX model) are copied through the
host; floating data takes the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
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
    """

    def __init__(self, data: Any, name: str, backend: Backend, like: Any) -> None:
        check_reiterable(data, name)
        self.data = data
        self.name = name
        self._backend = backend
        self._like = like
        self._num_samples: int | None = None
        self._num_batches: int | None = None

    @property
    def num_samples(self) -> int:
        """Total number of points; reads the data once if not known yet."""
        if self._num_samples is None:
            known = getattr(self.data, "num_samples", None)
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
                self._num_batches = len(self.data)
            except TypeError:
                return None
        return self._num_batches

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        """Yield ``(batch_index, x, y)`` with native ``x`` and ``y``."""
        count = 0
        index = -1
        for index, batch in enumerate(self.data):
            prepared = self.prepare(index, batch)
            if prepared is None:
                continue
            count += int(prepared[0].shape[0])
            yield (index, *prepared)
        if count == 0:
            raise InputError(
                f"{self.name} is empty ({index + 1} batches, 0 points): pass at least "
                "one (x, y) batch with at least one point."
            )
        self._num_samples = count
        self._num_batches = index + 1

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
