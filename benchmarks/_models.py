"""The benchmark's one model builder: a tanh MLP from numpy weights.

Every runner builds its model here, so torch, JAX and the peers see the same
network and the same numbers: ``weights`` is a list of ``(weight [out, in],
bias [out])`` per layer (torch's ``Linear`` layout), tanh between layers,
logits out, cross-entropy (mean over the batch) as the loss.

Numpy at import time only: the peers' environments (no influx, no JAX) import
:func:`torch_module`; the frameworks are imported by the function that needs
them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["influx_model", "jax_model", "torch_mlp", "torch_model", "torch_module"]

Weights = Sequence[tuple[np.ndarray, np.ndarray]]


def torch_mlp(sizes: Sequence[int], dtype: str = "float32") -> Any:
    """An untrained ``Linear -> Tanh -> ... -> Linear`` of ``sizes`` (torch init)."""
    import torch

    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(torch.nn.Tanh())
        layers.append(torch.nn.Linear(n_in, n_out, dtype=getattr(torch, dtype)))
    return torch.nn.Sequential(*layers)


def torch_module(weights: Weights, dtype: str = "float32") -> Any:
    """The MLP of ``weights`` as a torch module in eval mode, weights copied."""
    import torch

    sizes = [weights[0][0].shape[1]] + [w.shape[0] for w, _ in weights]
    module = torch_mlp(sizes, dtype)
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, weights, strict=True):
            linear.weight.copy_(torch.from_numpy(np.asarray(weight)))
            linear.bias.copy_(torch.from_numpy(np.asarray(bias)))
    return module.eval()


def torch_model(weights: Weights, dtype: str = "float32") -> tuple[Any, Callable]:
    """``(influx model, numpy -> tensor)`` on torch."""
    import torch

    import influx

    module = torch_module(weights, dtype)
    model = influx.twice_differentiable(module, torch.nn.functional.cross_entropy)

    def tensor(array: np.ndarray) -> Any:
        out = torch.from_numpy(array)
        return out.to(getattr(torch, dtype)) if out.is_floating_point() else out

    return model, tensor


def jax_model(weights: Weights, dtype: str = "float32") -> tuple[Any, Callable]:
    """``(influx model, numpy -> array)`` on JAX, parameters ``{"w": W^T, "b"}``."""
    import jax
    import jax.numpy as jnp

    import influx

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    params = [
        {"w": jnp.asarray(w.T, dtype=dtype), "b": jnp.asarray(b, dtype=dtype)}
        for w, b in weights
    ]

    def apply(params: list[dict[str, Any]], x: Any) -> Any:
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def cross_entropy(logits: Any, labels: Any) -> Any:
        picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    model = influx.twice_differentiable(apply, cross_entropy, params=params)

    def array(values: np.ndarray) -> Any:
        if np.issubdtype(values.dtype, np.floating):
            return jnp.asarray(values, dtype=dtype)
        return jnp.asarray(values.astype(np.int32))

    return model, array


def influx_model(
    backend: str, weights: Weights, dtype: str = "float32"
) -> tuple[Any, Callable]:
    """``(influx model, numpy -> native)`` on ``backend`` (``torch`` or ``jax``)."""
    build = {"torch": torch_model, "jax": jax_model}[backend]
    return build(weights, dtype)
