"""The JAX example's factory: the torch example's MLP, in JAX.

``influx run examples/jax/job.toml`` calls :func:`build` and wraps what it
returns (``apply``, its parameters and the loss) for the JAX backend. The
example computes in float64, so it switches on ``jax_enable_x64``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from examples.data import initial_layers, make_data


def apply(params: list[dict[str, Any]], x: Any) -> Any:
    """Logits ``[B, 3]`` of the tanh MLP."""
    hidden = jnp.tanh(x @ params[0]["w"].T + params[0]["b"])
    return hidden @ params[1]["w"].T + params[1]["b"]


def cross_entropy(logits: Any, labels: Any) -> Any:
    """Mean cross-entropy of integer ``labels`` ``[B]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def build(
    n_train: int = 2000,
    n_test: int = 50,
    hidden: int = 16,
    epochs: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the MLP (float64, full-batch Adam) and return it with its data."""
    jax.config.update("jax_enable_x64", True)
    x_train, y_train, x_test, y_test = make_data(n_train, n_test, seed=seed)
    params = [
        {"w": jnp.asarray(w), "b": jnp.asarray(b)}
        for w, b in initial_layers(hidden, seed)
    ]
    inputs, targets = jnp.asarray(x_train), jnp.asarray(y_train)
    grad = jax.jit(jax.grad(lambda p: cross_entropy(apply(p, inputs), targets)))
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    rate, beta1, beta2, eps = 0.05, 0.9, 0.999, 1e-8

    def update(p: Any, a: Any, b: Any, scale: float) -> Any:
        return p - scale * a / (jnp.sqrt(b) + eps)

    for step in range(1, epochs + 1):
        g = grad(params)
        m = jax.tree_util.tree_map(lambda a, b: beta1 * a + (1 - beta1) * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: beta2 * a + (1 - beta2) * b * b, v, g)
        scale = rate * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        params = jax.tree_util.tree_map(
            lambda p, a, b, s=scale: update(p, a, b, s), params, m, v
        )
    return {
        "model": apply,
        "params": params,
        "loss": cross_entropy,
        "train": (x_train, y_train),
        "test": (x_test, y_test),
    }
