"""Models of JAX libraries (flax linen and nnx, equinox) as ``apply_fn(params, x)``.

:class:`~influx_jax.JaxTwiceDifferentiable` differentiates a function
``apply_fn(params, x)`` in a pytree of floating arrays. :func:`split_model`
brings the models of the common JAX libraries to that form, so that only
their trainable parameters are differentiated and everything else (running
statistics, random-number state, activation functions, integer counters)
enters as a constant, as torch buffers do:

- **flax linen variables**, a mapping with a ``"params"`` collection and
  others (``"batch_stats"``, ...): only ``variables["params"]`` is
  differentiated; ``apply_fn`` receives the full variables with the other
  collections unchanged. ``apply_fn`` must compute the model in evaluation
  mode (``use_running_average=True``, no ``mutable=``).
- **equinox modules**, passed as the model with ``params=None``: the
  differentiated parameters are ``equinox.partition(module,
  equinox.is_inexact_array)``; the module is applied to one sample at a time,
  ``jax.vmap(module)(x)``, the equinox convention. A module that takes whole
  batches is wrapped by hand (see :data:`EQUINOX_BATCHED_HINT`).
- **flax nnx modules**, passed as the model with ``params=None``: the
  differentiated parameters are the ``nnx.Param`` state; the rest of the state
  is constant, and the module runs on whole batches in evaluation mode
  (``module.eval()`` on a copy: dropout off, batch-norm on its running
  statistics).

Frameworks are imported only if already imported: an object can be an
equinox or nnx module only once its library is in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax

from influx.errors import InputError

__all__ = ["EQUINOX_BATCHED_HINT", "is_library_module", "split_model"]

#: The line that wraps an equinox module by hand (a batched module, a module
#: with state, or a custom choice of differentiated arrays).
EQUINOX_BATCHED_HINT = (
    "params, static = eqx.partition(module, eqx.is_inexact_array); "
    "influx.twice_differentiable(lambda p, x: eqx.combine(p, static)(x), loss, "
    "params=params)"
)

#: Flax's own name for the error of a batch-norm in training mode without
#: ``mutable=``; matched by name so that flax need not be imported.
_FLAX_IMMUTABLE_ERROR = "ModifyScopeVariableError"


def _equinox_module(obj: Any) -> bool:
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(obj, eqx.Module)


def _nnx_module(obj: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def is_library_module(obj: Any) -> bool:
    """Whether ``obj`` is an equinox or flax nnx module (imports nothing)."""
    return _equinox_module(obj) or _nnx_module(obj)


def is_flax_variables(params: Any) -> bool:
    """Whether ``params`` looks like flax variables with non-``params`` collections.

    A mapping whose values are all mappings (collections), with a ``"params"``
    key and at least one other key.
    """
    return (
        isinstance(params, Mapping)
        and "params" in params
        and len(params) > 1
        and all(isinstance(value, Mapping) for value in params.values())
    )


def split_model(model: Any, params: Any) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(apply_fn, trainable)`` with ``apply_fn(trainable, x) -> predictions``.

    Parameters
    ----------
    model
        An apply function ``model(params, x)``, or with ``params=None`` an
        equinox or flax nnx module.
    params
        The parameter pytree, flax variables, or ``None`` for a module.

    Returns
    -------
    tuple
        The apply function of the differentiated parameters and those
        parameters (a pytree of floating arrays); ``(model, params)``
        unchanged for a plain apply function and pytree.

    Raises
    ------
    TypeError
        If a module is passed with ``params``, or ``params`` is missing for an
        apply function.
    """
    if is_library_module(model):
        if params is not None:
            raise TypeError(
                f"model is a {type(model).__name__} module, which holds its own "
                "parameters: call twice_differentiable(module, loss) without "
                "params=, or pass an apply function with its params."
            )
        if _equinox_module(model):
            return _split_equinox(model)
        return _split_nnx(model)
    if params is None:
        raise TypeError(
            "The JAX backend needs params=...: pass the apply function as model "
            "and its parameter pytree, twice_differentiable(apply_fn, loss, "
            "params=params), or an equinox or flax nnx module as model."
        )
    if is_flax_variables(params):
        return _split_flax_variables(model, params)
    if _equinox_module(params):
        return _split_equinox_params(model, params)
    return model, params


