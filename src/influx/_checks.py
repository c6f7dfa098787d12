"""Running the model on one batch, and checking what comes back."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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
