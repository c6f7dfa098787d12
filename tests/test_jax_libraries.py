"""Models of JAX libraries: flax linen variables, equinox and flax nnx modules.

Only trainable parameters are differentiated: flax's ``batch_stats`` (and any
collection besides ``params``) enter as constants, as torch buffers do. Each
influence is checked against a dense float64 reference (``jax.hessian`` in the
parameters alone) or against the same weights written as a plain apply
function.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from models import jax_mlp

import influx

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from jax.flatten_util import ravel_pytree  # noqa: E402

IN_DIM, HIDDEN, OUT_DIM = 3, 4, 2
N_TRAIN = 8  # two batches of 4: one compiled shape
REG = 2.0
TOL = 1e-8


def _mse(pred: Any, y: Any) -> Any:
    return jnp.mean((pred - y) ** 2)


def _data() -> list[tuple[Any, Any]]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N_TRAIN, IN_DIM)))
    y = jnp.asarray(rng.standard_normal((N_TRAIN, OUT_DIM)))
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def _reference_influences(
    apply_fn: Any, params: Any, data: list[tuple[Any, Any]]
) -> np.ndarray:
    """``g_i^T (H + REG I)^{-1} g_j`` from a dense Hessian in ``params`` only."""
    theta, unravel = ravel_pytree(params)
    x = jnp.concatenate([b[0] for b in data])
    y = jnp.concatenate([b[1] for b in data])

    def sample_loss(t: Any, xi: Any, yi: Any) -> Any:
        return _mse(apply_fn(unravel(t), xi[None]), yi[None])

    def total_loss(t: Any) -> Any:
        return jnp.mean(jax.vmap(sample_loss, in_axes=(None, 0, 0))(t, x, y))

    @jax.jit
    def influences(t: Any) -> Any:
        hessian = jax.hessian(total_loss)(t) + REG * jnp.eye(t.shape[0])
        grads = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(t, x, y)
        return grads @ jnp.linalg.solve(hessian, grads.T)

    return np.asarray(influences(theta))


def _assert_close(actual: Any, expected: np.ndarray) -> None:
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(actual - expected)) <= TOL * scale


# -- flax linen ------------------------------------------------------------------


def _linen_bn_mlp() -> tuple[Any, Any]:
    """A flax linen Dense -> BatchNorm -> tanh -> Dense in float64, and its
    variables with batch statistics away from their initial 0 and 1."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
            x = nn.Dense(HIDDEN, **f64)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.0, **f64)(x)
            return nn.Dense(OUT_DIM, **f64)(jnp.tanh(x))

    net = Net()
    warm = 2.0 + 3.0 * jax.random.normal(jax.random.PRNGKey(1), (16, IN_DIM))
    variables = net.init(jax.random.PRNGKey(0), warm)
    _, updates = net.apply(variables, warm, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}
    return net, variables


def test_flax_batch_stats_are_constants() -> None:
    net, variables = _linen_bn_mlp()
    stats = ravel_pytree(variables["batch_stats"])[0]
    assert not np.allclose(stats, np.tile([0.0, 1.0], stats.shape[0] // 2))
    data = _data()

    model = influx.twice_differentiable(net.apply, _mse, params=variables)
    influences = influx.compute_influences(model, data, hessian_regularization=REG)

    assert model.num_params == ravel_pytree(variables["params"])[0].shape[0]
    constants = {"batch_stats": variables["batch_stats"]}

    def reference_apply(params: Any, x: Any) -> Any:
        return net.apply({"params": params, **constants}, x)

    expected = _reference_influences(reference_apply, variables["params"], data)
    _assert_close(influences, expected)


def test_flax_frozen_variables() -> None:
    core = pytest.importorskip("flax.core")
    net, variables = _linen_bn_mlp()
    frozen = core.freeze(variables)
    model = influx.twice_differentiable(net.apply, _mse, params=frozen)
    plain = influx.twice_differentiable(net.apply, _mse, params=variables)
    assert model.num_params == plain.num_params
    x, y = _data()[0]
    np.testing.assert_allclose(model.grad(x, y), plain.grad(x, y), rtol=1e-14)


def test_flax_mutable_apply_is_refused() -> None:
    net, variables = _linen_bn_mlp()
    x, y = _data()[0]

    def mutable_apply(v: Any, xb: Any) -> Any:
        return net.apply(v, xb, train=True, mutable=["batch_stats"])

    model = influx.twice_differentiable(mutable_apply, _mse, params=variables)
    with pytest.raises(influx.InputError, match=r"mutable=.*evaluation mode"):
        model.grad(x, y)

    def train_apply(v: Any, xb: Any) -> Any:
        return net.apply(v, xb, train=True)

    model = influx.twice_differentiable(train_apply, _mse, params=variables)
    with pytest.raises(influx.InputError, match=r"batch_stats.*evaluation mode"):
        model.grad(x, y)


# -- equinox ---------------------------------------------------------------------


def _equinox_mlp() -> Any:
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(
        IN_DIM, OUT_DIM, HIDDEN, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0)
    )
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp
    )


