"""Generalised Gauss-Newton products and probes, on every backend that has them.

The reference is a dense ``J^T H_out J`` in float64 numpy: ``J`` from the
framework's ``jacrev`` of the model outputs in ``theta`` (a full Jacobian, not
influx's products) and ``H_out`` in closed form (squared error: ``2 / (B C) I``;
cross-entropy: ``(diag(p) - p p^T) / B`` per point). Tolerances: 1e-10 relative
in float64, 1e-5 in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import linear_weights, mlp_weights, to_backend, to_numpy, wrap_mlp

from influx.layers import LayerLayout, flat_gradients, has_layers

B, IN, OUT = 5, 3, 4
#: The square roots themselves: cross-entropy's output Hessian is singular (its
#: rows sum to 0), and the square root of an eigenvalue computed as +-1e-17
#: instead of 0 is up to 3e-9, so R_n agrees to about sqrt(machine epsilon).
#: Their products (the GGN) are compared to 1e-10.
ROOT_TOL = 1e-7
SIZES = (IN, 6, 5, OUT)


def _data(loss: str, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, IN)).astype(dtype)
    if loss == "mse":
        return x, rng.standard_normal((B, OUT)).astype(dtype)
    return x, rng.integers(0, OUT, B)


def _model(backend_name: str, loss: str, dtype: str = "float64") -> Any:
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=2), loss, dtype)
    if not hasattr(model, "ggnvp"):
        pytest.skip(f"the {backend_name} adapter has no ggnvp")
    return model


def _jacobian(model: Any, x: Any) -> np.ndarray:
    """``J [B * C, P]`` of the outputs in ``theta``, float64."""
    theta = model.parameters
    if model.backend.name == "torch":
        from torch.func import functional_call, jacrev

        def outputs(t: Any) -> Any:
            params = {**model._constants, **model._unflatten(t)}
            return functional_call(model.model, params, (x,))

        with model._eval_mode():
            jac = jacrev(outputs)(theta)
    else:
        import jax

        jac = jax.jacrev(lambda t: model.apply_fn(model._unravel(t), x))(theta)
    return to_numpy(jac).reshape(-1, model.num_params)


def _output_hessians(predictions: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """Per-sample ``H_n [B, C, C]`` of ``l(f_n, y_n)``, closed form."""
    count, size = predictions.shape
    if loss == "mse":
        return np.broadcast_to(2.0 / size * np.eye(size), (count, size, size))
    shifted = predictions - predictions.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])


def _predictions(model: Any, x: Any) -> np.ndarray:
    if model.backend.name == "torch":
        with model._eval_mode():
            return to_numpy(model.model(x))
    return to_numpy(model.apply_fn(model.params, x))


def _dense_ggn(model: Any, x: Any, y: np.ndarray, loss: str) -> np.ndarray:
    """``J^T H_out J`` of the batch-mean loss, ``[P, P]`` float64."""
    jac = _jacobian(model, x).reshape(B, OUT, -1)
    hessians = _output_hessians(_predictions(model, x), y, loss)
    return np.einsum("bcp,bcd,bdq->pq", jac, hessians, jac) / B


def _rel(actual: Any, expected: np.ndarray) -> float:
    actual = to_numpy(actual)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggnvp_equals_dense(backend_name: str, loss: str) -> None:
    model = _model(backend_name, loss)
    x, y = _data(loss)
    xb, yb = to_backend(backend_name, x), to_backend(backend_name, y)
    ggn = _dense_ggn(model, xb, y, loss)
    vectors = np.random.default_rng(0).standard_normal((3, model.num_params))
    products = model.ggnvp(xb, yb, to_backend(backend_name, vectors))
    assert _rel(products, vectors @ ggn) <= 1e-10
    # positive semi-definite, unlike the Hessian of this unconverged network
    assert np.linalg.eigvalsh(ggn).min() >= -1e-12 * np.abs(ggn).max()


def test_ggnvp_float32(backend_name: str) -> None:
    model32 = _model(backend_name, "cross_entropy", "float32")
    model64 = _model(backend_name, "cross_entropy")
    x, y = _data("cross_entropy")
    ggn = _dense_ggn(model64, to_backend(backend_name, x), y, "cross_entropy")
    vectors = np.random.default_rng(1).standard_normal((2, model32.num_params))
    products = model32.ggnvp(
        to_backend(backend_name, x.astype(np.float32)),
        to_backend(backend_name, y),
        to_backend(backend_name, vectors.astype(np.float32)),
    )
    assert _rel(products, vectors @ ggn) <= 1e-5


def test_ggnvp_of_linear_mse_is_hessian(backend_name: str) -> None:
    """A linear model with squared error: the GGN is the Hessian."""
    w, b = linear_weights(IN, 2, seed=4)
    model = wrap_mlp(backend_name, [(w, b)], "mse")
    if not hasattr(model, "ggnvp"):
        pytest.skip(f"the {backend_name} adapter has no ggnvp")
    rng = np.random.default_rng(5)
    x = to_backend(backend_name, rng.standard_normal((7, IN)))
    y = to_backend(backend_name, rng.standard_normal((7, 2)))
    vectors = to_backend(backend_name, rng.standard_normal((4, model.num_params)))
    expected = to_numpy(model.hvp(x, y, vectors))
    assert _rel(model.ggnvp(x, y, vectors), expected) <= 1e-10


# -- probes of layer_batch ----------------------------------------------------------


def _layered(backend_name: str, loss: str) -> Any:
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=2), loss)
    if not has_layers(model):
        pytest.skip(f"the {backend_name} adapter has no layer structure")
    return model


def _probe_ggn(model: Any, batch: Any) -> np.ndarray:
    """``(1/B) sum_n sum_s grad grad^T`` of the probes' flat gradients."""
    flat = to_numpy(flat_gradients(LayerLayout(model.layers, model.num_params), batch))
    return np.einsum("nsp,nsq->pq", flat, flat) / flat.shape[0]


