"""JAX layer structure: layers found in the jaxpr, and their inputs and gradients.

The reference is the adapter's own per-sample gradients (``jax.vmap`` of
``jax.grad`` of the loss on a batch of one, an independent code path): the
per-sample gradient assembled from a :class:`~influx.layers.LayerBatch`
(``flat_gradients``) must equal it to 1e-10 in float64 (1e-5 in float32), on
plain apply functions, flax linen and nnx, and equinox; recognised layer
names, kinds and counts are asserted for each.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from influx.errors import InputError
from influx.layers import LayerLayout, flat_gradients, has_layers, rest_index

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from influx_jax import JaxTwiceDifferentiable  # noqa: E402


def _mse(pred: Any, y: Any) -> Any:
    return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


def _cross_entropy(logits: Any, y: Any) -> Any:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def _check_gradients(
    model: JaxTwiceDifferentiable, x: Any, y: Any, tol: float = 1e-10
) -> Any:
    """flat_gradients of the LayerBatch equal per_sample_grads; returns the batch."""
    batch = model.layer_batch(x, y)
    layout = LayerLayout(model.layers, model.num_params)
    assembled = np.asarray(flat_gradients(layout, batch))
    count = int(np.shape(jax.tree_util.tree_leaves(x)[0])[0])
    assert assembled.shape == (count, 1, model.num_params)
    expected, losses = model.per_sample_grads(x, y)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(), 1.0)
    assert np.abs(assembled[:, 0] - expected).max() <= tol * scale
    np.testing.assert_allclose(batch.losses, losses, rtol=tol, atol=tol)
    for layer, a, g in zip(model.layers, batch.inputs, batch.output_grads, strict=True):
        assert a.shape[0] == count and a.shape[2] == layer.d_in
        assert g.shape[:2] == (count, 1) and g.shape[3] == layer.d_out
        assert a.shape[1] == g.shape[2]  # T
    return batch


def _summary(model: JaxTwiceDifferentiable) -> list[tuple[str, str, int, int, bool]]:
    return [
        (layer.name, layer.kind, layer.d_out, layer.d_in, layer.has_bias)
        for layer in model.layers
    ]


# -- plain apply functions -----------------------------------------------------


def _plain_mlp(dtype: str = "float64") -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    params = {
        "hidden": {
            "w": jnp.asarray(rng.standard_normal((3, 5)) / 2, dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(5), dtype),
        },
        "out": {
            "w": jnp.asarray(rng.standard_normal((5, 2)) / 2, dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(2), dtype),
        },
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"]

    return apply_fn, params


@pytest.mark.parametrize("count", [1, 5, 7])
def test_plain_mlp(count: int) -> None:
    apply_fn, params = _plain_mlp()
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    rng = np.random.default_rng(count)
    x, y = rng.standard_normal((count, 3)), rng.standard_normal((count, 2))
    _check_gradients(model, x, y)
    assert has_layers(model)
    assert _summary(model) == [
        ("['hidden']", "linear", 5, 3, True),
        ("['out']", "linear", 2, 5, True),
    ]
    assert rest_index(model.layers, model.num_params).size == 0


def test_plain_mlp_float32() -> None:
    apply_fn, params = _plain_mlp("float32")
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    y = rng.standard_normal((6, 2)).astype(np.float32)
    batch = _check_gradients(model, x, y, tol=1e-5)
    assert batch.output_grads[0].dtype == jnp.float32
    assert batch.inputs[0].dtype == jnp.float32


def test_weight_transposed_and_cross_entropy() -> None:
    """``x @ W.T`` (torch layout) with integer labels."""
    rng = np.random.default_rng(2)
    params = [
        {"w": jnp.asarray(rng.standard_normal((4, 3))), "b": jnp.zeros(4)},
        {"w": jnp.asarray(rng.standard_normal((3, 4)))},
    ]

    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p[0]["w"].T + p[0]["b"]) @ p[1]["w"].T

    model = JaxTwiceDifferentiable(apply_fn, params, _cross_entropy)
    x, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    _check_gradients(model, x, y)
    assert _summary(model) == [
        ("[0]", "linear", 4, 3, True),
        ("[1]", "linear", 3, 4, False),
    ]


def test_layer_norm_scale_is_rest() -> None:
    """A normalisation scale, a shared weight and a sliced leaf go to the rest."""
    rng = np.random.default_rng(3)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 4))),
        "b1": jnp.asarray(rng.standard_normal(4)),
        "scale": jnp.asarray(1.0 + 0.1 * rng.standard_normal(4)),
        "tied": jnp.asarray(rng.standard_normal((4, 4)) / 2),
        "w2": jnp.asarray(rng.standard_normal((4, 2))),
        "pair": jnp.asarray(rng.standard_normal(4)),
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = x @ p["w1"] + p["b1"]
        h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1)
        h = jnp.tanh(h * p["scale"])
        h = jnp.tanh(h @ p["tied"]) @ p["tied"]  # used twice: rest
        return h @ p["w2"] + p["pair"][:2]  # a slice is no bias: rest

    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    batch = _check_gradients(model, x, y)
    assert _summary(model) == [
        ("['w1']", "linear", 4, 3, True),
        ("['w2']", "linear", 2, 4, False),
    ]
    assert batch.rest_grads.shape == (5, 1, 4 + 4 + 16)


def test_sequence_positions() -> None:
    """A dense layer on ``[B, T, d]`` tokens: T = the tokens, then a mean."""
    rng = np.random.default_rng(4)
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 4))),
        "b": jnp.asarray(rng.standard_normal(4)),
        "v": jnp.asarray(rng.standard_normal((4, 2))),
    }

    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p["w"] + p["b"]).mean(axis=1) @ p["v"]

    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    x, y = rng.standard_normal((3, 6, 3)), rng.standard_normal((3, 2))
    batch = _check_gradients(model, x, y)
    assert batch.inputs[0].shape == (3, 6, 3)
    assert batch.output_grads[0].shape == (3, 1, 6, 4)
    assert batch.inputs[1].shape == (3, 1, 4)


def test_layers_need_a_batch() -> None:
    apply_fn, params = _plain_mlp()
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    with pytest.raises(InputError, match="find_layers"):
        _ = model.layers
    layers = model.find_layers(np.zeros((2, 3)))
    assert [layer.name for layer in layers] == ["['hidden']", "['out']"]


def test_fisher_is_checked() -> None:
    apply_fn, params = _plain_mlp()
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    x, y = np.zeros((2, 3)), np.zeros((2, 2))
    with pytest.raises(InputError, match="fisher"):
        model.layer_batch(x, y, fisher="exact")
    with pytest.raises(InputError, match="noise"):
        model.layer_batch(x, y, fisher="mc")
