"""torch and JAX agree on the same weights, for every inversion method.

The same numpy weights (``mlp_weights``) are wrapped on both frameworks
(``wrap_mlp``). The flat parameter vectors are ordered differently: torch
flattens ``weight`` then ``bias`` of each layer, JAX's ``ravel_pytree`` flattens
each layer's ``{"b", "w"}`` dict in key order, ``b`` then ``w``. Factors (and
Hessians, gradients) are compared after mapping the JAX order onto torch's;
influences and factor row norms do not depend on the order.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import pytest
from models import batch_hessian, mlp_weights, to_numpy, wrap_mlp

import influx

pytestmark = pytest.mark.cross

SIZES = (3, 4, 3)
P = 3 * 4 + 4 + 4 * 3 + 3
N, BATCH = 29, 8  # training batches 8, 8, 8, 5
T, TEST_BATCH = 5, 3
MARGIN = 0.5  # smallest eigenvalue of H + lambda I
LOSSES = ["mse", "cross_entropy"]
RTOL = 1e-8

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "direct": ("direct", {}),
    "cg": ("cg", {"rtol": 1e-12, "atol": 0.0}),
    "arnoldi_full": ("arnoldi", {"rank_estimate": P}),
    "arnoldi_low": ("arnoldi", {"rank_estimate": 8, "tol": 1e-12}),
    # scale is filled in per problem, so both backends run the same recursion
    "lissa": ("lissa", {"maxiter": 500, "seed": 3}),
}


def torch_order_index(layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``idx`` with ``theta_jax[idx] == theta_torch``."""
    index, offset = [], 0
    for w, b in layers:
        n_w, n_b = w.size, b.size
        # JAX: [b (n_b), w (n_w)]; torch: [w, b]
        index.extend(range(offset + n_b, offset + n_b + n_w))
        index.extend(range(offset, offset + n_b))
        offset += n_w + n_b
    return np.asarray(index)


LAYERS = mlp_weights(SIZES, seed=7)
ORDER = torch_order_index(LAYERS)


@functools.cache
def problem(loss: str) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    x, x_test = rng.standard_normal((N, 3)), rng.standard_normal((T, 3))
    if loss == "mse":
        y, y_test = rng.standard_normal((N, 3)), rng.standard_normal((T, 3))
    else:
        y, y_test = rng.integers(0, 3, N), rng.integers(0, 3, T)
    model = model_for("torch", loss)
    hessian = batch_hessian(model, x, y)
    eigenvalues = np.linalg.eigvalsh(hessian)
    lam = float(max(0.0, -eigenvalues[0]) + MARGIN)
    return {
        "x": x,
        "y": y,
        "x_test": x_test,
        "y_test": y_test,
        "lam": lam,
        "scale": 1.6 * float(eigenvalues[-1] + lam),
    }


def to_torch_order(
    array: np.ndarray, backend_name: str, axes: tuple[int, ...]
) -> np.ndarray:
    if backend_name == "torch":
        return array
    for axis in axes:
        array = np.take(array, ORDER, axis=axis)
    return array


@functools.cache  # a JAX wrapper compiles once per instance: share them
def model_for(backend_name: str, loss: str) -> influx.TwiceDifferentiable:
    return wrap_mlp(backend_name, LAYERS, loss=loss)


@functools.cache
def results(backend_name: str, loss: str, key: str) -> dict[str, np.ndarray]:
    p = problem(loss)
    model = model_for(backend_name, loss)
    train = influx.batches(p["x"], p["y"], batch_size=BATCH)
    test = influx.batches(p["x_test"], p["y_test"], batch_size=TEST_BATCH)
    method, options = METHODS[key] if key != "lissa_auto" else METHODS["lissa"]
    if key == "lissa":
        options = {**options, "scale": p["scale"]}
    with warnings.catch_warnings():
        # LiSSA's 500 stochastic steps do not meet its rtol; that is expected.
        warnings.simplefilter("ignore", influx.NotConvergedWarning)
        factors, info = influx.compute_influence_factors(
            model,
            train,
            test,
            method,
            hessian_perturbation=p["lam"],
            return_info=True,
            **options,
        )
    return {
        "factors": to_torch_order(to_numpy(factors), backend_name, (1,)),
        "up": to_numpy(influx.compute_influences_up(model, train, factors)),
        "pert": to_numpy(influx.compute_influences_pert(model, train, factors)),
        "residual_norms": info.residual_norms,
        "converged": info.converged,
    }


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_parameter_layouts_map_onto_each_other():
    torch_model = wrap_mlp("torch", LAYERS)
    jax_model = wrap_mlp("jax", LAYERS)
    theta_torch = to_numpy(torch_model.parameters)
    theta_jax = to_numpy(jax_model.parameters)
    assert theta_torch.shape == theta_jax.shape == (P,)
    assert not np.array_equal(theta_torch, theta_jax)  # the orders do differ
    np.testing.assert_array_equal(theta_jax[ORDER], theta_torch)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_and_hessian_agree(loss):
    p = problem(loss)
    out = {}
    for name in ("torch", "jax"):
        model = model_for(name, loss)

        def native(a: np.ndarray, model: Any = model) -> Any:
            return model.backend.asarray(a, like=model.parameters)

        grads, losses = model.per_sample_grads(native(p["x"]), native(p["y"]))
        hessian = influx.HessianOperator(
            model, influx.batches(p["x"], p["y"], batch_size=BATCH)
        ).to_dense()
        out[name] = {
            "grads": to_torch_order(to_numpy(grads), name, (1,)),
            "losses": to_numpy(losses),
            "hessian": to_torch_order(to_numpy(hessian), name, (0, 1)),
        }
    for field in ("grads", "losses", "hessian"):
        assert rel_err(out["jax"][field], out["torch"][field]) < 1e-12, field


@pytest.mark.parametrize("key", list(METHODS))
@pytest.mark.parametrize("loss", LOSSES)
def test_influences_agree(loss, key):
    a, b = results("torch", loss, key), results("jax", loss, key)
    assert rel_err(b["factors"], a["factors"]) < RTOL
    assert rel_err(b["up"], a["up"]) < RTOL
    assert rel_err(b["pert"], a["pert"]) < RTOL
    norms_a = np.linalg.norm(a["factors"], axis=1)
    norms_b = np.linalg.norm(b["factors"], axis=1)
    assert rel_err(norms_b, norms_a) < RTOL
    np.testing.assert_array_equal(a["converged"], b["converged"])
    np.testing.assert_allclose(
        b["residual_norms"], a["residual_norms"], rtol=1e-6, atol=1e-12
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_lissa_auto_scale_agrees_closely(loss):
    """With ``scale=None`` the power iteration's random start vector is drawn
    in each backend's own parameter order, so the two scales (and then the
    iterates) differ slightly; the results still agree to 1%.
    """
    a, b = results("torch", loss, "lissa_auto"), results("jax", loss, "lissa_auto")
    for field in ("factors", "up", "pert"):
        assert rel_err(b[field], a[field]) < 1e-2, field
    # And both are near the exact solve, whose cross-backend agreement is tight.
    exact = results("torch", loss, "direct")
    for field in ("up", "pert"):
        assert rel_err(a[field], exact[field]) < 0.1, field