def _named(fn: Callable[..., Any], like: Any) -> Callable[..., Any]:
    """``fn`` carrying ``like``'s name, for the wrapper's repr."""
    fn.__qualname__ = getattr(like, "__qualname__", type(like).__name__)
    return fn


def _split_flax_variables(
    apply_fn: Callable[[Any, Any], Any], variables: Mapping[str, Any]
) -> tuple[Callable[[Any, Any], Any], Any]:
    """Differentiate ``variables["params"]``; the other collections are constant."""
    constants = {name: value for name, value in variables.items() if name != "params"}

    def apply(trainable: Any, x: Any) -> Any:
        merged = {**constants, "params": trainable}
        try:  # the caller's mapping type (flax's FrozenDict), else a dict
            full = type(variables)(merged)
        except TypeError:
            full = merged
        try:
            output = apply_fn(full, x)
        except Exception as error:
            if type(error).__name__ == _FLAX_IMMUTABLE_ERROR:
                raise InputError(
                    f"apply_fn tried to update the collections "
                    f"{sorted(constants)} ({error}). influx differentiates "
                    "variables['params'] and holds the other collections constant: "
                    "apply the model in evaluation mode, e.g. "
                    "lambda v, x: module.apply(v, x, train=False) with "
                    "BatchNorm(use_running_average=not train), and no mutable=."
                ) from error
            raise
        if (
            isinstance(output, tuple)
            and len(output) == 2
            and isinstance(output[1], Mapping)
        ):
            raise InputError(
                "apply_fn returned a pair (output, updated collections "
                f"{sorted(output[1])}): it was called with mutable=..., which "
                "computes batch statistics. Influences need the model in evaluation "
                "mode: apply_fn = lambda v, x: module.apply(v, x, train=False) "
                "(BatchNorm(use_running_average=True)), without mutable=."
            )
        return output

    return _named(apply, apply_fn), variables["params"]


def _split_equinox(module: Any) -> tuple[Callable[[Any, Any], Any], Any]:
    """Differentiate the module's inexact arrays; map it over the batch."""
    import equinox as eqx

    trainable, static = eqx.partition(module, eqx.is_inexact_array)

    def apply(params: Any, x: Any) -> Any:
        single = eqx.combine(params, static)
        try:
            return jax.vmap(single)(x)
        except Exception as error:
            raise InputError(
                f"Applying the equinox module {type(module).__name__} to one sample "
                f"at a time, jax.vmap(module)(x), failed ({type(error).__name__}: "
                f"{error}). influx maps an equinox module over the batch's leading "
                "axis; for a module that takes whole batches or needs state, wrap "
                f"it yourself: {EQUINOX_BATCHED_HINT}"
            ) from error

    return _named(apply, module), trainable


def _split_equinox_params(
    apply_fn: Callable[[Any, Any], Any], module: Any
) -> tuple[Callable[[Any, Any], Any], Any]:
    """An equinox module passed as ``params``: differentiate its inexact arrays."""
    import equinox as eqx

    trainable, static = eqx.partition(module, eqx.is_inexact_array)

    def apply(params: Any, x: Any) -> Any:
        return apply_fn(eqx.combine(params, static), x)

    return _named(apply, apply_fn), trainable


def _split_nnx(module: Any) -> tuple[Callable[[Any, Any], Any], Any]:
    """Differentiate the ``nnx.Param`` state; run a copy in evaluation mode."""
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(trainable: Any, x: Any) -> Any:
        copy = nnx.merge(graphdef, trainable, rest)
        copy.eval()
        return copy(x)

    return _named(apply, module), params
