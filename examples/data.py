"""The examples' problem: three Gaussian clusters in 4 dimensions, some labels flipped.

Both examples (torch and JAX) train the same MLP (4 -> hidden -> 3, tanh) on
this data, so their influences tell the same story: the flipped training
points are among the most harmful ones.
"""

from __future__ import annotations

import itertools

import numpy as np

NUM_FEATURES = 4
NUM_CLASSES = 3


def make_data(
    n_train: int, n_test: int, *, flipped: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clustered points with a fraction ``flipped`` of wrong training labels.

    Returns
    -------
    x_train, y_train, x_test, y_test
        Inputs ``[N, 4]`` float64 and integer labels ``[N]`` (int64).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(NUM_CLASSES, NUM_FEATURES))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, NUM_CLASSES, size=n)
        return centers[labels] + rng.normal(size=(n, NUM_FEATURES)), labels

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    wrong = rng.choice(n_train, size=int(flipped * n_train), replace=False)
    y_train[wrong] = (y_train[wrong] + rng.integers(1, NUM_CLASSES, wrong.size)) % 3
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def initial_layers(hidden: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(W [out, in], b [out])`` of each layer, the same for both frameworks."""
    rng = np.random.default_rng(seed + 1)
    sizes = [NUM_FEATURES, hidden, NUM_CLASSES]
    return [
        (rng.normal(scale=d_in**-0.5, size=(d_out, d_in)), np.zeros(d_out))
        for d_in, d_out in itertools.pairwise(sizes)
    ]
