"""JAX layer structure: ``layer_batch`` against per-sample gradients, and ``ggnvp``.

``python benchmarks/jax_layer_batch.py [--model mlp|cnn] [--batch 500]``

Warm wall time (the median of ``--repeats`` calls after one compiling call)
of, on one batch, float32:

- ``per_sample_grads`` (``[B, P]``, the path before issue 9);
- ``layer_batch`` with ``fisher="empirical"``, ``"mc"`` (one draw) and
  ``"ggn"`` (``S = C = 10`` probes): layer inputs and output gradients, never
  ``[B, P]``;
- ``hvp`` and ``ggnvp`` on 8 vectors.

Models: ``mlp`` 784-1024-256-10 with ReLU (P = 1,068,810); ``cnn`` two 3x3
convolutions (32 and 64 channels, the second of stride 2), a 2x2 max-pool and
two dense layers on 3x32x32 images (P = 150,826). The load average is printed,
as the machine may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from influx_jax import JaxTwiceDifferentiable


def _mlp(rng: np.random.Generator) -> tuple[Any, Any, tuple[int, ...]]:
    sizes = (784, 1024, 256, 10)
    params = [
        {
            "w": jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), jnp.float32),
            "b": jnp.zeros(o, jnp.float32),
        }
        for i, o in itertools.pairwise(sizes)
    ]

    def apply_fn(p: Any, x: Any) -> Any:
        for k, layer in enumerate(p):
            x = x @ layer["w"] + layer["b"]
            if k < len(p) - 1:
                x = jax.nn.relu(x)
        return x

    return apply_fn, params, (784,)


def _cnn(rng: np.random.Generator) -> tuple[Any, Any, tuple[int, ...]]:
    def normal(*shape: int, scale: float) -> Any:
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    params = {
        "c1": {"k": normal(32, 3, 3, 3, scale=0.2), "b": jnp.zeros(32, jnp.float32)},
        "c2": {"k": normal(64, 32, 3, 3, scale=0.06), "b": jnp.zeros(64, jnp.float32)},
        "d": {"w": normal(4096, 32, scale=0.015), "b": jnp.zeros(32, jnp.float32)},
        "o": {"w": normal(32, 10, scale=0.17), "b": jnp.zeros(10, jnp.float32)},
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = jax.lax.conv_general_dilated(x, p["c1"]["k"], (1, 1), "SAME")
        h = jax.nn.relu(h + p["c1"]["b"][:, None, None])
        h = jax.lax.conv_general_dilated(h, p["c2"]["k"], (2, 2), "SAME")
        h = jax.nn.relu(h + p["c2"]["b"][:, None, None])
        window = (1, 1, 2, 2)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, window, window, "VALID")
        h = jax.nn.relu(h.reshape(h.shape[0], -1) @ p["d"]["w"] + p["d"]["b"])
        return h @ p["o"]["w"] + p["o"]["b"]

    return apply_fn, params, (3, 32, 32)


def _cross_entropy(logits: Any, y: Any) -> Any:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def _ready(result: Any) -> None:
    if dataclasses.is_dataclass(result):
        result = dataclasses.astuple(result)
    jax.block_until_ready(jax.tree_util.tree_leaves(result))


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    _ready(fn())
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        _ready(fn())
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    apply_fn, params, shape = (_mlp if args.model == "mlp" else _cnn)(rng)
    model = JaxTwiceDifferentiable(apply_fn, params, _cross_entropy)
    x = rng.standard_normal((args.batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    vectors = jnp.asarray(rng.standard_normal((8, model.num_params)), jnp.float32)

    def noise(count: int, outputs: int) -> np.ndarray:
        return np.random.default_rng(1).standard_normal((count, 1, outputs))

    layers = [(layer.name, layer.kind) for layer in model.find_layers(x)]
    print(f"{args.model}: P={model.num_params}, B={args.batch}, layers {layers}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    cases = {
        "per_sample_grads": lambda: model.per_sample_grads(x, y),
        "layer_batch empirical": lambda: model.layer_batch(x, y),
        "layer_batch mc (S=1)": lambda: model.layer_batch(
            x, y, fisher="mc", noise=noise
        ),
        "layer_batch ggn (S=10)": lambda: model.layer_batch(x, y, fisher="ggn"),
        "hvp (K=8)": lambda: model.hvp(x, y, vectors),
        "ggnvp (K=8)": lambda: model.ggnvp(x, y, vectors),
    }
    for name, fn in cases.items():
        cold, warm = _time(fn, args.repeats)
        print(f"{name:24s} cold {cold:7.3f} s   warm {warm:7.3f} s")


if __name__ == "__main__":
    main()