def _roots(model: Any, x: Any, y: np.ndarray, loss: str) -> np.ndarray:
    """``R_n = H_n^{1/2}`` (eigenvalues clipped at 0), ``[B, C, C]``, numpy."""
    values, vectors = np.linalg.eigh(_output_hessians(_predictions(model, x), y, loss))
    return np.einsum(
        "bij,bj,bkj->bik", vectors, np.sqrt(np.clip(values, 0, None)), vectors
    )


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_probes(backend_name: str, loss: str) -> None:
    model = _layered(backend_name, loss)
    x, y = _data(loss)
    xb, yb = to_backend(backend_name, x), to_backend(backend_name, y)
    batch = model.layer_batch(xb, yb, fisher="ggn")
    assert _rel(_probe_ggn(model, batch), _dense_ggn(model, xb, y, loss)) <= 1e-10
    # the output layer's output gradients are the probes: the columns of R_n
    last = to_numpy(batch.output_grads[-1])  # [B, S = C, T = 1, C]
    roots = _roots(model, xb, y, loss)
    assert _rel(last[:, :, 0, :], np.transpose(roots, (0, 2, 1))) <= ROOT_TOL


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mc_probes(backend_name: str, loss: str) -> None:
    model = _layered(backend_name, loss)
    x, y = _data(loss)
    xb, yb = to_backend(backend_name, x), to_backend(backend_name, y)
    roots = _roots(model, xb, y, loss)
    eps = np.random.default_rng(6).standard_normal((B, 3, OUT))
    calls: list[tuple[int, int]] = []

    def noise(count: int, size: int) -> np.ndarray:
        calls.append((count, size))
        return eps

    batch = model.layer_batch(xb, yb, fisher="mc", noise=noise)
    assert calls == [(B, OUT)]
    last = to_numpy(batch.output_grads[-1])[:, :, 0, :]  # [B, S, C]
    assert _rel(last, np.einsum("bij,bsj->bsi", roots, eps)) <= ROOT_TOL
    # identity draws make sum_s u u^T = R R^T = H_n: the exact GGN
    eye = np.broadcast_to(np.eye(OUT), (B, OUT, OUT)).copy()
    exact = model.layer_batch(xb, yb, fisher="mc", noise=lambda b, c: eye)
    assert _rel(_probe_ggn(model, exact), _dense_ggn(model, xb, y, loss)) <= 1e-10


def test_mc_probes_average_to_ggn(backend_name: str) -> None:
    """Many standard normal draws: the sample covariance of the probes is ``H_n``.

    With ``S`` draws each entry of the estimate has a relative standard
    deviation of about ``sqrt(2 / S)`` (0.02 for ``S = 4000``); the fixed seed
    makes the check deterministic and 0.1 leaves five standard deviations.
    """
    model = _layered(backend_name, "cross_entropy")
    x, y = _data("cross_entropy")
    xb, yb = to_backend(backend_name, x), to_backend(backend_name, y)
    draws = 4000
    rng = np.random.default_rng(7)
    batch = model.layer_batch(
        xb, yb, fisher="mc", noise=lambda b, c: rng.standard_normal((b, draws, c))
    )
    estimate = _probe_ggn(model, batch) / draws
    ggn = _dense_ggn(model, xb, y, "cross_entropy")
    assert np.linalg.norm(estimate - ggn) <= 0.1 * np.linalg.norm(ggn)
