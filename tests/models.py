"""Small models built identically on each backend, from numpy weights.

Every factory takes numpy weights, so the same numbers can be wrapped on torch
and on JAX and the results compared.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

import influx


def linear_weights(
    in_dim: int, out_dim: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``W [out, in]`` and bias ``b [out]`` of a linear model."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((out_dim, in_dim)), rng.standard_normal(out_dim)


def spd_matrix(eigenvalues: Any, seed: int = 0) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    return (q * eigenvalues) @ q.T


def mlp_weights(
    sizes: tuple[int, ...], seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W [out, in], b [out]), ...]`` of a tanh MLP with layer ``sizes``."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
        for i, o in itertools.pairwise(sizes)
    ]


def torch_mlp(layers: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> Any:
    import torch

    modules: list[Any] = []
    for index, (w, b) in enumerate(layers):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=getattr(torch, dtype))
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w))
            linear.bias.copy_(torch.as_tensor(b))
        modules.append(linear)
        if index < len(layers) - 1:
            modules.append(torch.nn.Tanh())
    return torch.nn.Sequential(*modules)


def jax_mlp(layers: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> tuple[Any, Any]:
    """``(apply_fn, params)``; params is a list of ``{"w", "b"}`` dicts."""
    import jax.numpy as jnp

    params = [
        {"w": jnp.asarray(w, dtype=dtype), "b": jnp.asarray(b, dtype=dtype)}
        for w, b in layers
    ]

    def apply_fn(p: Any, x: Any) -> Any:
        h = x
        for index, layer in enumerate(p):
            h = h @ layer["w"].T + layer["b"]
            if index < len(p) - 1:
                h = jnp.tanh(h)
        return h

    return apply_fn, params


def mse_loss(backend_name: str) -> Any:
    """Mean over all elements of ``(pred - y)^2``, as torch's ``MSELoss``."""
    if backend_name == "torch":
        import torch

        return torch.nn.MSELoss()
    import jax.numpy as jnp

    return lambda pred, y: jnp.mean((pred - y) ** 2)


def cross_entropy_loss(backend_name: str) -> Any:
    """Mean cross-entropy of logits and integer labels."""
    if backend_name == "torch":
        import torch

        return torch.nn.CrossEntropyLoss()
    import jax
    import jax.numpy as jnp

    def loss(logits: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return loss


def wrap_mlp(
    backend_name: str,
    layers: list[tuple[np.ndarray, np.ndarray]],
    loss: str = "mse",
    dtype: str = "float64",
) -> influx.TwiceDifferentiable:
    """The MLP of ``layers`` wrapped on ``backend_name``.

    A single layer is a linear model. ``loss`` is ``"mse"`` or
    ``"cross_entropy"``.
    """
    loss_fn = (
        mse_loss(backend_name) if loss == "mse" else cross_entropy_loss(backend_name)
    )
    if backend_name == "torch":
        return influx.twice_differentiable(torch_mlp(layers, dtype), loss_fn)
    apply_fn, params = jax_mlp(layers, dtype)
    return influx.twice_differentiable(apply_fn, loss_fn, params=params)


def to_numpy(array: Any) -> np.ndarray:
    """Any backend's array as float64 numpy."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def to_backend(backend_name: str, array: np.ndarray) -> Any:
    """A numpy array as a native array of ``backend_name`` (same dtype)."""
    if backend_name == "torch":
        import torch

        return torch.as_tensor(np.array(array))
    import jax.numpy as jnp

    return jnp.asarray(array)


def raw_model(
    backend_name: str,
    layers: list[tuple[np.ndarray, np.ndarray]],
    dtype: str = "float64",
) -> tuple[Any, Any]:
    """``(model, params)`` before wrapping: a torch module and ``None``, or a JAX
    apply function and its parameter pytree."""
    if backend_name == "torch":
        return torch_mlp(layers, dtype), None
    return jax_mlp(layers, dtype)


def rel_err(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|``, shapes checked."""
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def frobenius_err(actual: Any, expected: Any) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius)."""
    actual, expected = to_numpy(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def batch_hessian(model: Any, x: Any, y: Any) -> np.ndarray:
    """Dense Hessian ``[P, P]`` of the batch-mean loss, numpy float64.

    An independent reference: the framework's own full-Hessian transform
    (``torch.func.hessian``, ``jax.hessian``) of the adapter's batch loss,
    not influx's batched Hessian-vector products.
    """
    backend, theta = model.backend, model.parameters
    x, y = backend.asarray(x, like=theta), backend.asarray(y, like=theta)
    if backend.name == "torch":
        from torch.func import hessian

        with model._eval_mode():
            return to_numpy(hessian(model._batch_loss)(theta, x, y))
    import jax

    return to_numpy(jax.hessian(model._batch_loss)(theta, x, y))


def _outputs_function(model: Any, x: Any) -> Any:
    """``theta -> outputs [B, C]`` of the wrapped network on ``x`` (native)."""
    if model.backend.name == "torch":
        from torch.func import functional_call

        def outputs(t: Any) -> Any:
            params = {**model._constants, **model._unflatten(t)}
            return functional_call(model.model, params, (x,))

        return outputs
    return lambda t: model.apply_fn(model._unravel(t), x)


def batch_outputs_jacobian(model: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Outputs ``[B, C]`` and their Jacobian ``[B, C, P]`` in ``theta``, float64.

    An independent reference: the framework's own ``jacrev`` of the wrapped
    network's forward pass, not influx's products.
    """
    backend, theta = model.backend, model.parameters
    x = backend.asarray(x, like=theta)
    outputs = _outputs_function(model, x)
    if backend.name == "torch":
        from torch.func import jacrev

        with model._eval_mode():
            return to_numpy(outputs(theta)), to_numpy(jacrev(outputs)(theta))
    import jax

    return to_numpy(outputs(theta)), to_numpy(jax.jacrev(outputs)(theta))


def batch_ggn(model: Any, x: Any, loss: str) -> np.ndarray:
    """Dense Gauss-Newton matrix ``[P, P]`` of the batch-mean loss, float64.

    ``sum_b J_b^T H_b J_b`` with the output Hessians written out by hand:
    ``"mse"`` (mean over all ``B C`` elements) has ``H_b = 2 / (B C) I``,
    ``"cross_entropy"`` (mean over the batch) ``(diag(p_b) - p_b p_b^T) / B``.
    """
    outputs, jac = batch_outputs_jacobian(model, x)  # [B, C], [B, C, P]
    count, classes = outputs.shape
    if loss == "mse":
        hout = np.tile(np.eye(classes) * 2 / (count * classes), (count, 1, 1))
    else:
        p = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        hout = (
            np.einsum("bc,cd->bcd", p, np.eye(classes)) - p[:, :, None] * p[:, None]
        ) / count
    return np.einsum("bcp,bcd,bdq->pq", jac, hout, jac)
