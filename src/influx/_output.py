"""The ``out=`` argument: checked up front, then filled block by block.

``out`` is a host array that takes the result as it is computed: a numpy
array, a ``numpy.memmap`` or a zarr array. Its type, dtype, writability and
full shape ``[N_test, M, *S]`` are checked before any expensive work, so a bad
``out`` neither wastes a solve nor is left partly written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx.data import ordered_loader
from influx.errors import InputError
from influx.protocols import TwiceDifferentiable

__all__ = ["BlockSink", "check_out", "check_out_up_front", "count_points"]

#: Modules whose arrays live on a framework's device, not on the host.
_NATIVE_MODULES = ("torch", "jax", "jaxlib", "tensorflow", "cupy", "mlx")


def check_out(out: Any, shape: tuple[int, ...] | None = None) -> None:
    """Raise unless ``out`` is a writable floating host array of ``shape``.

    Parameters
    ----------
    out
        The user's ``out`` argument; ``None`` passes.
    shape
        The result's full shape ``[N_test, M, *S]``; ``None`` when unknown
        (then only the type, dtype and writability are checked).

    Raises
    ------
    TypeError
        If ``out`` is not a numpy array, ``numpy.memmap`` or zarr array.
    InputError
        If its dtype is not floating, it is read-only, or its shape differs.
    """
    if out is None:
        return
    dtype, read_only = _host_array_traits(out)
    if not np.issubdtype(dtype, np.floating):
        raise InputError(
            f"out has dtype {dtype}, which would truncate the influences: allocate "
            "it with a floating dtype, e.g. np.empty(shape, dtype=np.float32) or "
            "np.float64."
        )
    if read_only:
        raise InputError(
            f"out ({type(out).__name__}) is read-only: open it for writing "
            "(numpy.memmap mode 'w+' or 'r+', zarr mode 'w', 'a' or 'r+', or a "
            "writable numpy array)."
        )
    if shape is not None:
        check_out_shape(out, shape)


def check_out_up_front(
    out: Any,
    up: bool,
    input_data: Any,
    *,
    rows: int | None = None,
    test_data: Any = None,
) -> None:
    """Check ``out`` against the full result shape before any expensive work.

    Parameters
    ----------
    out
        The user's ``out``; ``None`` passes without reading any data.
    up
        ``True`` for up-weighting (``[N_test, M]``), ``False`` for
        perturbation (``[N_test, M, *S]``).
    input_data
        The points whose influence is computed: gives ``M`` and ``S``.
    rows
        ``N_test`` when known (the number of influence factors).
    test_data
        Otherwise the test points, which give ``N_test``.
    """
    if out is None:
        return
    check_out(out)
    if rows is None:
        counted = count_points(test_data)
        if counted is None:
            return
        rows = counted[0]
    inputs = count_points(input_data)
    if inputs is None:
        return
    points, item_shape = inputs
    check_out_shape(out, (rows, points) if up else (rows, points, *item_shape))


def check_out_shape(out: Any, shape: tuple[int, ...]) -> None:
    """Raise an InputError naming ``N_test`` and ``M`` unless ``out.shape == shape``."""
    got = tuple(int(n) for n in out.shape)
    if got == tuple(shape):
        return
    names = "[N_test, M]" if len(shape) == 2 else "[N_test, M, *S]"
    small = len(got) == len(shape) and any(
        g < s for g, s in zip(got, shape, strict=True)
    )
    verdict = "is too small" if small else "has the wrong shape"
    raise InputError(
        f"out has shape {got} but the result is {names} = {tuple(shape)} "
        f"(N_test={shape[0]} test points or influence factors, M={shape[1]} input "
        f"points): out {verdict}. Allocate out with shape {tuple(shape)}."
    )


def _host_array_traits(out: Any) -> tuple[np.dtype, bool]:
    """``(dtype, read_only)`` of a numpy or zarr array; TypeError otherwise."""
    if isinstance(out, np.ndarray):
        return out.dtype, not out.flags.writeable
    module = type(out).__module__.split(".")[0]
    if module == "zarr" and hasattr(out, "shape") and hasattr(out, "dtype"):
        return np.dtype(out.dtype), bool(getattr(out, "read_only", False))
    if module in _NATIVE_MODULES:
        raise TypeError(
            f"out must be a host array, got a {module} array "
            f"({type(out).__name__}): pass a numpy array, a numpy.memmap or a zarr "
            "array of the result's shape, or out=None to get a native array back."
        )
    raise TypeError(
        f"out must be a writable array such as a numpy array, a numpy.memmap or a "
        f"zarr array, got {type(out).__name__}. Or pass out=None to get a native "
        "array back."
    )


def count_points(data: Any) -> tuple[int, tuple[int, ...]] | None:
    """``(M, S)``: points and per-point input shape of ``data``, cheaply.

    ``M`` comes from ``num_samples`` (:func:`influx.batches`), from a
    ``DataLoader``'s sampler when it drops no last batch, or else from a pass
    over the batches that reads only their shapes (no model evaluation).
    ``S`` is the shape of the first nonempty batch's inputs without their
    leading dimension. ``None`` when the data does not have the expected
    form; the errors then come from reading it for real.
    """
    try:
        # Read what the computation will read: a shuffling or drop_last
        # DataLoader is read in order, every point once (see ordered_loader).
        data = ordered_loader(data, "data", ordered=False)[0]
    except (InputError, TypeError):
        return None
    try:
        known = _known_length(data)
        count, shape = 0, None
        for batch in data:
            n, item_shape = _batch_shape(batch)
            if n and shape is None:
                shape = item_shape
                if known is not None:
                    return known, shape
            count += n
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    if shape is None:
        return None
    return count, shape


def _known_length(data: Any) -> int | None:
    known = getattr(data, "num_samples", None)
    if isinstance(known, int | np.integer) and not isinstance(known, bool):
        return int(known)
    batch_sampler = getattr(data, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None)
    if sampler is not None and getattr(batch_sampler, "drop_last", True) is False:
        try:
            return len(sampler)
        except TypeError:
            return None
    return None


def _batch_shape(batch: Any) -> tuple[int, tuple[int, ...]]:
    if isinstance(batch, dict) or not isinstance(batch, Sequence) or len(batch) != 2:
        raise TypeError("not an (x, y) pair")
    shape = tuple(int(n) for n in batch[0].shape)
    return shape[0], shape[1:]


class BlockSink:
    """Collects result blocks along axis 1, in memory or into ``out``.

    Parameters
    ----------
    model
        The wrapped model, whose backend copies blocks to the host.
    rows
        ``N_test``, the number of influence factors.
    out
        ``None``, or a host array already checked by :func:`check_out`.
    """

    def __init__(self, model: TwiceDifferentiable, rows: int, out: Any) -> None:
        self.model, self.out, self.rows = model, out, int(rows)
        self.blocks: list[Any] = []
        self.filled = 0
        if out is not None:
            check_out(out)
            shape = out.shape
            if len(shape) < 2 or int(shape[0]) != self.rows:
                raise InputError(
                    f"out must have shape [N_test, M, ...] with N_test={self.rows} "
                    f"(the number of influence factors), got {tuple(shape)}."
                )

    def add(self, block: Any) -> None:
        """Append ``block`` (``[N_test, B, ...]``) after the columns so far."""
        if self.out is None:
            self.blocks.append(block)
            return
        width = int(block.shape[1])
        stop = self.filled + width
        if stop > int(self.out.shape[1]) or (
            tuple(self.out.shape[2:]) != tuple(block.shape[2:])
        ):
            raise InputError(
                f"out has shape {tuple(self.out.shape)}, too small for the "
                f"result: columns {self.filled}:{stop} of a block of shape "
                f"{tuple(block.shape)}. Allocate [N_test, M, *S] for all M "
                "input points."
            )
        self.out[:, self.filled : stop] = self.model.backend.to_numpy(block)
        self.filled = stop

    def result(self) -> Any:
        """The joined blocks (native), or ``out`` once every column is filled."""
        if self.out is None:
            return array_namespace(self.blocks[0]).concat(self.blocks, axis=1)
        if self.filled != int(self.out.shape[1]):
            raise InputError(
                f"out has {int(self.out.shape[1])} columns but the data had "
                f"{self.filled} points: allocate out with M={self.filled}."
            )
        return self.out
