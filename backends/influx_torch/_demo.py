"""Training the demo's small classifier in torch (used by ``influx demo``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from influx_torch._model import TorchTwiceDifferentiable


def train_demo_model(
    x: np.ndarray,
    y: np.ndarray,
    layers: list[tuple[np.ndarray, np.ndarray]],
    *,
    epochs: int,
    learning_rate: float,
) -> tuple[TorchTwiceDifferentiable, Callable[[np.ndarray], np.ndarray]]:
    """Train a tanh MLP from the initial ``layers`` with full-batch Adam.

    Parameters
    ----------
    x, y
        Inputs ``[N, D]`` (float) and integer labels ``[N]``.
    layers
        Initial ``(W [out, in], b [out])`` of each layer.
    epochs, learning_rate
        Adam steps on the whole training set, and their size.

    Returns
    -------
    model, predict
        The trained model wrapped with its cross-entropy loss, and a function
        from inputs ``[M, D]`` to logits ``[M, C]`` (numpy).
    """
    modules: list[torch.nn.Module] = []
    for index, (w, b) in enumerate(layers):
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w))
            linear.bias.copy_(torch.as_tensor(b))
        modules.append(linear)
        if index < len(layers) - 1:
            modules.append(torch.nn.Tanh())
    network = torch.nn.Sequential(*modules)
    loss = torch.nn.CrossEntropyLoss()
    inputs = torch.as_tensor(x, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.long)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss(network(inputs), targets).backward()
        optimizer.step()
    network.eval()
    for parameter in network.parameters():
        parameter.grad = None

    def predict(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.as_tensor(points, dtype=torch.float32)).numpy()

    return TorchTwiceDifferentiable(network, loss), predict
