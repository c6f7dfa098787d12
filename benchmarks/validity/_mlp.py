"""The MLP problem of the validity studies ``loo_mlp`` and ``lds``.

A tanh MLP with one hidden layer on sklearn's digits (8x8 images, 10 classes,
pixels scaled to [0, 1] and centred on the training mean), trained full batch
in float64 with numpy and scipy, so that retraining needs no framework and the
same weights are loaded into a torch and a JAX model for influx.

The training objective is

    F(theta) = (1/N) sum_i w_i l(z_i, theta) + (lambda / 2) ||theta||^2,

``l`` the cross-entropy, ``w_i = 1`` for the full model, every parameter
(weights and biases) under the L2 term. ``lambda`` is the influx
``hessian_regularization``, so that influx's ``H = hessian(L) + lambda I`` is
exactly the Hessian of ``F`` at the optimum. Removing point ``i`` sets
``w_i = 0`` and keeps the ``1/N``, so (see DESIGN.md's signs) the first-order
change of a test loss is ``+I_up(z_test, z_i) / N``.

Training is L-BFGS (scipy) followed by Newton steps (conjugate gradients on
finite-difference Hessian-vector products) until the gradient norm of ``F``
is below ``GTOL``: the stopping test is on the exact gradient, so the
finite differences only steer, they do not decide when it is done.

Parameters are one flat float64 vector ``theta`` ``[P]`` laid out as
``W1 [H, D], b1 [H], W2 [C, H], b2 [C]`` (torch's ``Linear`` layout).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: L2 weight of the training objective and influx's hessian_regularization.
REGULARIZATION = 1e-2
#: Hidden units of the MLP.
HIDDEN = 16
#: Classes of digits.
CLASSES = 10
#: Gradient norm of the training objective at which training stops.
GTOL = 1e-12
#: Seed of the initial weights (every training from scratch starts there).
INIT_SEED = 1

#: ``(label, method, curvature, options)`` of each configuration studied.
METHODS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("direct", "direct", "hessian", {}),
    ("cg", "cg", "hessian", {}),
    ("lissa", "lissa", "hessian", {}),
    ("arnoldi", "arnoldi", "hessian", {"rank_estimate": 100}),
    ("block", "block", "hessian", {}),
    ("direct", "direct", "ggn", {}),
    ("cg", "cg", "ggn", {}),
    ("lissa", "lissa", "ggn", {}),
    ("arnoldi", "arnoldi", "ggn", {"rank_estimate": 100}),
    ("block", "block", "ggn", {}),
    ("kfac", "kfac", "ggn", {"fisher": "ggn"}),
    ("ekfac", "ekfac", "ggn", {"fisher": "ggn"}),
)

#: ``(label, curvature)`` of the configurations of the quick runs.
QUICK_METHODS = (("direct", "hessian"), ("arnoldi", "hessian"), ("ekfac", "ggn"))


@dataclass(frozen=True)
class Problem:
    """Data and settings of one MLP problem.

    Attributes
    ----------
    x_train, y_train
        ``[N, D]`` float64 and ``[N]`` int64.
    x_test, y_test
        ``[T, D]`` float64 and ``[T]`` int64.
    hidden
        Hidden units ``H``.
    regularization
        ``lambda`` of the objective (and influx's hessian_regularization).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    hidden: int = HIDDEN
    regularization: float = REGULARIZATION

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(D, H, C)``."""
        return (self.x_train.shape[1], self.hidden, CLASSES)

    @property
    def num_params(self) -> int:
        d, h, c = self.sizes
        return h * d + h + c * h + c


def digits(
    n_train: int,
    n_test: int,
    *,
    seed: int = 0,
    hidden: int = HIDDEN,
    regularization: float = REGULARIZATION,
) -> Problem:
    """A random split of sklearn's digits: ``n_train`` and ``n_test`` points."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float64) / 16.0
    y = np.asarray(data.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    mean = x[train].mean(axis=0)
    return Problem(
        x[train] - mean, y[train], x[test] - mean, y[test], hidden, regularization
    )


# -- the network in numpy ------------------------------------------------------


def unpack(theta: np.ndarray, sizes: Sequence[int]) -> list[tuple[np.ndarray, ...]]:
    """``[(W1 [H, D], b1 [H]), (W2 [C, H], b2 [C])]`` views of ``theta [P]``."""
    d, h, c = sizes
    w1, rest = theta[: h * d].reshape(h, d), theta[h * d :]
    b1, rest = rest[:h], rest[h:]
    w2, b2 = rest[: c * h].reshape(c, h), rest[c * h :]
    return [(w1, b1), (w2, b2)]


def init_theta(sizes: Sequence[int], seed: int = INIT_SEED) -> np.ndarray:
    """Initial ``theta [P]``: weights ``N(0, 1/fan_in)``, biases 0."""
    d, h, c = sizes
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((h, d)) / np.sqrt(d)
    w2 = rng.standard_normal((c, h)) / np.sqrt(h)
    return np.concatenate([w1.ravel(), np.zeros(h), w2.ravel(), np.zeros(c)])


def _forward(theta: np.ndarray, sizes: Sequence[int], x: np.ndarray) -> tuple:
    (w1, b1), (w2, b2) = unpack(theta, sizes)
    hidden = np.tanh(x @ w1.T + b1)
    return hidden, hidden @ w2.T + b2


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def losses(
    theta: np.ndarray, sizes: Sequence[int], x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Cross-entropy of every point, ``[n]``."""
    logp = _log_softmax(_forward(theta, sizes, x)[1])
    return -logp[np.arange(len(y)), y]


def accuracy(
    theta: np.ndarray, sizes: Sequence[int], x: np.ndarray, y: np.ndarray
) -> float:
    """Share of ``x``'s points classified as ``y``."""
    return float(np.mean(_forward(theta, sizes, x)[1].argmax(axis=1) == y))


def objective(
    theta: np.ndarray,
    sizes: Sequence[int],
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    denominator: float,
    regularization: float,
) -> tuple[float, np.ndarray]:
    """``F(theta)`` (module docstring) and its gradient ``[P]``.

    ``weights [n]`` weigh the points, ``denominator`` replaces ``N``.
    """
    (_, _), (w2, _) = unpack(theta, sizes)
    hidden, logits = _forward(theta, sizes, x)
    logp = _log_softmax(logits)
    rows = np.arange(len(y))
    value = -(weights * logp[rows, y]).sum() / denominator
    value += 0.5 * regularization * theta @ theta
    dlogits = np.exp(logp)
    dlogits[rows, y] -= 1.0
    dlogits *= (weights / denominator)[:, None]
    dpre = (dlogits @ w2) * (1.0 - hidden**2)
    grad = np.concatenate(
        [
            (dpre.T @ x).ravel(),
            dpre.sum(axis=0),
            (dlogits.T @ hidden).ravel(),
            dlogits.sum(axis=0),
        ]
    )
    return float(value), grad + regularization * theta


def sample_gradients(
    theta: np.ndarray, sizes: Sequence[int], x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Gradients ``[n, P]`` of each point's cross-entropy (no L2 term)."""
    (_, _), (w2, _) = unpack(theta, sizes)
    hidden, logits = _forward(theta, sizes, x)
    dlogits = np.exp(_log_softmax(logits))
    dlogits[np.arange(len(y)), y] -= 1.0
    dpre = (dlogits @ w2) * (1.0 - hidden**2)
    return np.concatenate(
        [
            np.einsum("nh,nd->nhd", dpre, x).reshape(len(y), -1),
            dpre,
            np.einsum("nc,nh->nch", dlogits, hidden).reshape(len(y), -1),
            dlogits,
        ],
        axis=1,
    )


@dataclass(frozen=True)
class Trained:
    """``theta [P]`` at the optimum, its gradient norm, iterations, seconds."""

    theta: np.ndarray
    grad_norm: float
    iterations: int
    seconds: float


def train(
    problem: Problem,
    theta0: np.ndarray | None = None,
    *,
    weights: np.ndarray | None = None,
    denominator: float | None = None,
    gtol: float = GTOL,
) -> Trained:
    """Minimise ``F`` from ``theta0`` (default: :func:`init_theta`).

    ``weights [N]`` weigh the training points (default all ones) and
    ``denominator`` is the ``N`` of ``1/N`` (default ``N``). Stops when the
    gradient norm is below ``gtol``; raises ``RuntimeError`` if it is not
    reached.
    """
    from threadpoolctl import threadpool_limits

    # Small products: one BLAS thread is many times faster than several.
    with threadpool_limits(limits=1, user_api="blas"):
        return _train(problem, theta0, weights, denominator, gtol)


def _train(
    problem: Problem,
    theta0: np.ndarray | None,
    weights: np.ndarray | None,
    denominator: float | None,
    gtol: float,
) -> Trained:
    from scipy.optimize import minimize
    from scipy.sparse.linalg import LinearOperator, cg

    start = time.perf_counter()
    x, y, sizes = problem.x_train, problem.y_train, problem.sizes
    weights = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    denominator = float(len(y) if denominator is None else denominator)
    args = (sizes, x, y, weights, denominator, problem.regularization)
    theta = init_theta(sizes) if theta0 is None else np.array(theta0, dtype=float)
    result = minimize(
        objective,
        theta,
        args=args,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 50_000, "maxcor": 30, "gtol": 1e-8, "ftol": 0.0},
    )
    theta, iterations = result.x, int(result.nit)
    grad = objective(theta, *args)[1]
    for _ in range(20):  # Newton polish
        if np.linalg.norm(grad) < gtol:
            break
        step = 1e-6 / max(1.0, np.linalg.norm(theta))

        def hvp(v: np.ndarray, theta: np.ndarray = theta, step: float = step) -> Any:
            v = np.ravel(v)
            scale = step / max(np.linalg.norm(v), 1e-300)
            plus = objective(theta + scale * v, *args)[1]
            minus = objective(theta - scale * v, *args)[1]
            return (plus - minus) / (2 * scale)

        size = theta.size
        hessian = LinearOperator((size, size), matvec=hvp, dtype=np.float64)
        # Inexact Newton: ask CG for just the reduction still needed.
        rtol = min(1e-2, max(1e-10, 0.1 * gtol / np.linalg.norm(grad)))
        delta, _ = cg(hessian, -grad, rtol=rtol, maxiter=2 * size)
        theta = theta + delta
        grad = objective(theta, *args)[1]
        iterations += 1
    grad_norm = float(np.linalg.norm(grad))
    if not grad_norm < gtol:
        raise RuntimeError(
            f"training stopped at gradient norm {grad_norm:.3g} > gtol={gtol:g}"
        )
    return Trained(theta, grad_norm, iterations, time.perf_counter() - start)


# -- the same weights in influx ------------------------------------------------


def wrap(backend: str, theta: np.ndarray, sizes: Sequence[int]) -> Any:
    """The MLP of ``theta`` as an influx model on ``backend``, float64."""
    import influx

    layers = unpack(theta, sizes)
    if backend == "torch":
        import torch

        modules: list[Any] = []
        for index, (w, b) in enumerate(layers):
            linear = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(np.array(w)))
                linear.bias.copy_(torch.from_numpy(np.array(b)))
            modules.append(linear)
            if index < len(layers) - 1:
                modules.append(torch.nn.Tanh())
        return influx.twice_differentiable(
            torch.nn.Sequential(*modules).eval(), torch.nn.CrossEntropyLoss()
        )
    if backend != "jax":
        raise ValueError(f"backend must be 'torch' or 'jax', got {backend!r}")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    params = [
        {"w": jnp.asarray(w, dtype=jnp.float64), "b": jnp.asarray(b, jnp.float64)}
        for w, b in layers
    ]

    def apply_fn(p: Any, x: Any) -> Any:
        h = jnp.tanh(x @ p[0]["w"].T + p[0]["b"])
        return h @ p[1]["w"].T + p[1]["b"]

    def loss(logits: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return influx.twice_differentiable(apply_fn, loss, params=params)


def influences(
    backend: str,
    theta: np.ndarray,
    problem: Problem,
    test: np.ndarray,
    method: str,
    curvature: str,
    options: dict[str, Any] | None = None,
    batch_size: int = 128,
    *,
    model: Any = None,
    repeats: int = 1,
) -> tuple[np.ndarray, float, list[str]]:
    """``I_up`` ``[len(test), N]`` of the test points ``test`` (indices) on
    every training point, the seconds of fit plus query, and the warnings
    raised (their text, first run).

    ``model`` is the wrapped model of ``theta`` (default: wrapped afresh).
    The fit and query run ``repeats`` times and the last run's wall-clock
    seconds are reported: the first run includes one-off costs (JAX's
    compilation, torch's first calls).
    """
    import warnings

    import influx

    if model is None:
        model = wrap(backend, theta, problem.sizes)
    train = influx.batches(problem.x_train, problem.y_train, batch_size=batch_size)
    queried = influx.batches(
        problem.x_test[test], problem.y_test[test], batch_size=batch_size
    )
    messages: list[str] = []
    for repeat in range(repeats):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", influx.InfluxWarning)
            start = time.perf_counter()
            inf = influx.Influence(
                model,
                method,
                problem.regularization,
                curvature=curvature,
                **(options or {}),
            ).fit(train)
            scores = inf.influences(queried)
            if hasattr(scores, "detach"):
                scores = scores.detach().cpu().numpy()
            scores = np.asarray(scores, dtype=np.float64)
            seconds = time.perf_counter() - start
        if repeat == 0:
            messages = [str(w.message) for w in caught]
    return scores, seconds, messages


def gradient_similarity(
    theta: np.ndarray, problem: Problem, test: np.ndarray
) -> np.ndarray:
    """TracIn-style scores ``<grad l(test), grad l(train)>`` ``[len(test), N]``
    at the final model (identity curvature; same sign as ``I_up``)."""
    sizes = problem.sizes
    g_test = sample_gradients(theta, sizes, problem.x_test[test], problem.y_test[test])
    g_train = sample_gradients(theta, sizes, problem.x_train, problem.y_train)
    return g_test @ g_train.T
