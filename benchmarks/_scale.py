"""Workloads S1 and S2 (issue 9): a small CNN and a 1M-parameter MLP.

Data: scikit-learn's bundled digits (8 x 8 pixels / 16), augmented by
deterministic shifts. The 1,797 images are split first (stratified, seed 0)
into a test pool of 100 and a train pool; each train-pool image gives 25
copies shifted by ``(dy, dx)`` in ``{-2..2}^2`` (zero fill), plus Gaussian
pixel noise of 0.05, and the 42,425 augmented images are shuffled with a fixed
seed. The first ``n_train`` are a workload's training set; its 10 test points
are the first 10 test-pool images (unshifted, so no test image is a shifted
copy of a training image).

- S1: ``Conv2d(1, 8, 3, pad 1) -> ReLU -> Conv2d(8, 16, 3, pad 1) -> ReLU ->
  flatten -> Linear(1024, 128) -> ReLU -> Linear(128, 10)`` (133,738
  parameters) on 5,000 images ``[N, 1, 8, 8]`` (NCHW), trained by Adam (lr
  1e-3, batch 64) for 4 epochs only (train accuracy 0.75: not at a minimum).
  ``S1-10k`` and ``S1-40k`` are the same weights on the first 10,000 and
  40,000 images (peak memory against N).
- S2: a tanh MLP 64-1024-1024-10 (1,126,410 parameters) on 2,000 flattened
  images ``[N, 64]``, trained by Adam (lr 1e-3, batch 64) for
  12 epochs (train accuracy 0.62).

The file ``benchmarks/.cache/<name>.npz`` holds ``x_train, y_train, x_test,
y_test`` and each parameter as ``param/<torch state_dict name>`` (weights in
torch's layout: Linear ``[out, in]``, Conv2d ``OIHW``), so torch and JAX load
the same numbers. Numpy at import time (the peers' environments import it);
torch and JAX are imported by the functions that need them.

Run ``python benchmarks/_scale.py [--force]`` to write the files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import cache_dir

__all__ = ["SCALE_SPECS", "ScaleWorkload", "jax_apply", "load_scale", "torch_net"]


@dataclass(frozen=True)
class ScaleSpec:
    """One S workload: architecture, sizes and the shared settings."""

    name: str
    arch: str  # "cnn" or "mlp"
    n_train: int
    description: str
    hessian_regularization: float
    batch_size: int
    weights_from: str  # the workload whose trained weights this one uses


SCALE_SPECS = {
    "S1": ScaleSpec(
        "S1",
        "cnn",
        5_000,
        "digits shifted, CNN conv8-conv16-fc128-10 ReLU (133,738 parameters), "
        "5,000 train / 10 test",
        1.0,
        500,
        "S1",
    ),
    "S1-10k": ScaleSpec("S1-10k", "cnn", 10_000, "S1 on 10,000 images", 1.0, 500, "S1"),
    "S1-40k": ScaleSpec("S1-40k", "cnn", 40_000, "S1 on 40,000 images", 1.0, 500, "S1"),
    "S2": ScaleSpec(
        "S2",
        "mlp",
        2_000,
        "digits shifted, MLP 64-1024-1024-10 tanh (1,126,410 parameters), "
        "2,000 train / 10 test",
        1.0,
        500,
        "S2",
    ),
}

N_TEST = 10
MLP_SIZES = (64, 1024, 1024, 10)


@dataclass(frozen=True)
class ScaleWorkload:
    """A loaded S workload: spec, data and parameters by torch name."""

    spec: ScaleSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    params: dict[str, np.ndarray]

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params.values())


def _path(name: str) -> Path:
    return cache_dir() / f"{name}.npz"


def load_scale(name: str) -> ScaleWorkload:
    """Load S workload ``name`` from :func:`_workloads.cache_dir`."""
    spec = SCALE_SPECS[name]
    path = _path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/_scale.py`")
    with np.load(path) as data:
        params = {k[len("param/") :]: data[k] for k in data.files if "/" in k}
        return ScaleWorkload(
            spec,
            data["x_train"],
            data["y_train"],
            data["x_test"],
            data["y_test"],
            params,
        )


# --------------------------------------------------------------------------- #
# Models: torch and JAX, same parameters
# --------------------------------------------------------------------------- #


def torch_net(arch: str, dtype: str = "float32") -> Any:
    """An untrained S1 CNN (``"cnn"``) or S2 MLP (``"mlp"``) as ``nn.Sequential``."""
    import torch
    from torch import nn

    kw = {"dtype": getattr(torch, dtype)}
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, **kw),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, **kw),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 8 * 8, 128, **kw),
            nn.ReLU(),
            nn.Linear(128, 10, **kw),
        )
    sizes = MLP_SIZES
    layers: list[Any] = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(sizes[i], sizes[i + 1], **kw))
    return nn.Sequential(*layers)


def torch_module(workload: ScaleWorkload, dtype: str = "float32") -> Any:
    """The workload's network with its parameters, eval mode."""
    import torch

    net = torch_net(workload.spec.arch, dtype)
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in workload.params.items()}
    net.load_state_dict(state)
    return net.eval()


