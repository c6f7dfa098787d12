"""The PyTorch example's factory: a small MLP trained in a few seconds.

``influx run examples/torch/job.toml`` calls :func:`build` and wraps what it
returns (the module and its loss) for the torch backend.
"""

from __future__ import annotations

from typing import Any

import torch

from examples.data import initial_layers, make_data


def build(
    n_train: int = 2000,
    n_test: int = 50,
    hidden: int = 16,
    epochs: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the MLP (float64, full-batch Adam) and return it with its data."""
    x_train, y_train, x_test, y_test = make_data(n_train, n_test, seed=seed)
    modules: list[torch.nn.Module] = []
    for index, (w, b) in enumerate(initial_layers(hidden, seed)):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w))
            linear.bias.copy_(torch.as_tensor(b))
        modules += [linear, torch.nn.Tanh()] if index == 0 else [linear]
    model = torch.nn.Sequential(*modules)
    loss = torch.nn.functional.cross_entropy
    inputs, targets = torch.as_tensor(x_train), torch.as_tensor(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    try:
        for _ in range(epochs):
            optimizer.zero_grad()
            loss(model(inputs), targets).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return {
        "model": model,
        "loss": loss,
        "train": (x_train, y_train),
        "test": (x_test, y_test),
    }
