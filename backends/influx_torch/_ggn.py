"""Generalised Gauss-Newton products of a wrapped torch module."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from influx._checks import scalar_loss

__all__ = ["ggnvp"]


def ggnvp(wrapped: Any, x: Any, y: Any, vectors: torch.Tensor) -> torch.Tensor:
    """``[K, P]``: ``J^T H_out J v`` for each row ``v`` of ``vectors [K, P]``.

    ``J`` is the Jacobian of the batch's outputs in ``theta``, ``H_out`` the
    Hessian of the batch-mean loss in the outputs. ``J v`` by forward mode
    (``jvp``, the primal pass shared by the ``K`` tangents under ``vmap``),
    ``H_out`` by reverse over reverse on the loss alone, ``J^T`` by one ``vjp``
    whose pullback is mapped over the vectors. A model with an operation that
    has no forward-mode rule (``nn.MultiheadAttention``'s fused kernel) gets
    ``J v`` by reverse over reverse instead: the pullback ``u -> J^T u`` is
    linear, and its own pullback applied to ``v`` is ``J v``. The caller holds
    eval mode.
    """
    x = wrapped._inputs(x)
    constants = wrapped._constants

    def outputs(theta: torch.Tensor) -> torch.Tensor:
        params = {**constants, **wrapped._unflatten(theta)}
        return functional_call(wrapped.model, params, (x,))

    def batch_loss(predictions: torch.Tensor) -> torch.Tensor:
        return scalar_loss(wrapped.loss(predictions, y), "Use a reduction='mean' loss.")

    predictions, pull_theta = vjp(outputs, wrapped.parameters)
    _, pull_outputs = vjp(grad(batch_loss), predictions)

    def forward_mode(vector: torch.Tensor) -> torch.Tensor:
        return jvp(outputs, (wrapped.parameters,), (vector,))[1]

    def reverse_mode(vector: torch.Tensor) -> torch.Tensor:
        _, transpose = vjp(lambda u: pull_theta(u)[0], torch.zeros_like(predictions))
        return transpose(vector)[0]

    def product(tangents: Any) -> Any:
        def one(vector: torch.Tensor) -> torch.Tensor:
            return pull_theta(pull_outputs(tangents(vector))[0])[0]

        return vmap(one)(vectors).detach()

    try:
        return product(forward_mode)
    except NotImplementedError:  # an operation without a forward-mode rule
        return product(reverse_mode)
