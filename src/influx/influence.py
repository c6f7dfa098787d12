"""Influence functions (Koh and Liang, 2017) on any backend.

With the training loss ``L(theta) = (1/N) sum_i l(z_i, theta)`` and the
regularised Hessian ``H = hessian(L) + lambda I``:

- influence factors: ``s_test = H^{-1} grad_theta l(z_test)``, ``[N_test, P]``;
- up-weighting influence: ``I_up(z_test, z) = <s_test, grad_theta l(z)>``,
  ``[N_test, M]``; positive means that up-weighting ``z`` lowers the test loss
  (Koh and Liang's ``I_up,loss`` is its negative);
- perturbation influence: ``I_pert(z_test, z) = grad_x <s_test, grad_theta
  l(z)>``, ``[N_test, M, *input_shape]``.

Results are native arrays of the model's framework.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from influx._checks import ensure_finite, evaluate
from influx._host import computes_on_host, host_view
from influx._loss_check import LossConventionCheck
from influx._output import BlockSink, check_out_up_front
from influx._progress import progress_iter
from influx.backends import check_model_backend
from influx.data import DataReader
from influx.errors import InputError
from influx.methods import (
    InfluenceType,
    InversionMethod,
    parse_influence_type,
    parse_inversion_method,
)
from influx.operators import HessianOperator
from influx.protocols import TwiceDifferentiable
from influx.solvers import make_solver
from influx.solvers._base import working_dtype

__all__ = [
    "compute_influence_factors",
    "compute_influences",
    "compute_influences_pert",
    "compute_influences_up",
]


def compute_influence_factors(
    model: TwiceDifferentiable,
    training_data: Any,
    test_data: Any,
    inversion_method: InversionMethod | str,
    *,
    hessian_perturbation: float | None = None,
    progress: bool = False,
    return_info: bool = False,
    hessian_regularization: float | None = None,
    **kwargs: Any,
) -> Any:
    r"""Influence factors ``s_test = (H + lambda I)^{-1} grad l(z_test)``.

    Parameters
    ----------
    model
        A wrapped model (:func:`influx.twice_differentiable`).
    training_data
        Re-iterable of ``(x, y)`` batches; the Hessian averages over all of
        its points.
    test_data
        Re-iterable of ``(x, y)`` batches, ``N_test`` points in all.
    inversion_method
        ``"direct"``, ``"cg"``, ``"lissa"`` or ``"arnoldi"`` (or an
        :class:`InversionMethod`).
    hessian_perturbation
        ``lambda >= 0`` added to the Hessian's diagonal (default 0).
    progress
        Show progress bars.
    hessian_regularization
        The same ``lambda`` under the name :func:`compute_influences` uses;
        pass one of the two.
    return_info
        Also return the solver's :class:`~influx.solvers.SolveInfo`.
    **kwargs
        Options of the inversion method: CG ``rtol, atol, maxiter, x0,
        preconditioner``; LiSSA ``maxiter, dampen, scale, h0, rtol, seed,
        variance_reduction, preconditioner``; Arnoldi ``rank_estimate,
        krylov_dimension, tol, max_iter, eigensolver, remainder, seed``.

    Returns
    -------
    Any
        Native array ``[N_test, P]``; with ``return_info``, the pair
        ``(factors, info)``.

    Raises
    ------
    TypeError
        If ``model`` is not wrapped, an option is unknown, or both names of
        ``lambda`` are given with different values.
    ValueError
        On bad data, a negative ``hessian_perturbation`` or an unknown method.
    """
    _check_model(model)
    hessian_perturbation = _resolve_regularization(
        hessian_regularization, hessian_perturbation
    )
    solver = make_solver(parse_inversion_method(inversion_method), **kwargs)
    # JAX on the CPU: the solver's small steps run in numpy (nothing to compile).
    host = computes_on_host(model.parameters)
    operator = HessianOperator(model, training_data, progress=progress, host=host)
    # When the test points default to the training data, errors name the
    # argument the user actually passed.
    test_name = "training_data" if test_data is training_data else "test_data"
    test_reader = DataReader(
        test_data, test_name, model.backend, model.parameters, ordered=True
    )
    gradients = _gradients(model, test_reader, progress, "Test gradients")
    rhs = _concat([_on_host(g) for g in gradients] if host else list(gradients))
    state = solver.init(
        operator.shift(hessian_perturbation),
        model=model,
        training_data=training_data,
        progress=progress,
    )
    factors, info = solver.solve(state, rhs, progress=progress)
    if host:
        factors = model.backend.asarray(factors, like=model.parameters)
    return (factors, info) if return_info else factors


def compute_influences_up(
    model: TwiceDifferentiable,
    input_data: Any,
    influence_factors: Any,
    *,
    progress: bool = False,
    out: Any = None,
) -> Any:
    """Up-weighting influences ``<s_test, grad l(z)>`` of every input point.

    The input gradients are computed batch by batch and never held all at
    once: memory is ``O(N_factors * M + B * P)``, or ``O(N_factors * B + B *
    P)`` when the result goes to ``out``.

    Parameters
    ----------
    model
        A wrapped model.
    input_data
        Re-iterable of ``(x, y)`` batches, ``M`` points in all.
    influence_factors
        ``[N_factors, P]``, from :func:`compute_influence_factors`.
    progress
        Show a progress bar.
    out
        Optional host array ``[N_factors, M]`` that takes the result block by
        block (``out[:, i:j] = block``): a numpy array, a ``numpy.memmap`` or
        a zarr array, so that the result never has to fit in memory.

    Returns
    -------
    Any
        Native array ``[N_factors, M]``, or ``out`` when given.
    """
    return _influences(
        InfluenceType.Up,
        model,
        input_data,
        influence_factors,
        progress,
        "input_data",
        out,
    )


def compute_influences_pert(
    model: TwiceDifferentiable,
    input_data: Any,
    influence_factors: Any,
    *,
    progress: bool = False,
    out: Any = None,
) -> Any:
    """Perturbation influences ``grad_x <s_test, grad_theta l(z)>``.

    Parameters
    ----------
    model
        A wrapped model.
    input_data
        Re-iterable of ``(x, y)`` batches, ``M`` points of shape ``S``.
    influence_factors
        ``[N_factors, P]``.
    progress
        Show a progress bar.
    out
        Optional host array ``[N_factors, M, *S]`` that takes the result
        block by block (see :func:`compute_influences_up`).

    Returns
    -------
    Any
        Native array ``[N_factors, M, *S]``, or ``out`` when given.
    """
    return _influences(
        InfluenceType.Perturbation,
        model,
        input_data,
        influence_factors,
        progress,
        "input_data",
        out,
    )


def _influences(
    kind: InfluenceType,
    model: TwiceDifferentiable,
    data: Any,
    influence_factors: Any,
    progress: bool,
    name: str,
    out: Any = None,
) -> Any:
    """Influences of ``kind``, naming the data ``name`` in errors.

    Blocks of ``[N_factors, B]`` (up) or ``[N_factors, B, *S]`` (perturbation)
    are computed batch by batch and joined along the input axis, or written
    into ``out`` as they come.
    """
    _check_model(model)
    factors = _check_factors(model, influence_factors)
    reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
    rows = int(factors.shape[0])
    check_out_up_front(out, kind is InfluenceType.Up, reader.source, rows=rows)
    sink = BlockSink(model, rows, out)
    if kind is InfluenceType.Up:
        desc = "Up-weighting influences"
        # Half-precision models: the dot products over P run in float32.
        xp = array_namespace(factors)
        wide = working_dtype(factors)
        host_factors = host_view(factors)
        if host_factors is not None and host_factors.itemsize < 4:
            host_factors = host_factors.astype(np.float32)  # numpy: no compiles
        for grads in _gradients(model, reader, progress, desc):
            if host_factors is not None:
                host_grads = _on_host(grads).astype(host_factors.dtype, copy=False)
                sink.add(host_factors @ host_grads.T)
            elif wide == factors.dtype:
                sink.add(factors @ grads.T)
            else:
                block = xp.astype(factors, wide) @ xp.astype(grads, wide).T
                sink.add(xp.astype(block, factors.dtype))
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


def _on_host(array: Any) -> Any:
    """A host numpy view of a CPU JAX array (see ``influx._host``)."""
    view = host_view(array)
    return array if view is None else view


def compute_influences(
    differentiable_model: TwiceDifferentiable,
    training_data: Any,
    *,
    test_data: Any = None,
    input_data: Any = None,
    inversion_method: InversionMethod | str = InversionMethod.Direct,
    influence_type: InfluenceType | str = InfluenceType.Up,
    hessian_regularization: float | None = None,
    progress: bool = False,
    out: Any = None,
    hessian_perturbation: float | None = None,
    **kwargs: Any,
) -> Any:
    """Influence of every input point on every test point.

    Parameters
    ----------
    differentiable_model
        A wrapped model (:func:`influx.twice_differentiable`).
    training_data
        Re-iterable of ``(x, y)`` batches the Hessian averages over.
    test_data
        Points whose loss is explained; defaults to ``training_data``.
    input_data
        Points whose influence is computed; defaults to ``training_data``.
    inversion_method
        ``"direct"`` (default), ``"cg"``, ``"lissa"`` or ``"arnoldi"``.
    influence_type
        ``"up"`` (default) or ``"perturbation"``.
    hessian_regularization
        ``lambda >= 0`` added to the Hessian's diagonal (default 0).
    progress
        Show progress bars.
    hessian_perturbation
        The same ``lambda`` under the name :func:`compute_influence_factors`
        uses; pass one of the two.
    out
        Optional host array (numpy, ``numpy.memmap``, zarr) of the result's
        shape that takes it block by block, so that a result larger than
        memory streams to disk; it is returned.
    **kwargs
        Options of the inversion method (see
        :func:`compute_influence_factors`).

    Returns
    -------
    Any
        Native array ``[N_test, M]`` for ``"up"``, ``[N_test, M, *S]`` for
        ``"perturbation"``; ``out`` when given.

    Examples
    --------
    >>> model = influx.twice_differentiable(torch_module, loss)  # doctest: +SKIP
    >>> data = influx.batches(x_train, y_train, batch_size=64)  # doctest: +SKIP
    >>> influx.compute_influences(model, data, inversion_method="cg")  # doctest: +SKIP
    """
    kind = parse_influence_type(influence_type)
    method = parse_inversion_method(inversion_method)
    hessian_regularization = _resolve_regularization(
        hessian_regularization, hessian_perturbation
    )
    if "return_info" in kwargs:
        raise TypeError(
            "return_info is an argument of compute_influence_factors, not of "
            "compute_influences: call compute_influence_factors(..., "
            "return_info=True) for the solver's info."
        )
    check_out_up_front(
        out,
        kind is InfluenceType.Up,
        training_data if input_data is None else input_data,
        test_data=training_data if test_data is None else test_data,
    )
    factors = compute_influence_factors(
        differentiable_model,
        training_data,
        training_data if test_data is None else test_data,
        method,
        hessian_perturbation=hessian_regularization,
        progress=progress,
        **kwargs,
    )
    data = training_data if input_data is None else input_data
    name = "training_data" if data is training_data else "input_data"
    return _influences(kind, differentiable_model, data, factors, progress, name, out)


def _gradients(
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


def _concat(arrays: list[Any]) -> Any:
    return array_namespace(arrays[0]).concat(arrays, axis=0)


def _check_model(model: Any) -> None:
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(
            f"model must be a twice-differentiable wrapper, got "
            f"{type(model).__module__}.{type(model).__name__}. Wrap it first: "
            "influx.twice_differentiable(model, loss) (or params=... for JAX)."
        )
    check_model_backend(model)


def _resolve_regularization(regularization: Any, perturbation: Any) -> float:
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
        _check_regularization(value, name)
    values = {float(value) for value in given.values()}
    if len(values) > 1:
        raise TypeError(
            f"hessian_regularization={regularization!r} and hessian_perturbation="
            f"{perturbation!r} are two names of the same lambda added to the "
            "Hessian's diagonal, given different values: pass only one."
        )
    return values.pop() if values else 0.0


def _check_regularization(value: Any, name: str) -> None:
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


def _check_factors(model: TwiceDifferentiable, factors: Any) -> Any:
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