def jax_apply(arch: str) -> Callable[[dict[str, Any], Any], Any]:
    """``apply_fn(params, x) -> logits`` in plain JAX, params by torch name.

    Convolutions use ``lax.conv_general_dilated`` on NCHW inputs and OIHW
    kernels; dense layers compute ``x @ W.T + b`` with torch's ``[out, in]``.
    """
    import jax
    import jax.numpy as jnp

    def dense(params: dict[str, Any], name: str, x: Any) -> Any:
        return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]

    def conv(params: dict[str, Any], name: str, x: Any) -> Any:
        out = jax.lax.conv_general_dilated(
            x,
            params[f"{name}.weight"],
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        return out + params[f"{name}.bias"][None, :, None, None]

    if arch == "cnn":

        def apply_cnn(params: dict[str, Any], x: Any) -> Any:
            x = jax.nn.relu(conv(params, "0", x))
            x = jax.nn.relu(conv(params, "2", x))
            x = x.reshape(x.shape[0], -1)
            x = jax.nn.relu(dense(params, "5", x))
            return dense(params, "7", x)

        return apply_cnn

    def apply_mlp(params: dict[str, Any], x: Any) -> Any:
        x = jnp.tanh(dense(params, "0", x))
        x = jnp.tanh(dense(params, "2", x))
        return dense(params, "4", x)

    return apply_mlp


def jax_cross_entropy(logits: Any, labels: Any) -> Any:
    """Mean cross-entropy of integer labels (JAX)."""
    import jax
    import jax.numpy as jnp

    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


# --------------------------------------------------------------------------- #
# Generation
# --------------------------------------------------------------------------- #


def _augmented_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_pool [42425, 1, 8, 8], y_pool, x_test [100, 1, 8, 8], y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y, test_size=100, stratify=y, random_state=0
    )
    rng = np.random.default_rng(0)
    images, labels = [], []
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = np.zeros_like(x_pool)
            src = x_pool[:, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
            shifted[:, max(0, dy) : 8 - max(0, -dy), max(0, dx) : 8 - max(0, -dx)] = src
            images.append(shifted)
            labels.append(y_pool)
    pool = np.concatenate(images)
    pool = pool + 0.05 * rng.standard_normal(pool.shape)
    labels_all = np.concatenate(labels)
    order = rng.permutation(len(pool))
    return (
        pool[order][:, None].astype(np.float32),
        labels_all[order].astype(np.int64),
        x_test[:, None].astype(np.float32),
        y_test.astype(np.int64),
    )


def _train(arch: str, x: np.ndarray, y: np.ndarray, epochs: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    net = torch_net(arch)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[index]), yt[index]).backward()
            optimizer.step()
    net.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(xt), yt)
    loss.backward()
    norm = float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())
    accuracy = float((net(xt).argmax(1) == yt).float().mean())
    loss_value = float(loss.detach())
    print(f"{arch}: train loss {loss_value:.3f}, acc {accuracy:.3f}, grad {norm:.2e}")
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def make_all(force: bool = False) -> None:
    """Write every S workload file that is missing (all with ``force``)."""
    import torch

    torch.set_num_threads(1)
    todo = [n for n in SCALE_SPECS if force or not _path(n).exists()]
    if not todo:
        print("S workloads exist")
        return
    x_pool, y_pool, x_test, y_test = _augmented_digits()
    cache_dir().mkdir(parents=True, exist_ok=True)
    trained: dict[str, dict[str, Any]] = {}
    for name in SCALE_SPECS:  # S1 before its variants
        spec = SCALE_SPECS[name]
        flat = spec.arch == "mlp"
        xs = x_pool[: spec.n_train]
        xq = x_test[:N_TEST]
        if flat:
            xs, xq = xs.reshape(len(xs), -1), xq.reshape(len(xq), -1)
        if spec.weights_from not in trained:
            epochs = 4 if spec.arch == "cnn" else 12
            trained[spec.weights_from] = _train(
                spec.arch, xs, y_pool[: spec.n_train], epochs
            )
        if name not in todo:
            continue
        params = {f"param/{k}": v for k, v in trained[spec.weights_from].items()}
        np.savez(
            _path(name),
            x_train=xs,
            y_train=y_pool[: spec.n_train],
            x_test=xq,
            y_test=y_test[:N_TEST],
            **params,
        )
        print(f"wrote {_path(name)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the S workloads")
    parser.add_argument("--force", action="store_true")
    make_all(parser.parse_args().force)
