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

These are the seed's functions, kept as a compatible layer over
:class:`influx.Influence`: :func:`compute_influence_factors` and
:func:`compute_influences` build and fit one per call (the test gradients
computed before the solver's setup, as the seed did, so that errors in the test
data come first), and :func:`compute_influences_up` and
:func:`compute_influences_pert` run its scoring loop (``influx._scoring``) on
the factors given. Fit an :class:`influx.Influence` to query the same training
data more than once.
"""

from __future__ import annotations

from typing import Any

from influx._output import check_out_up_front
from influx._scoring import check_model, resolve_regularization, score
from influx.attribution import Influence
from influx.methods import (
    InfluenceType,
    InversionMethod,
    parse_influence_type,
    parse_inversion_method,
)
from influx.protocols import TwiceDifferentiable
from influx.solvers import SOLVERS, Solver

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
    curvature: str | None = None,
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
        ``"direct"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"block"``,
        ``"kfac"`` or ``"ekfac"`` (or an :class:`InversionMethod`), or a
        name given to :func:`influx.register_solver`.
    hessian_perturbation
        ``lambda >= 0`` added to the Hessian's diagonal (default 0).
    progress
        Show progress bars.
    hessian_regularization
        The same ``lambda`` under the name :func:`compute_influences` uses;
        pass one of the two.
    return_info
        Also return the solver's :class:`~influx.solvers.SolveInfo`.
    curvature
        ``"hessian"`` (default) or ``"ggn"``, the generalised Gauss-Newton
        matrix (see :class:`influx.Influence`).
    **kwargs
        Options of the inversion method: CG ``rtol, atol, maxiter, x0,
        preconditioner, block``; LiSSA ``maxiter, dampen, scale, h0, rtol,
        seed, variance_reduction, preconditioner``; Arnoldi ``rank_estimate,
        krylov_dimension, tol, max_iter, eigensolver, remainder, seed``;
        K-FAC and EK-FAC ``fisher, mc_samples, seed``; block none.

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
    check_model(model)
    regularization = resolve_regularization(
        hessian_regularization, hessian_perturbation
    )
    inf = _influence(
        model, inversion_method, regularization, progress, kwargs, curvature
    )
    factors, info = inf._solve(*inf._fitted_rhs(training_data, test_data))
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
    return score(
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
    kind = InfluenceType.Perturbation
    return score(
        kind, model, input_data, influence_factors, progress, "input_data", out
    )


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
    curvature: str | None = None,
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
        ``"direct"`` (default), ``"cg"``, ``"lissa"``, ``"arnoldi"``,
        ``"block"``, ``"kfac"`` or ``"ekfac"`` (see
        :func:`compute_influence_factors`).
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
    curvature
        ``"hessian"`` (default) or ``"ggn"``, the generalised Gauss-Newton
        matrix (see :class:`influx.Influence`).
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
    method = _resolve_method(inversion_method)
    regularization = resolve_regularization(
        hessian_regularization, hessian_perturbation
    )
    if "return_info" in kwargs:
        raise TypeError(
            "return_info is an argument of compute_influence_factors, not of "
            "compute_influences: call compute_influence_factors(..., "
            "return_info=True) for the solver's info."
        )
    test = training_data if test_data is None else test_data
    data = training_data if input_data is None else input_data
    check_out_up_front(out, kind is InfluenceType.Up, data, test_data=test)
    check_model(differentiable_model)
    inf = _influence(
        differentiable_model, method, regularization, progress, kwargs, curvature
    )
    factors, _ = inf._solve(*inf._fitted_rhs(training_data, test))
    name = "training_data" if data is training_data else "input_data"
    return inf._score(kind, data, name, factors, out)


def _influence(
    model: TwiceDifferentiable,
    method: InversionMethod | str,
    regularization: float,
    progress: bool,
    options: dict[str, Any],
    curvature: str | None = None,
) -> Influence:
    """The :class:`influx.Influence` a seed function runs on (not fitted yet).

    ``method`` is a built-in name, a name given to :func:`influx.register_solver`
    or a solver instance.
    """
    return Influence(
        model,
        _resolve_method(method),
        regularization,
        curvature=curvature,
        progress=progress,
        **options,
    )


def _resolve_method(method: InversionMethod | str | Solver) -> Any:
    """``method`` checked: a solver instance, a registered name or a built-in one.

    Raises
    ------
    InputError
        For a name that is neither built in nor registered.
    """
    registered = isinstance(method, str) and method.strip().lower() in SOLVERS
    if registered or isinstance(method, Solver):
        return method
    return parse_inversion_method(method)
