"""Running the model on one batch, and checking what comes back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._host import host_view
from influx.errors import InputError


def evaluate(
    data_name: str, index: int, x: Any, compute: Callable[..., Any], *args: Any
) -> Any:
    """``compute(*args)``, with framework errors turned into a clear InputError.

    A shape mismatch inside the model surfaces from torch as a RuntimeError
    and from JAX as a TypeError; either becomes an error that names the data
    argument, the batch and the input shape. influx's own errors pass through.
    """
    try:
        return compute(*args)
    except InputError:
        raise
    except (RuntimeError, TypeError, ValueError) as error:
        shape = tuple(getattr(x, "shape", ()))
        raise InputError(
            f"{data_name} batch {index}: the model and loss could not be evaluated "
            f"on inputs of shape {shape} ({type(error).__name__}: {error}). Check "
            "that the inputs fit the model and that the targets fit the loss."
        ) from error


def ensure_finite(array: Any, what: str) -> None:
    """Raise an InputError naming ``what`` if ``array`` holds NaN or inf."""
    view = host_view(array)
    if view is not None:  # numpy compiles nothing (JAX would, per shape)
        array = view
    xp = np if view is not None else array_namespace(array)
    finite = xp.isfinite(array)
    if not bool(xp.all(finite)):
        bad = int(xp.sum(xp.astype(~finite, xp.int64)))
        raise InputError(
            f"{what} is not finite ({bad} NaN or inf values). Check the inputs and "
            "targets of this batch, the loss (a log of 0, an overflow) and the "
            "model's parameters."
        )
