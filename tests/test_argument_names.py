"""One regularisation, two names: both functions accept both.

``compute_influences`` calls ``lambda`` ``hessian_regularization`` and
``compute_influence_factors`` calls it ``hessian_perturbation`` (the seed's
names); each function accepts the other's name too, refuses both with
different values, and a top-level argument passed where a solver option goes
is named as such.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import batch_hessian, linear_weights, to_numpy, wrap_mlp

import influx
from influx.solvers import make_solver

IN_DIM, OUT_DIM = 3, 2
LAYERS = [linear_weights(IN_DIM, OUT_DIM)]
LAM = 0.3


@pytest.fixture
def problem(backend_name: str) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """``(model, data, factors, influences)`` with dense float64 references."""
    model = wrap_mlp(backend_name, LAYERS)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, IN_DIM)), rng.standard_normal((10, OUT_DIM))
    like = model.parameters
    xs, ys = model.backend.asarray(x, like=like), model.backend.asarray(y, like=like)
    hessian = batch_hessian(model, x, y)  # the mean loss over all 10 points
    grads = to_numpy(model.per_sample_grads(xs, ys)[0])
    factors = np.linalg.solve(hessian + LAM * np.eye(model.num_params), grads.T).T
    return model, influx.batches(x, y, batch_size=4), factors, factors @ grads.T


def test_compute_influences_takes_hessian_perturbation(problem: Any) -> None:
    model, data, _, expected = problem
    for name in ("hessian_perturbation", "hessian_regularization"):
        result = influx.compute_influences(model, data, **{name: LAM})
        np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-10)
    both = influx.compute_influences(
        model, data, hessian_regularization=LAM, hessian_perturbation=LAM
    )
    np.testing.assert_allclose(to_numpy(both), expected, rtol=1e-10)


def test_compute_influence_factors_takes_hessian_regularization(problem: Any) -> None:
    model, data, expected, _ = problem
    for name in ("hessian_regularization", "hessian_perturbation"):
        for method in ("direct", "cg"):
            factors = influx.compute_influence_factors(
                model, data, data, method, **{name: LAM}
            )
            np.testing.assert_allclose(to_numpy(factors), expected, rtol=1e-8)


def test_both_names_with_different_values_are_refused(problem: Any) -> None:
    model, data, _, _ = problem
    message = (
        r"hessian_regularization=0\.3 and hessian_perturbation=0\.1 are two names "
        r"of the same lambda .*pass only one"
    )
    with pytest.raises(TypeError, match=message):
        influx.compute_influences(
            model, data, hessian_regularization=LAM, hessian_perturbation=0.1
        )
    with pytest.raises(TypeError, match=message):
        influx.compute_influence_factors(
            model,
            data,
            data,
            "direct",
            hessian_regularization=LAM,
            hessian_perturbation=0.1,
        )


def test_a_bad_value_is_named_by_the_name_used(problem: Any) -> None:
    model, data, _, _ = problem
    with pytest.raises(influx.InputError, match="hessian_perturbation must be"):
        influx.compute_influences(model, data, hessian_perturbation=-1.0)
    with pytest.raises(influx.InputError, match="hessian_regularization must be"):
        influx.compute_influence_factors(
            model, data, data, "cg", hessian_regularization=float("nan")
        )


def test_top_level_arguments_passed_as_solver_options_are_named(problem: Any) -> None:
    model, data, _, _ = problem
    with pytest.raises(
        TypeError,
        match=r"Unknown option 'hessian_regularization' for inversion method 'cg'\. "
        r"Valid options: .*'hessian_regularization' is not a solver option but an "
        r"argument of compute_influences and compute_influence_factors",
    ):
        make_solver("cg", hessian_regularization=LAM)
    with pytest.raises(
        TypeError,
        match=r"'influence_type' is not a solver option but an argument of "
        r"compute_influences: pass it there",
    ):
        influx.compute_influence_factors(
            model, data, data, "direct", influence_type="up"
        )
    with pytest.raises(TypeError, match=r"'out' is not a solver option"):
        influx.compute_influence_factors(model, data, data, "cg", out=np.zeros(2))
    with pytest.raises(
        TypeError, match=r"return_info is an argument of compute_influence_factors"
    ):
        influx.compute_influences(model, data, return_info=True)
