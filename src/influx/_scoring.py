"""The machinery every influence computation shares, in one place.

:class:`influx.Influence` and the seed's functions (``influx.influence``) both
run through these: argument checks, per-sample gradients streamed batch by
batch (each batch checked to be finite, the loss convention checked once per
data argument), the scoring loop that turns influence factors and a data
argument into blocks ``[N_test, B]`` (or ``[N_test, B, *S]``) for a sink, and
the host mode of JAX on the CPU (``influx._host``): the solver's steps and the
dot products run in numpy, only the model's derivatives in JAX.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._checks import ensure_finite, evaluate
from influx._host import host_view
from influx._loss_check import LossConventionCheck
from influx._output import BlockSink, check_out_up_front
from influx._progress import progress_iter
from influx.backends import check_model_backend
from influx.data import DataReader
from influx.errors import InputError
from influx.methods import InfluenceType
from influx.protocols import TwiceDifferentiable
from influx.solvers._base import working_dtype

__all__ = [
    "check_factors",
    "check_model",
    "check_regularization",
    "concat",
    "gradients",
    "on_host",
    "read_gradients",
    "resolve_regularization",
    "score",
    "up_blocks",
]


def check_model(model: Any) -> None:
    """Raise a TypeError unless ``model`` is a wrapped model of a known backend."""
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(
            f"model must be a twice-differentiable wrapper, got "
            f"{type(model).__module__}.{type(model).__name__}. Wrap it first: "
            "influx.twice_differentiable(model, loss) (or params=... for JAX)."
        )
    check_model_backend(model)


def resolve_regularization(regularization: Any, perturbation: Any) -> float:
    """The ``lambda`` of ``hessian_regularization`` or ``hessian_perturbation``.

    The two names mean the same; each is checked, both given must agree, and
    neither given is 0.
    """
    given = {
        name: value
        for name, value in (
            ("hessian_regularization", regularization),
            ("hessian_perturbation", perturbation),
        )
        if value is not None
    }
    for name, value in given.items():
        check_regularization(value, name)
    values = {float(value) for value in given.values()}
    if len(values) > 1:
        raise TypeError(
            f"hessian_regularization={regularization!r} and hessian_perturbation="
            f"{perturbation!r} are two names of the same lambda added to the "
            "Hessian's diagonal, given different values: pass only one."
        )
    return values.pop() if values else 0.0


def check_regularization(value: Any, name: str) -> None:
    """Raise unless ``value`` is a finite number ``>= 0``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(
            f"{name} must be a finite number >= 0, got {value!r}. Use 0 for no "
            "regularisation, or a small positive value (1e-3 to 1e-1) to make the "
            "Hessian positive definite."
        )


def check_factors(model: TwiceDifferentiable, factors: Any) -> Any:
    """``factors`` as a native ``[N, P]`` array of the model's dtype."""
    backend = model.backend
    if not backend.is_native_array(factors):
        factors = backend.asarray(factors, like=model.parameters)
    shape = tuple(factors.shape)
    if len(shape) != 2 or shape[1] != model.num_params:
        raise InputError(
            f"influence_factors must have shape [N, P] with P={model.num_params} "
            f"(the model's parameter count), got {shape}. Compute them with "
            "compute_influence_factors for this model."
        )
    xp = array_namespace(factors)
    return xp.astype(factors, model.dtype)


def gradients(
    model: TwiceDifferentiable, reader: DataReader, progress: bool, desc: str
) -> Iterator[Any]:
    """Per-sample gradients ``[B, P]``, batch by batch, checked to be finite.

    The loss convention is checked on the first batch of two points or more.
    """
    check = LossConventionCheck(model, reader.name)
    for index, x, y in progress_iter(reader, progress, desc, total=reader.num_batches):
        grads, losses = evaluate(reader.name, index, x, model.per_sample_grads, x, y)
        check(index, x, y, (grads, losses))
        ensure_finite(losses, f"{reader.name} batch {index}: the loss")
        ensure_finite(grads, f"{reader.name} batch {index}: the loss gradient")
        yield grads


def read_gradients(
    model: TwiceDifferentiable,
    data: Any,
    name: str,
    progress: bool,
    desc: str,
    *,
    host: bool = False,
) -> Any:
    """All per-sample gradients of ``data`` in its order, ``[N, P]``.

    ``host``: as numpy arrays (JAX on the CPU, for a solver in host mode).
    """
    reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
    batches = gradients(model, reader, progress, desc)
    return concat([on_host(g) for g in batches] if host else list(batches))


def concat(arrays: list[Any]) -> Any:
    """Join arrays of one namespace along axis 0."""
    return array_namespace(arrays[0]).concat(arrays, axis=0)


def on_host(array: Any) -> Any:
    """A host numpy view of a CPU JAX array (see ``influx._host``), else ``array``."""
    view = host_view(array)
    return array if view is None else view


def up_blocks(
    model: TwiceDifferentiable,
    reader: DataReader,
    factors: Any,
    progress: bool,
    desc: str,
) -> Iterator[Any]:
    """Up-weighting influences ``factors @ grads.T``, a ``[N_test, B]`` block a batch.

    On the host (numpy factors, or JAX on the CPU) the products run in numpy;
    for half-precision models the dot products over ``P`` run in float32 and
    the blocks come back in the model's dtype (float32 on the host). Every
    caller (:func:`score`, top-k) gets the same numbers from this one loop.
    """
    xp = array_namespace(factors)
    wide = working_dtype(factors)
    host_factors = host_view(factors)
    if host_factors is not None and host_factors.itemsize < 4:
        host_factors = host_factors.astype(np.float32)  # numpy: no compiles
    for grads in gradients(model, reader, progress, desc):
        if host_factors is not None:
            host_grads = on_host(grads).astype(host_factors.dtype, copy=False)
            yield host_factors @ host_grads.T
        elif wide == factors.dtype:
            yield factors @ grads.T
        else:
            block = xp.astype(factors, wide) @ xp.astype(grads, wide).T
            yield xp.astype(block, factors.dtype)


def score(
    kind: InfluenceType,
    model: TwiceDifferentiable,
    data: Any,
    influence_factors: Any,
    progress: bool,
    name: str,
    out: Any = None,
) -> Any:
    """Influences of ``kind`` of every point of ``data``, named ``name`` in errors.

    Blocks of ``[N_factors, B]`` (up) or ``[N_factors, B, *S]`` (perturbation)
    are computed batch by batch and joined along the input axis, or written
    into ``out`` as they come. ``out`` is checked against the full shape
    before the first gradient.

    Returns
    -------
    Any
        Native array ``[N_factors, M]`` or ``[N_factors, M, *S]``; ``out`` when
        given.
    """
    check_model(model)
    factors = check_factors(model, influence_factors)
    reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
    rows = int(factors.shape[0])
    check_out_up_front(out, kind is InfluenceType.Up, reader.source, rows=rows)
    sink = BlockSink(model, rows, out)
    if kind is InfluenceType.Up:
        for block in up_blocks(
            model, reader, factors, progress, "Up-weighting influences"
        ):
            sink.add(block)
    else:
        batches = progress_iter(
            reader, progress, "Perturbation influences", total=reader.num_batches
        )
        check = LossConventionCheck(model, name)
        for index, x, y in batches:
            check(index, x, y)
            block = evaluate(name, index, x, model.mixed_grads, x, y, factors)
            ensure_finite(block, f"{name} batch {index}: the perturbation influence")
            sink.add(block)
    result = sink.result()
    if out is None and isinstance(result, np.ndarray):
        result = model.backend.asarray(result, like=model.parameters)
    return result
