"""A tiny run of the MLP leave-one-out study (benchmarks/validity/loo_mlp.py).

It guards the study code against rot: a digits MLP trained in numpy to a
gradient norm below 1e-12, a few points removed and the model retrained from
the optimum, and influx's ``direct`` prediction ``I_up / N`` of each test-loss
change compared with the retrained change (an independent reference: numpy
retraining, no influx). The bar is below what was measured (0.929 and 0.931 on
the two test points, both backends) with room for platform rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "validity"))

import _mlp
import loo_mlp

DIRECT = (("direct", "direct", "hessian", {}),)


def test_loo_mlp_direct_predicts_retraining(backend_name: str) -> None:
    results = loo_mlp.study(
        [backend_name],
        n_train=60,
        n_test=30,
        hidden=4,
        n_high=1,
        n_random_test=1,
        top=4,
        n_random=6,
        methods=DIRECT,
    )
    assert results["retrain"]["max_grad_norm"] < _mlp.GTOL
    (row,) = results["methods"]
    assert row["backend"] == backend_name
    actual = np.asarray(results["actual"])
    assert np.asarray(row["predicted"]).shape == actual.shape
    assert min(row["pearson_per_test"]) > 0.85, row["pearson_per_test"]


def test_numpy_mlp_is_the_backend_model(backend_name: str) -> None:
    """The numpy network the studies retrain is the one influx sees: losses
    and the gradient Gram matrix (parameter order free) of ``_mlp`` against
    the backend's own autodiff of the wrapped model, 1e-10 relative."""
    problem = _mlp.digits(20, 5, hidden=3)
    rng = np.random.default_rng(0)
    theta = _mlp.init_theta(problem.sizes) + 0.3 * rng.standard_normal(
        problem.num_params
    )
    model = _mlp.wrap(backend_name, theta, problem.sizes)
    backend = model.backend

    def native(array: np.ndarray) -> object:
        return backend.asarray(array, like=model.parameters)

    grads_train, losses_train = model.per_sample_grads(
        native(problem.x_train), native(problem.y_train)
    )
    grads_test, _ = model.per_sample_grads(
        native(problem.x_test), native(problem.y_test)
    )
    gram = (
        np.asarray(backend.to_numpy(grads_test))
        @ np.asarray(backend.to_numpy(grads_train)).T
    )
    expected = _mlp.gradient_similarity(theta, problem, np.arange(5))
    assert np.max(np.abs(gram - expected)) <= 1e-10 * np.max(np.abs(expected))
    losses = _mlp.losses(theta, problem.sizes, problem.x_train, problem.y_train)
    assert np.allclose(backend.to_numpy(losses_train), losses, rtol=1e-12, atol=0)
