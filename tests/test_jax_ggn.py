"""JAX Gauss-Newton: ``ggnvp`` and the ``"ggn"``/``"mc"`` probes of ``layer_batch``.

References are built independently in float64: per-sample output Jacobians
``J_n`` (``jax.jacrev`` of the model's outputs in ``theta``) and output
Hessians ``H_n`` (``jax.hessian`` of the loss in the outputs), the dense
``GGN = (1/B) sum_n J_n^T H_n J_n`` and the square roots ``R_n`` by numpy's
``eigh``. Tolerance 1e-10 relative to the largest entry (1e-5 in float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import influx.layers
from influx.errors import InputError
from influx.layers import LayerLayout, flat_gradients

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from influx_jax import JaxTwiceDifferentiable  # noqa: E402


def _mse(pred: Any, y: Any) -> Any:
    return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


def _cross_entropy(logits: Any, y: Any) -> Any:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


_MIX = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, -0.3], [0.0, 0.4, 2.0]])


def _mixed_square(pred: Any, y: Any) -> Any:
    """A squared error with a full, non-diagonal output Hessian ``2 M^T M``."""
    return jnp.mean(jnp.sum(((pred - y) @ jnp.asarray(_MIX).T) ** 2, axis=-1))


def _mlp(dtype: str = "float64", out: int = 3) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    params = {
        "l1": {
            "w": jnp.asarray(rng.standard_normal((4, 5)) / 2, dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(5), dtype),
        },
        "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(5), dtype),
        "l2": {
            "w": jnp.asarray(rng.standard_normal((5, out)) / 2, dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(out), dtype),
        },
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) * p["scale"]
        return h @ p["l2"]["w"] + p["l2"]["b"]

    return apply_fn, params


def _pieces(model: JaxTwiceDifferentiable, x: Any, y: Any) -> tuple[Any, Any]:
    """Per-sample ``J_n`` ``[B, C, P]`` and ``H_n`` ``[B, C, C]``, numpy float64."""
    theta = model.parameters

    def outputs(t: Any, xn: Any) -> Any:
        return model.apply_fn(model._unravel(t), xn[None])[0]

    def loss(f: Any, yn: Any) -> Any:
        return model.loss(f[None], yn[None])

    @jax.jit
    def pieces(t: Any, xs: Any, ys: Any) -> tuple[Any, Any]:
        jac = jax.vmap(jax.jacrev(outputs), in_axes=(None, 0))(t, xs)
        f = jax.vmap(outputs, in_axes=(None, 0))(t, xs)
        return jac, jax.vmap(jax.hessian(loss))(f, ys)

    jac, hess = pieces(theta, jnp.asarray(x), jnp.asarray(y))
    return np.asarray(jac, np.float64), np.asarray(hess, np.float64)


def _roots(hess: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(hess)
    return (vectors * np.sqrt(np.clip(values, 0, None))[:, None, :]) @ np.swapaxes(
        vectors, 1, 2
    )


def _close(actual: Any, expected: np.ndarray, tol: float) -> None:
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= tol * np.abs(expected).max()


@pytest.mark.parametrize(
    ("loss", "count"), [("mse", 5), ("mse", 1), ("cross_entropy", 6)]
)
def test_ggn_probes_give_the_dense_ggn(loss: str, count: int) -> None:
    apply_fn, params = _mlp()
    loss_fn = _mse if loss == "mse" else _cross_entropy
    model = JaxTwiceDifferentiable(apply_fn, params, loss_fn)
    rng = np.random.default_rng(count)
    x = rng.standard_normal((count, 4))
    y = rng.standard_normal((count, 3)) if loss == "mse" else rng.integers(0, 3, count)
    batch = model.layer_batch(x, y, fisher="ggn")
    probes = np.asarray(
        flat_gradients(LayerLayout(model.layers, model.num_params), batch)
    )
    assert probes.shape == (count, 3, model.num_params)
    assert batch.rest_grads.shape == (count, 3, 5)
    ggn = np.einsum("nsp,nsq->pq", probes, probes) / count
    jac, hess = _pieces(model, x, y)
    reference = np.einsum("ncp,ncd,ndq->pq", jac, hess, jac) / count
    _close(ggn, reference, 1e-10)
    # the probes themselves: J_n^T R_n, R_n the symmetric square root; the
    # cross-entropy's Hessian has a zero eigenvalue, whose root sqrt(1e-17)
    # leaves ~1e-9 either way: compared to 1e-7 there
    tol = 1e-10 if loss == "mse" else 1e-7
    _close(probes, np.einsum("ncp,ncs->nsp", jac, _roots(hess)), tol)


@pytest.mark.parametrize("count", [5, 8])
def test_ggnvp_equals_dense_ggn(count: int) -> None:
    apply_fn, params = _mlp()
    model = JaxTwiceDifferentiable(apply_fn, params, _cross_entropy)
    rng = np.random.default_rng(count)
    x, y = rng.standard_normal((count, 4)), rng.integers(0, 3, count)
    vectors = rng.standard_normal((3, model.num_params))
    jac, hess = _pieces(model, x, y)
    reference = np.einsum("ncp,ncd,ndq->pq", jac, hess, jac) / count
    products = model.ggnvp(x, y, jnp.asarray(vectors))
    _close(products, vectors @ reference, 1e-10)


def test_ggnvp_float32() -> None:
    apply_fn, params = _mlp("float32")
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 4)).astype(np.float32)
    y = rng.standard_normal((7, 3)).astype(np.float32)
    vectors = rng.standard_normal((2, model.num_params)).astype(np.float32)
    model64 = JaxTwiceDifferentiable(*_mlp("float64"), _mse)
    jac, hess = _pieces(model64, x.astype(np.float64), y.astype(np.float64))
    reference = np.einsum("ncp,ncd,ndq->pq", jac, hess, jac) / 7
    products = model.ggnvp(x, y, jnp.asarray(vectors))
    assert products.dtype == jnp.float32
    _close(products, vectors.astype(np.float64) @ reference, 1e-5)
    batch = model.layer_batch(x, y, fisher="ggn")
    probes = np.asarray(
        flat_gradients(LayerLayout(model.layers, model.num_params), batch), np.float64
    )
    _close(np.einsum("nsp,nsq->pq", probes, probes) / 7, reference, 1e-5)


def test_linear_mse_ggn_is_the_hessian() -> None:
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((4, 2))), "b": jnp.zeros(2)}
    model = JaxTwiceDifferentiable(lambda p, x: x @ p["w"] + p["b"], params, _mse)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    identity = jnp.eye(model.num_params)
    ggn = np.asarray(model.ggnvp(x, y, identity))
    hessian = np.asarray(
        jax.jit(jax.hessian(model._batch_loss))(model.parameters, x, y)
    )
    _close(ggn, hessian, 1e-10)
    batch = model.layer_batch(x, y, fisher="ggn")
    probes = np.asarray(
        flat_gradients(LayerLayout(model.layers, model.num_params), batch)
    )
    _close(np.einsum("nsp,nsq->pq", probes, probes) / 6, hessian, 1e-10)


def test_mc_probes_are_root_times_noise() -> None:
    apply_fn, params = _mlp()
    model = JaxTwiceDifferentiable(apply_fn, params, _mixed_square)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    eps = np.random.default_rng(6).standard_normal((5, 4, 3))
    seen = []

    def noise(count: int, outputs: int) -> np.ndarray:
        seen.append((count, outputs))
        return eps

    batch = model.layer_batch(x, y, fisher="mc", noise=noise)
    assert seen == [(5, 3)]
    probes = np.asarray(
        flat_gradients(LayerLayout(model.layers, model.num_params), batch)
    )
    jac, hess = _pieces(model, x, y)
    expected = np.einsum("ncp,ncd,nsd->nsp", jac, _roots(hess), eps)
    _close(probes, expected, 1e-10)
    _close(batch.losses, np.asarray(model.per_sample_grads(x, y)[1]), 1e-12)


def test_mc_noise_shape_and_output_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    apply_fn, params = _mlp()
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    x, y = np.zeros((2, 4)), np.zeros((2, 3))
    with pytest.raises(InputError, match=r"\[B, S, C\]"):
        model.layer_batch(x, y, fisher="mc", noise=lambda b, c: np.zeros((b, c)))
    monkeypatch.setattr(influx.layers, "MAX_OUTPUT_HESSIAN", 2)
    with pytest.raises(InputError, match="fisher"):
        model.layer_batch(x, y, fisher="ggn")
    model.layer_batch(x, y)  # empirical needs no output Hessian
