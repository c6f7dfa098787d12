"""Shared bits of the validity studies: data, the logistic regression, wrapping.

The L2-regularised multinomial logistic regression is trained in numpy
(float64, Newton's method with a backtracking line search) to a gradient norm
near machine precision; its objective is

    J(theta) = (1/N) sum_i w_i l(z_i, theta) + (lam / 2) ||theta||^2,

``theta = [W | b]`` (every parameter regularised, the bias too), ``l`` the
cross-entropy, ``w_i`` sample weights (all 1; leaving point ``i`` out sets
``w_i = 0`` and keeps the ``1/N``, which is exactly up-weighting by ``-1/N``).
Its Hessian is ``hessian((1/N) sum l) + lam I``: influx's ``H`` with
``hessian_regularization=lam``. The weights are then loaded into a torch and a
JAX model (float64) whose loss is the plain cross-entropy (the L2 term lives
in ``hessian_regularization``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "validity"

#: Inversion methods of the logistic-regression LOO study, with their options.
#: K-FAC and EK-FAC use the exact Gauss-Newton probes (``fisher="ggn"``): for a
#: linear model the Gauss-Newton matrix is the Hessian.
LOGISTIC_METHODS: dict[str, dict[str, Any]] = {
    "direct": {},
    "cg": {"rtol": 1e-10, "maxiter": 2000},
    "lissa": {"maxiter": 3000, "rtol": 1e-8},
    "arnoldi": {},  # rank_estimate = P is set per model
    "block": {},
    "kfac": {"fisher": "ggn"},
    "ekfac": {"fisher": "ggn"},
}


# -- data ---------------------------------------------------------------------


def digits(
    num_train: int, num_test: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's digits, pixels scaled to ``[0, 1]``, a random split.

    Returns
    -------
    x_train, y_train, x_test, y_test
        Inputs ``[N, 64]`` float64 and labels ``[N]`` int64.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:num_train], order[num_train : num_train + num_test]
    return x[train], y[train], x[test], y[test]


def flip_labels(
    y: np.ndarray, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``y`` with ``fraction`` of its labels changed to another class.

    Returns
    -------
    noisy, flipped
        The new labels ``[N]`` and the sorted indices that were flipped.
    """
    rng = np.random.default_rng(seed)
    count = round(fraction * len(y))
    flipped = np.sort(rng.choice(len(y), size=count, replace=False))
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, num_classes, size=count)) % (
        num_classes
    )
    return noisy, flipped


# -- the logistic regression --------------------------------------------------


@dataclass(frozen=True)
class Logistic:
    """Fitted parameters: ``weight [C, D]``, ``bias [C]``; the final gradient norm."""

    weight: np.ndarray
    bias: np.ndarray
    grad_norm: float
    iterations: int

    @property
    def theta(self) -> np.ndarray:
        """``[C, D + 1]``: the weight and the bias as its last column."""
        return np.concatenate([self.weight, self.bias[:, None]], axis=1)

    def losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-point cross-entropy ``[M]``."""
        return _losses(self.theta, _augment(x), y)


def _augment(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _losses(theta: np.ndarray, xa: np.ndarray, y: np.ndarray) -> np.ndarray:
    logp = _log_softmax(xa @ theta.T)
    return -logp[np.arange(len(y)), y]


def _objective(
    theta: np.ndarray, xa: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float
) -> float:
    return float(w @ _losses(theta, xa, y) / len(y) + 0.5 * lam * np.sum(theta**2))


def _gradient_hessian(
    theta: np.ndarray, xa: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient ``[C * (D+1)]`` and Hessian of ``J`` (row-major ``theta``)."""
    n, d = xa.shape
    c = theta.shape[0]
    p = np.exp(_log_softmax(xa @ theta.T))  # [N, C]
    residual = p.copy()
    residual[np.arange(n), y] -= 1.0
    grad = (residual * w[:, None]).T @ xa / n + lam * theta
    weighted = xa * (w[:, None] / n)
    hessian = np.zeros((c * d, c * d))
    for k in range(c):
        hessian[k * d : (k + 1) * d, k * d : (k + 1) * d] = (
            weighted * p[:, k : k + 1]
        ).T @ xa
    a = (p[:, :, None] * xa[:, None, :]).reshape(n, c * d)
    hessian -= (a * (w[:, None] / n)).T @ a
    hessian[np.diag_indices_from(hessian)] += lam
    return grad.ravel(), hessian