def _plain_mlp(layers: list[Any]) -> tuple[Any, Any]:
    """The same weights as a plain ``apply_fn(params, x)`` (tests/models.py)."""
    weights = [(np.asarray(layer.weight), np.asarray(layer.bias)) for layer in layers]
    return jax_mlp(weights, "float64")


def test_equinox_module_without_params() -> None:
    mlp = _equinox_mlp()
    data = _data()
    apply_fn, params = _plain_mlp(list(mlp.layers))

    model = influx.twice_differentiable(mlp, _mse)

    assert model.backend.name == "jax"
    assert model.num_params == ravel_pytree(params)[0].shape[0]
    influences = influx.compute_influences(model, data, hessian_regularization=REG)
    _assert_close(influences, _reference_influences(apply_fn, params, data))


def test_equinox_module_as_params() -> None:
    mlp = _equinox_mlp()
    data = _data()
    apply_fn, params = _plain_mlp(list(mlp.layers))
    model = influx.twice_differentiable(
        lambda m, x: jax.vmap(m)(x), _mse, params=mlp, backend="jax"
    )
    assert model.num_params == ravel_pytree(params)[0].shape[0]
    influences = influx.compute_influences(model, data, hessian_regularization=REG)
    _assert_close(influences, _reference_influences(apply_fn, params, data))


def test_equinox_stateful_module_names_the_fix() -> None:
    eqx = pytest.importorskip("equinox")
    norm = eqx.nn.BatchNorm(IN_DIM, axis_name="batch", mode="batch")
    x = _data()[0][0]
    model = influx.twice_differentiable(norm, _mse)
    with pytest.raises(influx.InputError, match=r"eqx\.partition\(module"):
        model.grad(x, x)


def test_module_with_params_is_refused() -> None:
    mlp = _equinox_mlp()
    with pytest.raises(TypeError, match="without params="):
        influx.twice_differentiable(mlp, _mse, params={"w": jnp.ones(2)})


# -- flax nnx --------------------------------------------------------------------


def _nnx_net() -> Any:
    nnx = pytest.importorskip("flax.nnx")
    rngs = nnx.Rngs(0)
    f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}

    class Net(nnx.Module):
        def __init__(self) -> None:
            self.hidden = nnx.Linear(IN_DIM, HIDDEN, rngs=rngs, **f64)
            self.norm = nnx.BatchNorm(HIDDEN, rngs=rngs, **f64)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(HIDDEN, OUT_DIM, rngs=rngs, **f64)

        def __call__(self, x: Any) -> Any:
            return self.out(self.drop(jnp.tanh(self.norm(self.hidden(x)))))

    net = Net()
    # nnx keeps batch statistics in float32 whatever param_dtype: set float64.
    _set(net.norm.mean, jnp.linspace(-1.0, 1.0, HIDDEN))
    _set(net.norm.var, jnp.linspace(0.5, 2.0, HIDDEN))
    return net


def _set(variable: Any, value: Any) -> None:
    """Replace an nnx variable's array (``set_value`` from flax 0.12 on)."""
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def _get(variable: Any) -> Any:
    """An nnx variable's array (``.value`` is deprecated from flax 0.12 on)."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def test_nnx_module_in_eval_mode() -> None:
    net = _nnx_net()
    data = _data()
    norm = net.norm
    epsilon = norm.epsilon
    params = {
        "w1": _get(net.hidden.kernel),
        "b1": _get(net.hidden.bias),
        "scale": _get(norm.scale),
        "shift": _get(norm.bias),
        "w2": _get(net.out.kernel),
        "b2": _get(net.out.bias),
    }
    mean, var = _get(norm.mean), _get(norm.var)

    def apply_fn(p: Any, x: Any) -> Any:
        h = x @ p["w1"] + p["b1"]
        h = (h - mean) / jnp.sqrt(var + epsilon) * p["scale"] + p["shift"]
        return jnp.tanh(h) @ p["w2"] + p["b2"]

    model = influx.twice_differentiable(net, _mse)
    assert model.num_params == ravel_pytree(params)[0].shape[0]
    influences = influx.compute_influences(model, data, hessian_regularization=REG)
    _assert_close(influences, _reference_influences(apply_fn, params, data))
    # The user's module is left in training mode, its statistics unchanged.
    assert net.norm.use_running_average is False
    assert net.drop.deterministic is False
    np.testing.assert_array_equal(_get(net.norm.mean), mean)


# -- detection -------------------------------------------------------------------


def test_detection_imports_no_library() -> None:
    """Wrapping a plain apply function imports neither flax nor equinox."""
    code = (
        "import sys, jax.numpy as jnp, influx\n"
        "m = influx.twice_differentiable(lambda p, x: x @ p['w'], "
        "lambda a, b: jnp.mean((a - b) ** 2), params={'w': jnp.ones((2, 1))})\n"
        "assert m.backend.name == 'jax'\n"
        "bad = [n for n in ('flax', 'equinox') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
