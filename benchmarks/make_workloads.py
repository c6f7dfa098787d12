"""Write the benchmark workloads (data and trained weights) to ``.npz`` files.

- W1: scikit-learn's digits (pixels / 16); a random, stratified 1,000 / 100
  train / test split; an MLP 64-32-10 with tanh trained by full-batch L-BFGS
  on the mean cross-entropy to a minimum (gradient norm printed).
- W2: 10,000 + 20 synthetic points in 100 dimensions, labelled by a random
  tanh teacher with 10% of the labels resampled; an MLP 100-256-256-10 with
  tanh trained by Adam for 30 epochs.

Needs torch and scikit-learn. Deterministic for a given torch build. Run
``python benchmarks/make_workloads.py [--force]`` from the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import torch_mlp
from _workloads import cache_dir


def _weights(model: torch.nn.Sequential) -> dict[str, np.ndarray]:
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    out = {}
    for i, layer in enumerate(linears):
        out[f"weight_{i}"] = layer.weight.detach().numpy().astype(np.float32)
        out[f"bias_{i}"] = layer.bias.detach().numpy().astype(np.float32)
    return out


def _grad_norm(model, x, y) -> float:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


#: L2 penalty of W1's training objective: without it, cross-entropy on separable
#: data has no minimum (the loss and its Hessian go to zero).
W1_WEIGHT_DECAY = 1e-3


def make_w1() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=1000, test_size=100, stratify=y, random_state=0
    )
    torch.manual_seed(0)
    model = torch_mlp([64, 32, 10])
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=3000,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        penalty = sum(p.square().sum() for p in model.parameters())
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        (loss + W1_WEIGHT_DECAY / 2 * penalty).backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(xt), yt))
    norm = _grad_norm(model, xt, yt)
    print(f"W1: train loss {loss:.3e}, data-loss grad norm {norm:.2e}")
    return dict(
        x_train=x_train,
        y_train=y_train.astype(np.int64),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
        **_weights(model),
    )


def make_w2() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    n_train, n_test, dim = 10_000, 20, 100
    x = rng.standard_normal((n_train + n_test, dim)).astype(np.float32)
    teacher = np.tanh(x @ rng.standard_normal((dim, 32))) @ rng.standard_normal(
        (32, 10)
    )
    y = teacher.argmax(axis=1)
    noisy = rng.random(y.size) < 0.1
    y[noisy] = rng.integers(0, 10, noisy.sum())
    torch.manual_seed(2)
    model = torch_mlp([dim, 256, 256, 10])
    xt, yt = (
        torch.from_numpy(x[:n_train]),
        torch.from_numpy(y[:n_train].astype(np.int64)),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    for _ in range(30):
        for index in torch.randperm(n_train, generator=generator).split(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[index]), yt[index]).backward()
            optimizer.step()
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(xt), yt))
    print(f"W2: train loss {loss:.3e}, grad norm {_grad_norm(model, xt, yt):.2e}")
    return dict(
        x_train=x[:n_train],
        y_train=y[:n_train].astype(np.int64),
        x_test=x[n_train:],
        y_test=y[n_train:].astype(np.int64),
        **_weights(model),
    )


MAKERS = {"W1": make_w1, "W2": make_w2}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rewrite existing files")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for name, make in MAKERS.items():
        path = directory / f"{name}.npz"
        if path.exists() and not args.force:
            print(f"{path} exists")
            continue
        np.savez(path, **make())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
