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


# -- convolutions ----------------------------------------------------------------


def _plain_cnn(dtype: str = "float64") -> tuple[Any, Any]:
    """OIHW kernels on NCHW inputs: stride 2 with padding, then a dilated conv."""
    rng = np.random.default_rng(5)
    params = {
        "conv1": {
            "kernel": jnp.asarray(rng.standard_normal((4, 2, 3, 2)) / 3, dtype),
            "bias": jnp.asarray(0.1 * rng.standard_normal(4), dtype),
        },
        "conv2": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 2, 2)) / 3, dtype)},
        "dense": {
            "w": jnp.asarray(rng.standard_normal((3 * 2 * 2, 2)) / 3, dtype),
            "b": jnp.asarray(0.1 * rng.standard_normal(2), dtype),
        },
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = jax.lax.conv_general_dilated(
            x, p["conv1"]["kernel"], (2, 2), ((1, 1), (0, 1))
        )
        h = jnp.tanh(h + p["conv1"]["bias"][None, :, None, None])
        h = jax.lax.conv_general_dilated(
            h, p["conv2"]["kernel"], (1, 1), ((0, 0), (0, 0)), rhs_dilation=(1, 2)
        )
        h = jnp.tanh(h).reshape(h.shape[0], -1)
        return h @ p["dense"]["w"] + p["dense"]["b"]

    return apply_fn, params


@pytest.mark.parametrize("count", [1, 3])
def test_plain_cnn(count: int) -> None:
    apply_fn, params = _plain_cnn()
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((count, 2, 6, 7)), rng.standard_normal((count, 2))
    batch = _check_gradients(model, x, y)
    assert _summary(model) == [
        ("['conv1']", "conv", 4, 2 * 3 * 2, True),
        ("['conv2']", "conv", 3, 4 * 2 * 2, False),
        ("['dense']", "linear", 2, 12, True),
    ]
    # conv1: (6 + 2 - 3) // 2 + 1 = 3 rows, (7 + 1 - 2) // 2 + 1 = 4 columns
    assert batch.inputs[0].shape == (count, 3 * 4, 12)
    assert batch.output_grads[1].shape == (count, 1, 2 * 2, 3)


def test_plain_cnn_float32() -> None:
    apply_fn, params = _plain_cnn("float32")
    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2, 6, 7)).astype(np.float32)
    y = rng.standard_normal((2, 2)).astype(np.float32)
    _check_gradients(model, x, y, tol=1e-5)


# -- flax, equinox ---------------------------------------------------------------


def test_flax_linen_dense_and_conv() -> None:
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Conv(
                3,
                (2, 3),
                strides=(1, 2),
                padding="SAME",
                dtype=jnp.float64,
                param_dtype=jnp.float64,
            )(x)
            x = nn.LayerNorm(dtype=jnp.float64, param_dtype=jnp.float64)(jnp.tanh(x))
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(2, dtype=jnp.float64, param_dtype=jnp.float64)(x)

    net = Net()
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((3, 4, 5, 2)), rng.standard_normal((3, 2))
    variables = net.init(jax.random.PRNGKey(0), x)
    model = JaxTwiceDifferentiable(net.apply, variables, _mse)
    batch = _check_gradients(model, x, y)
    assert _summary(model) == [
        ("['params']['Conv_0']", "conv", 3, 2 * 2 * 3, True),
        ("['params']['Dense_0']", "linear", 2, 4 * 3 * 3, True),
    ]
    assert batch.inputs[0].shape == (3, 4 * 3, 12)
    assert batch.rest_grads.shape == (3, 1, 6)  # the LayerNorm's scale and bias


def test_flax_nnx_linear() -> None:
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            kw = {"param_dtype": jnp.float64, "dtype": jnp.float64, "rngs": rngs}
            self.first = nnx.Linear(3, 4, **kw)
            self.norm = nnx.LayerNorm(4, **kw)
            self.second = nnx.Linear(4, 2, use_bias=False, **kw)

        def __call__(self, x: Any) -> Any:
            return self.second(jnp.tanh(self.norm(self.first(x))))

    model = JaxTwiceDifferentiable(Net(nnx.Rngs(0)), None, _mse)
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    _check_gradients(model, x, y)
    assert _summary(model) == [
        ("['first']", "linear", 4, 3, True),
        ("['second']", "linear", 2, 4, False),
    ]


def test_equinox_mlp_and_conv() -> None:
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        conv: Any
        mlp: Any

        def __init__(self, key: Any) -> None:
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv2d(2, 3, (2, 2), stride=2, key=k1)
            self.mlp = eqx.nn.MLP(12, 2, 4, 1, activation=jnp.tanh, key=k2)

        def __call__(self, x: Any) -> Any:
            return self.mlp(jnp.tanh(self.conv(x)).reshape(-1))

    net = jax.tree_util.tree_map(
        lambda leaf: leaf.astype(jnp.float64) if eqx.is_inexact_array(leaf) else leaf,
        Net(jax.random.PRNGKey(0)),
    )
    model = JaxTwiceDifferentiable(net, None, _mse)
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2))
    _check_gradients(model, x, y)
    assert _summary(model) == [
        (".conv", "conv", 3, 2 * 2 * 2, True),
        (".mlp.layers[0]", "linear", 4, 12, True),
        (".mlp.layers[1]", "linear", 2, 4, True),
    ]


def test_layer_inside_jit_and_custom_vjp() -> None:
    """Layers hidden in a jitted function (used twice) and a custom_vjp."""

    @jax.jit
    def dense(w: Any, b: Any, x: Any) -> Any:
        return x @ w + b

    @jax.custom_vjp
    def product(w: Any, x: Any) -> Any:
        return x @ w

    product.defvjp(
        lambda w, x: (x @ w, (w, x)),
        lambda res, g: (res[1].T @ g, g @ res[0].T),
    )
    rng = np.random.default_rng(11)
    params = {
        "a": {"w": jnp.asarray(rng.standard_normal((3, 4))), "b": jnp.zeros(4) + 0.1},
        "b": {"w": jnp.asarray(rng.standard_normal((4, 4))), "b": jnp.ones(4) * 0.2},
        "c": jnp.asarray(rng.standard_normal((4, 2))),
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = jnp.tanh(dense(p["a"]["w"], p["a"]["b"], x))
        h = jnp.tanh(dense(p["b"]["w"], p["b"]["b"], h))
        return product(p["c"], h)

    model = JaxTwiceDifferentiable(apply_fn, params, _mse)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    _check_gradients(model, x, y)
    assert _summary(model) == [
        ("['a']", "linear", 4, 3, True),
        ("['b']", "linear", 4, 4, True),
        ("['c']", "linear", 2, 4, False),
    ]
