"""Wrapping a framework model into a :class:`~influx.protocols.TwiceDifferentiable`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from influx._checks import check_parameters
from influx.backends import _configured, resolve_backend
from influx.protocols import Backend, TwiceDifferentiable

__all__ = ["twice_differentiable"]


def twice_differentiable(
    model: Any,
    loss: Callable[[Any, Any], Any],
    *,
    params: Any = None,
    backend: str | Backend | None = None,
) -> TwiceDifferentiable:
    """Wrap a model and its loss for influence computations.

    The backend is the explicit ``backend``, else the one selected by
    :func:`influx.use_backend` or ``INFLUX_BACKEND``, else the framework of
    ``model`` (or of ``params``).

    Parameters
    ----------
    model
        A ``torch.nn.Module``, or for JAX an ``apply_fn(params, x) ->
        predictions`` (a flax ``Module.apply``, a haiku apply function, or any
        function of a parameter pytree), or an equinox or flax nnx module
        (with ``params=None``: its floating arrays, or ``nnx.Param`` state, are
        differentiated; an equinox module is mapped over the batch,
        ``jax.vmap(module)(x)``, an nnx module runs in evaluation mode).
    loss
        ``loss(predictions, targets) -> scalar``, a mean over the batch.
    params
        The parameter pytree, for frameworks that keep parameters apart from
        the model (JAX); ``None`` for torch and for equinox and nnx modules.
        Of flax variables with collections besides ``"params"``
        (``"batch_stats"``), only ``variables["params"]`` is differentiated;
        the others are constants, and ``apply_fn`` must run the model in
        evaluation mode (no ``mutable=``).
    backend
        A backend name or object, overriding the selection.

    Returns
    -------
    TwiceDifferentiable
        ``influx_torch.TorchTwiceDifferentiable`` or
        ``influx_jax.JaxTwiceDifferentiable`` (or a plugin's wrapper).

    Raises
    ------
    TypeError
        If the selected backend is not the model's framework, or the framework
        cannot be told, or the parameters are not floating.
    InputError
        If a parameter is NaN or inf (a diverged model).
    """
    if not callable(loss):
        raise TypeError(
            f"loss must be a callable loss(predictions, targets) -> scalar, got "
            f"{type(loss).__name__}."
        )
    try:
        chosen = resolve_backend(model, params, backend=backend)
    except TypeError as error:
        if params is None and backend is None and _configured()[0] is None:
            # Nothing claims the model: most likely a JAX apply function
            # passed without its parameters.
            raise TypeError(
                f"{error} If model is a JAX apply function, pass its parameter "
                "pytree too: twice_differentiable(apply_fn, loss, params=params)."
            ) from None
        raise
    wrapped = chosen.twice_differentiable(model, loss, params=params)
    check_parameters(wrapped)
    return wrapped