def train_logistic(
    x: np.ndarray,
    y: np.ndarray,
    lam: float,
    *,
    num_classes: int = 10,
    weights: np.ndarray | None = None,
    start: Logistic | None = None,
    max_iterations: int = 50,
) -> Logistic:
    """Minimise ``J`` with Newton's method to a gradient norm near rounding.

    Parameters
    ----------
    x, y
        Inputs ``[N, D]`` and labels ``[N]``.
    lam
        The L2 weight ``lam`` (> 0: the objective is then strictly convex).
    weights
        Sample weights ``w [N]`` (default ones); the mean still divides by N.
    start
        Warm start (default zeros).
    """
    xa = _augment(x)
    n, d = xa.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    theta = np.zeros((num_classes, d)) if start is None else start.theta.copy()
    value = _objective(theta, xa, y, w, lam)
    best = np.inf
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007
        grad, hessian = _gradient_hessian(theta, xa, y, w, lam)
        norm = float(np.linalg.norm(grad))
        # Stop once the gradient stops shrinking (rounding reached).
        if norm < 1e-15 or (norm < 1e-12 and norm > 0.1 * best):
            break
        best = min(best, norm)
        step = scipy.linalg.cho_solve(scipy.linalg.cho_factor(hessian), grad)
        step = step.reshape(theta.shape)
        size = 1.0
        while size > 1e-10:
            trial = theta - size * step
            trial_value = _objective(trial, xa, y, w, lam)
            if trial_value <= value + 1e-4 * size * -float(grad @ step.ravel()) or (
                norm < 1e-8
            ):
                break
            size *= 0.5
        theta, value = trial, trial_value
    grad, _ = _gradient_hessian(theta, xa, y, w, lam)
    return Logistic(
        theta[:, :-1].copy(),
        theta[:, -1].copy(),
        float(np.linalg.norm(grad)),
        iterations,
    )


def _gradient(
    theta: np.ndarray, xa: np.ndarray, y: np.ndarray, w: np.ndarray, lam: float
) -> np.ndarray:
    """Gradient of ``J``, ``[C * (D+1)]``."""
    n = len(y)
    residual = np.exp(_log_softmax(xa @ theta.T))
    residual[np.arange(n), y] -= 1.0
    return ((residual * w[:, None]).T @ xa / n + lam * theta).ravel()


def leave_out(
    x: np.ndarray,
    y: np.ndarray,
    lam: float,
    fitted: Logistic,
    index: int,
    factor: Any,
    *,
    max_iterations: int = 100,
) -> Logistic:
    """Retrain without point ``index`` from ``fitted`` (warm start).

    Newton's method with the Hessian fixed at the full-data optimum (its
    Cholesky ``factor``, see :func:`hessian_factor`): removing one of ``N``
    points changes the Hessian by ``O(1/N)``, so the iteration contracts by
    about that much per step, each step a gradient and two triangular solves.
    It stops where the gradient norm stops shrinking (near rounding); if it
    has not reached ``1e-12`` by then, full Newton finishes the job.
    """
    xa = _augment(x)
    w = np.ones(len(y))
    w[index] = 0.0
    theta = fitted.theta.copy()
    best = np.inf
    for iterations in range(1, max_iterations + 1):
        grad = _gradient(theta, xa, y, w, lam)
        norm = float(np.linalg.norm(grad))
        if norm < 1e-15 or (norm < 1e-12 and norm > 0.5 * best):
            return Logistic(theta[:, :-1].copy(), theta[:, -1].copy(), norm, iterations)
        best = min(best, norm)
        theta = theta - scipy.linalg.cho_solve(factor, grad).reshape(theta.shape)
    start = Logistic(theta[:, :-1], theta[:, -1], norm, max_iterations)
    return train_logistic(x, y, lam, weights=w, start=start)


def hessian_factor(x: np.ndarray, y: np.ndarray, lam: float, fitted: Logistic) -> Any:
    """Cholesky factor of ``J``'s Hessian at ``fitted`` (for :func:`leave_out`)."""
    xa = _augment(x)
    _, hessian = _gradient_hessian(fitted.theta, xa, y, np.ones(len(y)), lam)
    return scipy.linalg.cho_factor(hessian)


@contextmanager
def single_threaded_blas() -> Any:
    """BLAS on one thread inside (threadpoolctl, if installed): the small
    dense solves here run faster than on shared cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# -- influx models ------------------------------------------------------------


def enable_x64() -> None:
    """Turn on JAX's float64 (before any JAX array is made)."""
    import jax

    jax.config.update("jax_enable_x64", True)


def wrap_linear(backend: str, weight: np.ndarray, bias: np.ndarray) -> Any:
    """A float64 linear classifier ``x W^T + b`` with mean cross-entropy."""
    import influx

    if backend == "torch":
        import torch

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
        return influx.twice_differentiable(linear.eval(), torch.nn.CrossEntropyLoss())
    if backend != "jax":
        raise ValueError(f"unknown backend {backend!r}; use torch or jax")
    enable_x64()
    import jax
    import jax.numpy as jnp

    def apply_fn(params: Any, x: Any) -> Any:
        return x @ params["w"].T + params["b"]

    def loss(logits: Any, labels: Any) -> Any:
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    params = {"w": jnp.asarray(weight), "b": jnp.asarray(bias)}
    return influx.twice_differentiable(apply_fn, loss, params=params)


def to_numpy(array: Any) -> np.ndarray:
    """A native array as float64 numpy."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


# -- running and reporting ----------------------------------------------------


@contextmanager
def timer() -> Any:
    """``with timer() as t: ...``; ``t["seconds"]`` afterwards."""
    record = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - start


def environment(backends: Iterable[str]) -> dict[str, str]:
    """Machine and versions, for the report."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ["influx", "numpy", "scipy", "scikit-learn", *backends]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores "
        f"({platform.system()} {platform.release()})",
        "processor": platform.processor() or "unknown",
        **versions,
    }


def save_json(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` to ``benchmarks/results/validity/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value)}")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(ax: Any, path: Path) -> None:
    """Save the figure of ``ax`` to ``path`` and close it."""
    import matplotlib.pyplot as plt

    figure = ax.figure
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
