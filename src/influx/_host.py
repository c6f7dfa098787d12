"""Arrays that already live in host memory, and the solvers' host mode.

JAX compiles every eager operation for each new shape the first time it meets
it; a solver's many small steps (a CG update, a norm, a finiteness check) then
cost far more to compile than to run. When a model's arrays live in host
memory anyway (JAX on the CPU), influx runs those steps in numpy on a view of
the same memory and calls the framework only for the model's derivatives.
Nothing here imports a framework: JAX arrays are recognised with
``array_api_compat`` and their device by its ``platform`` attribute.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from array_api_compat import is_jax_array

__all__ = ["computes_on_host", "host_view"]


def computes_on_host(array: Any) -> bool:
    """Whether steps on ``array`` are better run in numpy on the host.

    True for a JAX array of 32 or more bits whose devices are all CPUs: numpy
    reads it in place, and compiles nothing. Torch runs its eager operations
    without compiling, and an accelerator's arrays stay where they are.
    """
    if sys.modules.get("jax") is None or not is_jax_array(array):
        return False
    if np.dtype(array.dtype).itemsize < 4:
        # float16/bfloat16: numpy has no bfloat16 arithmetic, and the dense
        # steps widen to float32 on the framework's side anyway.
        return False
    try:
        devices = array.devices()
    except (AttributeError, RuntimeError):  # a tracer, or a deleted array
        return False
    return all(getattr(device, "platform", None) == "cpu" for device in devices)


def host_view(array: Any) -> np.ndarray | None:
    """``array`` as a numpy array if it is one or :func:`computes_on_host`."""
    if isinstance(array, np.ndarray):
        return array
    if computes_on_host(array):
        return np.asarray(array)
    return None
