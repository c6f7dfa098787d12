"""Training the demo's small classifier in JAX (used by ``influx demo``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influx_jax._model import JaxTwiceDifferentiable


def _apply(params: list[dict[str, Any]], x: Any) -> Any:
    h = x
    for index, layer in enumerate(params):
        h = h @ layer["w"].T + layer["b"]
        if index < len(params) - 1:
            h = jnp.tanh(h)
    return h


def _cross_entropy(logits: Any, labels: Any) -> Any:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def train_demo_model(
    x: np.ndarray,
    y: np.ndarray,
    layers: list[tuple[np.ndarray, np.ndarray]],
    *,
    epochs: int,
    learning_rate: float,
) -> tuple[JaxTwiceDifferentiable, Callable[[np.ndarray], np.ndarray]]:
    """Train a tanh MLP from the initial ``layers`` with full-batch Adam.

    Same contract as the torch backend's ``train_demo_model``: returns the
    wrapped model (cross-entropy loss) and a numpy ``predict`` giving logits.
    """
    params = [
        {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
        for w, b in layers
    ]
    inputs = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(y, jnp.int32)
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def objective(p: Any) -> Any:
        return _cross_entropy(_apply(p, inputs), labels)

    @jax.jit
    def step(p: Any, m: Any, v: Any, t: Any) -> tuple[Any, Any, Any]:
        g = jax.grad(objective)(p)
        m = jax.tree_util.tree_map(lambda a, b: beta1 * a + (1 - beta1) * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: beta2 * a + (1 - beta2) * b * b, v, g)
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t

        def update(w: Any, a: Any, b: Any) -> Any:
            return w - learning_rate * (a / correction1) / (
                jnp.sqrt(b / correction2) + eps
            )

        return jax.tree_util.tree_map(update, p, m, v), m, v

    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    for t in range(1, epochs + 1):
        params, m, v = step(params, m, v, jnp.float32(t))

    def predict(points: np.ndarray) -> np.ndarray:
        return np.asarray(_apply(params, jnp.asarray(points, jnp.float32)))

    return JaxTwiceDifferentiable(_apply, params, _cross_entropy), predict
