"""Running the model on one batch, and checking what comes back."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._host import host_view
from influx.errors import InputError


def evaluate(
    data_name: str, index: int, x: Any, compute: Callable[..., Any], *args: Any
) -> Any:
    """``compute(*args)``; an error keeps its type and message, with context added.

    An exception raised by the user's model or loss, or by the framework (a
    shape mismatch, an allocator failure, an internal assert), is re-raised
    unchanged, with a note (Python 3.11+) naming the data argument, the batch
    and the input shape: influx does not guess its cause. influx's own
    :class:`InputError` passes through as it is.
    """
    try:
        return compute(*args)
    except InputError:
        raise
    except Exception as error:
        if hasattr(error, "add_note"):
            shape = tuple(getattr(x, "shape", ()))
            error.add_note(
                f"influx: raised while evaluating the model and loss on {data_name} "
                f"batch {index} (inputs of shape {shape})."
            )
        raise


def ensure_finite(array: Any, what: str) -> None:
    """Raise an InputError naming ``what`` if ``array`` holds NaN or inf."""
    view = host_view(array)
    if view is not None:  # numpy compiles nothing (JAX would, per shape)
        array = view
    xp = array_namespace(array)
    finite = xp.isfinite(array)
    if not bool(xp.all(finite)):
        nan = int(xp.sum(xp.astype(xp.isnan(array), xp.int64)))
        inf = int(xp.sum(xp.astype(~finite, xp.int64))) - nan
        raise InputError(
            f"{what} is not finite: {nan} NaN and {inf} inf values out of "
            f"{math.prod(array.shape)}. Possible causes: NaN or inf in the inputs "
            "or targets of this batch; a loss undefined at these points (a log or "
            "a division by 0, an overflow; a target equal to the loss's "
            "ignore_index, whose loss on a batch of one point is 0/0: drop such "
            "points); parameters of a diverged model. Check the inputs and "
            "targets of this batch."
        )


def check_parameters(model: Any) -> None:
    """Refuse a wrapped model whose flat parameters cannot be attributed.

    The checks every backend needs, done once here on
    ``model.parameters``: a ``[P]`` vector (``P = model.num_params``) of a
    real floating dtype, with finite entries. A model that offers the
    optional ``parameter_blocks`` (``(name, size)`` pairs in the order of
    the flat vector) has its non-finite parameters named. What needs the
    framework (one dtype over the parameter leaves, one device) stays with
    the adapter.

    Raises
    ------
    TypeError
        If the parameters are not floating or not a ``[P]`` vector.
    InputError
        If a parameter is NaN or inf.
    """
    theta = model.parameters
    xp = array_namespace(theta)
    size = int(model.num_params)
    if tuple(theta.shape) != (size,):
        raise TypeError(
            f"{type(model).__name__}.parameters must be the flat parameter vector "
            f"of shape [P]=({size},), got shape {tuple(theta.shape)}: fix the "
            "backend's wrapper."
        )
    if not xp.isdtype(theta.dtype, "real floating"):
        raise TypeError(
            f"model parameters must be of a real floating dtype, got {theta.dtype}. "
            "Cast the model's parameters to a floating dtype (float32 or float64)."
        )
    view = host_view(theta)
    finite = xp.isfinite(theta) if view is None else np.isfinite(view)
    if bool(array_namespace(finite).all(finite)):
        return
    if not isinstance(finite, np.ndarray):
        finite = model.backend.to_numpy(finite)
    bad = ~np.asarray(finite, dtype=bool)
    blocks = getattr(model, "parameter_blocks", None)
    if blocks:
        names, start = [], 0
        for name, block_size in blocks:
            if bad[start : start + int(block_size)].any():
                names.append(str(name))
            start += int(block_size)
        where = ", ".join(names)
    else:
        indices = np.flatnonzero(bad)
        where = "at flat indices " + ", ".join(map(str, indices[:5]))
        where += ", ..." if indices.size > 5 else ""
    raise InputError(
        f"model parameters {where} hold NaN or inf values ({int(bad.sum())} of "
        f"{size} entries); influences of a diverged model are meaningless. Check "
        "the training."
    )


def scalar_loss(value: Any, hint: str = "Reduce it with a mean over the batch.") -> Any:
    """``value`` if it is a scalar array (shape ``()``); else an InputError.

    The user's loss must be the mean over the batch. Adapters call this on
    the loss inside the functions they differentiate: it reads only the
    static ``shape``, so it works on traced arrays (JAX) too.

    Parameters
    ----------
    value
        What the user's loss returned.
    hint
        How to fix it, in the framework's words.
    """
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) == ():
        return value
    raise InputError(
        f"loss must return a scalar (the mean over the batch), got "
        f"{type(value).__name__} of shape "
        f"{None if shape is None else tuple(shape)}. {hint}"
    )
