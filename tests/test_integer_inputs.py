"""Integer inputs: the same influences on torch and JAX, embeddings keep ids.

Rule: on torch, integer (and bool) ``x`` is cast to the parameters' dtype
unless the module contains an ``nn.Embedding``/``nn.EmbeddingBag``; on JAX it
reaches ``apply_fn`` unchanged (``jnp`` promotes it) and is cast only for the
perturbation influence, which differentiates in ``x``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import linear_weights, rel_err, to_backend, to_numpy, wrap_mlp

import influx

RTOL = 1e-12


def _integer_data(backend_name: str, dtype: Any = np.int64) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(12, 3)).astype(dtype)
    y = rng.standard_normal((12, 1))
    return x, to_backend(backend_name, x), to_backend(backend_name, y)


def _influences(backend_name: str, x: Any, y: Any, kind: str) -> Any:
    w, b = linear_weights(3, 1, seed=1)
    model = wrap_mlp(backend_name, [(w, b)])
    data = influx.batches(x, y, batch_size=5)
    return influx.compute_influences(
        model, data, hessian_regularization=0.1, influence_type=kind
    )


@pytest.mark.parametrize("kind", ["up", "perturbation"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_integer_x_equals_float_x(backend_name: str, kind: str, dtype: Any) -> None:
    x_host, x, y = _integer_data(backend_name, dtype)
    x_float = to_backend(backend_name, x_host.astype(np.float64))
    expected = to_numpy(_influences(backend_name, x_float, y, kind))
    actual = _influences(backend_name, x, y, kind)
    assert rel_err(actual, expected) < RTOL


@pytest.mark.cross
@pytest.mark.parametrize("kind", ["up", "perturbation"])
def test_integer_x_agrees_across_backends(kind: str) -> None:
    _, x_torch, y_torch = _integer_data("torch")
    _, x_jax, y_jax = _integer_data("jax")
    torch_result = _influences("torch", x_torch, y_torch, kind)
    jax_result = _influences("jax", x_jax, y_jax, kind)
    assert rel_err(torch_result, to_numpy(jax_result)) < RTOL


def _embedding_model(backend_name: str) -> Any:
    """Token ids ``[B, T]`` -> mean embedding ``[B, D]`` -> linear ``[B, 1]``."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((7, 2))
    w, b = rng.standard_normal((1, 2)), rng.standard_normal(1)
    if backend_name == "torch":
        import torch

        class Bag(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = torch.nn.Embedding(7, 2, dtype=torch.float64)
                self.head = torch.nn.Linear(2, 1, dtype=torch.float64)

            def forward(self, tokens: torch.Tensor) -> torch.Tensor:
                return self.head(self.embed(tokens).mean(dim=1))

        module = Bag()
        with torch.no_grad():
            module.embed.weight.copy_(torch.as_tensor(table))
            module.head.weight.copy_(torch.as_tensor(w))
            module.head.bias.copy_(torch.as_tensor(b))
        return influx.twice_differentiable(module, torch.nn.MSELoss())
    import jax.numpy as jnp

    params = {"table": jnp.asarray(table), "w": jnp.asarray(w), "b": jnp.asarray(b)}

    def apply_fn(p: Any, tokens: Any) -> Any:
        return jnp.take(p["table"], tokens, axis=0).mean(axis=1) @ p["w"].T + p["b"]

    def loss(pred: Any, y: Any) -> Any:
        return jnp.mean((pred - y) ** 2)

    return influx.twice_differentiable(apply_fn, loss, params=params)


def _embedding_influences(backend_name: str) -> Any:
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 7, size=(10, 4))
    y = rng.standard_normal((10, 1))
    data = influx.batches(
        to_backend(backend_name, tokens), to_backend(backend_name, y), batch_size=4
    )
    model = _embedding_model(backend_name)
    return influx.compute_influences(model, data, hessian_regularization=1.0)


def test_embedding_model_takes_integer_ids(backend_name: str) -> None:
    result = to_numpy(_embedding_influences(backend_name))
    assert result.shape == (10, 10)
    assert np.all(np.isfinite(result))
    # Up-weighting a point lowers its own loss: the self-influences are > 0.
    assert np.all(np.diag(result) > 0)


@pytest.mark.cross
def test_embedding_model_agrees_across_backends() -> None:
    torch_result = _embedding_influences("torch")
    jax_result = to_numpy(_embedding_influences("jax"))
    assert rel_err(torch_result, jax_result) < RTOL
