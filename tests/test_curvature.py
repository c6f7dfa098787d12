"""``curvature="ggn"``: the generalised Gauss-Newton matrix for every flat method.

References are dense float64 Gauss-Newton matrices ``sum_b J_b^T H_b J_b``
built from the framework's own Jacobian of the network's outputs and output
Hessians written out by hand (``tests/models.py: batch_ggn``), independent of
the adapters' ``ggnvp``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from models import batch_ggn, batch_hessian, mlp_weights, to_numpy, wrap_mlp

import influx
from influx.solvers import DirectSolver

SIZES = (3, 5, 3)
N, BATCH = 23, 7  # uneven: 7, 7, 7, 2
LAM = 0.1


def _data(loss: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, SIZES[0]))
    if loss == "mse":
        return x, rng.standard_normal((count, SIZES[-1]))
    return x, rng.integers(0, SIZES[-1], size=count)


def _ggn_model(backend_name: str, loss: str, dtype: str = "float64") -> Any:
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=2), loss, dtype)
    if not callable(getattr(model, "ggnvp", None)):
        pytest.skip(f"the {backend_name} adapter has no ggnvp")
    return model


def _dense_ggn(model: Any, x: np.ndarray, loss: str) -> np.ndarray:
    """The training set's Gauss-Newton matrix, batches weighted by their size."""
    total = np.zeros((model.num_params, model.num_params))
    for start in range(0, len(x), BATCH):
        part = x[start : start + BATCH]
        total += len(part) * batch_ggn(model, part, loss)
    return total / len(x)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_operator_equals_dense_reference(backend_name: str, loss: str) -> None:
    model = _ggn_model(backend_name, loss)
    x, y = _data(loss, N, seed=0)
    train = influx.batches(x, y, batch_size=BATCH)
    operator = influx.HessianOperator(model, train, curvature="ggn")
    expected = _dense_ggn(model, x, loss)
    dense = to_numpy(operator.to_dense())
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-12)
    vectors = np.random.default_rng(1).standard_normal((4, model.num_params))
    native = model.backend.asarray(vectors, like=model.parameters)
    np.testing.assert_allclose(
        to_numpy(operator.mv(native)), vectors @ expected, rtol=0, atol=1e-12
    )
    # The Gauss-Newton matrix of a convex loss is positive semi-definite.
    assert np.linalg.eigvalsh(expected).min() > -1e-12


