"""The benchmark workloads: data and trained weights as plain numpy files.

Every runner (influx on torch or JAX, and each peer in its own environment)
loads the same ``.npz`` file, so all of them see identical weights and data.
Numpy only: the peers' environments import this module too. The files are
written by ``make_workloads.py``.

A workload file holds ``x_train [N, D]`` and ``x_test [M, D]`` (float32),
``y_train [N]`` and ``y_test [M]`` (int64 class labels), and the MLP's layers
as ``weight_0, bias_0, weight_1, ...`` in torch's ``Linear`` layout
(``weight_i [out, in]``), with tanh between layers and a cross-entropy loss
(mean over the batch) on the logits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SPECS", "Workload", "cache_dir", "load"]


@dataclass(frozen=True)
class Spec:
    """What a workload is; see the module docstring of ``make_workloads``."""

    name: str
    description: str
    hessian_regularization: float
    batch_size: int


SPECS = {
    "W1": Spec(
        "W1",
        "digits, MLP 64-32-10 tanh (2,410 parameters), 1,000 train / 100 test",
        0.01,
        100,
    ),
    "W2": Spec(
        "W2",
        "synthetic, MLP 100-256-256-10 tanh (94,218 parameters), "
        "10,000 train / 20 test",
        0.01,
        100,
    ),
}


def cache_dir() -> Path:
    """Where the workload files live (``INFLUX_BENCH_CACHE`` overrides)."""
    default = Path(__file__).resolve().parent / ".cache"
    return Path(os.environ.get("INFLUX_BENCH_CACHE", default))


@dataclass(frozen=True)
class Workload:
    """A loaded workload: its spec, data and layer weights."""

    spec: Spec
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]

    @property
    def layer_sizes(self) -> list[int]:
        """``[D, hidden..., classes]``."""
        return [self.weights[0][0].shape[1]] + [w.shape[0] for w, _ in self.weights]

    @property
    def num_params(self) -> int:
        return sum(w.size + b.size for w, b in self.weights)


def load(name: str) -> Workload:
    """Load workload ``name`` (``"W1"``, ``"W2"``) from :func:`cache_dir`."""
    path = cache_dir() / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run `python benchmarks/make_workloads.py` first."
        )
    with np.load(path) as data:
        layers = sum(1 for key in data.files if key.startswith("weight_"))
        weights = [(data[f"weight_{i}"], data[f"bias_{i}"]) for i in range(layers)]
        return Workload(
            SPECS[name],
            data["x_train"],
            data["y_train"],
            data["x_test"],
            data["y_test"],
            weights,
        )