@pytest.mark.parametrize("method", ["direct", "cg", "arnoldi"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_influences_equal_dense_reference(
    backend_name: str, loss: str, method: str
) -> None:
    model = _ggn_model(backend_name, loss)
    x, y = _data(loss, N, seed=0)
    xt, yt = _data(loss, 5, seed=1)
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(xt, yt, batch_size=3)
    options: dict[str, Any] = {
        "cg": {"rtol": 1e-12, "atol": 0.0},
        "arnoldi": {"rank_estimate": model.num_params},
    }.get(method, {})
    inf = influx.Influence(model, method, LAM, curvature="ggn", **options).fit(train)
    assert inf.curvature == "ggn"
    scores = to_numpy(inf.influences(test))
    matrix = _dense_ggn(model, x, loss) + LAM * np.eye(model.num_params)
    test_grads = to_numpy(model.per_sample_grads(*_native(model, xt, yt))[0])
    train_grads = to_numpy(model.per_sample_grads(*_native(model, x, y))[0])
    expected = np.linalg.solve(matrix, test_grads.T).T @ train_grads.T
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-10)


def test_ggn_equals_hessian_for_linear_mse(backend_name: str) -> None:
    """A linear model with squared error: the Gauss-Newton matrix is the Hessian."""
    model = _ggn_model(backend_name, "mse")
    linear = wrap_mlp(backend_name, mlp_weights((3, 2), seed=4), "mse")
    x, y = _data("mse", N, seed=0)
    y = y[:, :2]
    train = influx.batches(x, y, batch_size=BATCH)
    ggn = to_numpy(influx.HessianOperator(linear, train, curvature="ggn").to_dense())
    exact = to_numpy(influx.HessianOperator(linear, train).to_dense())
    np.testing.assert_allclose(ggn, exact, rtol=0, atol=1e-12)
    # and the MLP's is not (the network's second derivatives are left out)
    xs, ys = x[:BATCH], _data("mse", BATCH, seed=0)[1]
    native = _native(model, xs, ys)
    assert not np.allclose(batch_ggn(model, xs, "mse"), batch_hessian(model, *native))


def test_seed_functions_take_curvature(backend_name: str) -> None:
    model = _ggn_model(backend_name, "cross_entropy")
    x, y = _data("cross_entropy", N, seed=0)
    train = influx.batches(x, y, batch_size=BATCH)
    expected = influx.Influence(model, "direct", LAM, curvature="ggn").fit(train)
    scores = influx.compute_influences(
        model, train, hessian_regularization=LAM, curvature="ggn"
    )
    np.testing.assert_allclose(
        to_numpy(scores), to_numpy(expected.influences(train)), rtol=1e-10, atol=1e-12
    )
    factors = influx.compute_influence_factors(
        model, train, train, "direct", hessian_perturbation=LAM, curvature="ggn"
    )
    np.testing.assert_allclose(
        to_numpy(factors), to_numpy(expected.factors(train)), rtol=1e-10, atol=1e-12
    )
    hessian = influx.compute_influences(model, train, hessian_regularization=LAM)
    assert not np.allclose(to_numpy(hessian), to_numpy(scores))


def test_ggn_in_float32(backend_name: str) -> None:
    model = _ggn_model(backend_name, "cross_entropy", "float32")
    reference = _ggn_model(backend_name, "cross_entropy", "float64")
    x, y = _data("cross_entropy", N, seed=0)
    train = influx.batches(x.astype(np.float32), y, batch_size=BATCH)
    dense = to_numpy(influx.HessianOperator(model, train, curvature="ggn").to_dense())
    expected = _dense_ggn(reference, x, "cross_entropy")
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-5)


def test_save_and_load_keep_the_curvature(backend_name: str, tmp_path: Any) -> None:
    model = _ggn_model(backend_name, "mse")
    x, y = _data("mse", N, seed=0)
    train = influx.batches(x, y, batch_size=BATCH)
    inf = influx.Influence(model, "direct", LAM, curvature="ggn").fit(train)
    inf.save(tmp_path / "ggn.npz")
    loaded = influx.Influence.load(tmp_path / "ggn.npz", model, train)
    assert loaded.curvature == "ggn"
    np.testing.assert_allclose(
        to_numpy(loaded.influences(train)), to_numpy(inf.influences(train)), rtol=1e-12
    )


# -- errors --------------------------------------------------------------------


def test_unknown_curvature_is_an_error(backend_name: str) -> None:
    model = wrap_mlp(backend_name, mlp_weights(SIZES), "mse")
    with pytest.raises(influx.InputError, match="curvature must be 'hessian' or 'ggn'"):
        influx.Influence(model, "direct", curvature="fisher")


def test_ggn_without_ggnvp_is_an_error(backend_name: str) -> None:
    model = wrap_mlp(backend_name, mlp_weights(SIZES), "mse")

    class NoGgn:  # the protocol's methods only
        backend = model.backend
        num_params = model.num_params
        dtype = model.dtype
        parameters = model.parameters
        per_sample_grads = model.per_sample_grads
        hvp = model.hvp
        mixed_grads = model.mixed_grads

    with pytest.raises(influx.InputError, match="has no ggnvp"):
        influx.Influence(NoGgn(), "direct", curvature="ggn")


def test_solver_of_its_own_curvature_refuses_another(backend_name: str) -> None:
    model = wrap_mlp(backend_name, mlp_weights(SIZES), "mse")

    class GaussNewtonOnly(DirectSolver):
        name = "gn-only"
        curvature = "ggn"

    inf = influx.Influence(model, GaussNewtonOnly())
    assert inf.curvature == "ggn"
    with pytest.raises(influx.InputError, match="approximates the 'ggn' curvature"):
        influx.Influence(model, GaussNewtonOnly(), curvature="hessian")


def _native(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    backend, theta = model.backend, model.parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return backend.asarray(x, like=theta), backend.asarray(y)
