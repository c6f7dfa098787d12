"""``influx demo``: find mislabeled training points of a small classifier.

The demo generates a three-class problem (Gaussian clusters in 4 dimensions),
flips the labels of a few training points, trains a small tanh MLP on the
selected backend and fits :class:`influx.Influence` once (Gauss-Newton
curvature). It ranks the training points by self-influence
``<H^{-1} g_i, g_i>`` (highest first), the standard way to find mislabeled
points, and prints how many flipped labels are in the top 10% and 20% of that
ranking against chance; then, for a few test points, the most helpful and the
most harmful training points. Everything is generated: no download.
"""

from __future__ import annotations

import importlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from influx.attribution import Influence
from influx.backends import get_backend, resolve_backend_name

__all__ = ["DemoResult", "run_demo"]

NUM_FEATURES = 4
NUM_CLASSES = 3
HIDDEN = 16
#: Standard deviation of the cluster centres (the points' noise is 1).
CENTER_SCALE = 3.0
#: Shares of the ranking the demo reports.
TOP_SHARES = (0.1, 0.2)


@dataclass(frozen=True)
class DemoResult:
    """What the demo computed (also returned for tests).

    Attributes
    ----------
    influences
        ``[N_test, N_train]`` up-weighting influences, numpy float64.
    flipped
        Indices of the training points whose label was flipped.
    harmful_hits
        How many flipped points are among the ``len(flipped)`` training
        points with the lowest mean influence (for comparison).
    seconds
        Wall time of the influence computation alone (fit, self-influence
        and influences).
    self_influence
        ``[N_train]`` self-influence of every training point, numpy float64.
    hits
        How many flipped points are among the top 10% and the top 20% of the
        training points ranked by self-influence: ``{0.1: k, 0.2: k}``.
    """

    influences: np.ndarray
    flipped: np.ndarray
    harmful_hits: int
    seconds: float
    self_influence: np.ndarray
    hits: dict[float, int]


def demo_trainer(backend: Any) -> Callable[..., Any]:
    """The ``train_demo_model`` function of ``backend``'s demo module.

    The demo is no part of the :class:`~influx.Backend` protocol: a backend
    offers one by shipping a module ``_demo`` in the package of its class
    (``influx_torch._demo`` next to ``influx_torch._backend``) with a function
    ``train_demo_model(x, y, layers, *, epochs, learning_rate) -> (model,
    predict)``: ``model`` the trained MLP wrapped with its cross-entropy loss,
    ``predict`` a function from numpy inputs ``[M, D]`` to numpy logits
    ``[M, C]``.

    Raises
    ------
    ValueError
        If the backend ships no demo.
    """
    package = type(backend).__module__.split(".")[0]
    name = f"{package}._demo"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name not in (name, package):
            raise
        module = None
    trainer = getattr(module, "train_demo_model", None)
    if trainer is None:
        raise ValueError(
            f"The {backend.name!r} backend has no demo model (no function "
            f"train_demo_model in a module {name}). Run the demo with "
            "--backend torch or --backend jax."
        )
    return trainer


def make_data(
    num_train: int, num_test: int, num_flipped: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clustered data with flipped training labels.

    Returns
    -------
    x_train, y_train, x_test, y_test, flipped
        Inputs ``[N, 4]`` float32, labels ``[N]`` int64, and the indices of the
        flipped training labels.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=CENTER_SCALE, size=(NUM_CLASSES, NUM_FEATURES))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, NUM_CLASSES, size=n)
        points = centers[labels] + rng.normal(size=(n, NUM_FEATURES))
        return points.astype(np.float32), labels.astype(np.int64)

    x_train, y_train = sample(num_train)
    x_test, y_test = sample(num_test)
    flipped = np.sort(rng.choice(num_train, size=num_flipped, replace=False))
    shift = rng.integers(1, NUM_CLASSES, size=num_flipped)
    y_train[flipped] = (y_train[flipped] + shift) % NUM_CLASSES
    return x_train, y_train, x_test, y_test, flipped


def run_demo(
    *,
    backend: str | None = None,
    method: str = "direct",
    num_train: int = 300,
    num_test: int = 100,
    num_flipped: int = 15,
    show: int = 3,
    regularization: float = 0.01,
    seed: int = 0,
    curvature: str = "ggn",
    plot: str | os.PathLike[str] | None = None,
    out: Any = print,
) -> DemoResult:
    """Run the demo and print its report through ``out``.

    Parameters
    ----------
    backend
        Backend name; ``None`` uses ``INFLUX_BACKEND``, else torch if
        installed, else jax.
    method
        Inversion method.
    num_train, num_test, num_flipped
        Sizes of the generated data and number of flipped training labels.
    show
        Number of test points reported in detail.
    regularization
        ``hessian_regularization``.
    seed
        Seed of the data and the initial weights.
    curvature
        ``"ggn"`` (default: positive semi-definite, suits the MLP, which Adam
        leaves near but not at a minimum) or ``"hessian"``.
    plot
        If given, a path where the detection curve (flipped labels found
        against training points inspected, by self-influence) is saved as a
        picture; needs matplotlib (``pip install "influx[plot]"``).
    out
        Where lines go (``print`` by default).

    Raises
    ------
    ImportError
        If ``plot`` is given and matplotlib is not installed (checked before
        anything runs).
    """
    start = time.perf_counter()
    if plot is not None:
        _require_matplotlib()
    chosen = get_backend(resolve_backend_name(backend))
    train_demo_model = demo_trainer(chosen)
    x_train, y_train, x_test, y_test, flipped = make_data(
        num_train, num_test, num_flipped, seed
    )
    rng = np.random.default_rng(seed + 1)
    sizes = (NUM_FEATURES, HIDDEN, NUM_CLASSES)
    layers = [
        (rng.normal(size=(o, i)) / np.sqrt(i), np.zeros(o))
        for i, o in itertools.pairwise(sizes)
    ]
    t0 = time.perf_counter()
    model, predict = train_demo_model(
        x_train, y_train, layers, epochs=300, learning_rate=0.03
    )
    train_seconds = time.perf_counter() - t0
    accuracy = float(np.mean(np.argmax(predict(x_train), axis=1) == y_train))
    test_predictions = np.argmax(predict(x_test), axis=1)

    out(f"influx demo: backend {chosen!r}, inversion method {method!r}")
    out(
        f"data: {num_train} training points ({num_flipped} with flipped labels), "
        f"{num_test} test points; model: MLP {'-'.join(map(str, sizes))} "
        f"({model.num_params} parameters)"
    )
    out(
        f"trained in {train_seconds:.2f} s; training accuracy {accuracy:.1%} "
        "(on the noisy labels)"
    )

    from influx.data import batches

    train = batches(x_train, y_train, batch_size=64)
    t0 = time.perf_counter()
    fitted = Influence(
        model, method, hessian_regularization=regularization, curvature=curvature
    ).fit(train)
    self_influence = np.asarray(
        chosen.to_numpy(fitted.self_influence(train)), dtype=np.float64
    )
    influences = np.asarray(
        chosen.to_numpy(fitted.influences(batches(x_test, y_test, batch_size=64))),
        dtype=np.float64,
    )
    seconds = time.perf_counter() - t0
    out(
        f"fitted {method} ({curvature} curvature, hessian_regularization "
        f"{regularization:g}); self-influence of {num_train} training points and "
        f"their influences on {num_test} test points in {seconds:.2f} s"
    )
    flipped_set = set(flipped.tolist())

    ranking = np.argsort(-self_influence, kind="stable")
    hits: dict[float, int] = {}
    out("")
    out("training points ranked by self-influence <H^-1 g_i, g_i>, highest first:")
    for share in TOP_SHARES:
        count = max(1, round(share * num_train))
        hits[share] = len(flipped_set.intersection(ranking[:count].tolist()))
        chance = num_flipped * count / num_train
        out(
            f"  {hits[share]} of the {num_flipped} flipped labels are in the top "
            f"{share:.0%} ({count} points); chance: {chance:.1f}"
        )

    def describe(index: int, value: float) -> str:
        mark = ", flipped" if index in flipped_set else ""
        return f"#{index} (label {y_train[index]}{mark}) {value:+.3e}"

    for test_index in range(min(show, num_test)):
        row = influences[test_index]
        order = np.argsort(row)
        out("")
        out(
            f"test point {test_index} (label {y_test[test_index]}, predicted "
            f"{test_predictions[test_index]}):"
        )
        helpful = ", ".join(describe(int(i), row[i]) for i in order[::-1][:3])
        harmful = ", ".join(describe(int(i), row[i]) for i in order[:3])
        out(f"  most helpful: {helpful}")
        out(f"  most harmful: {harmful}")

    mean_influence = influences.mean(axis=0)
    most_harmful = np.argsort(mean_influence)[:num_flipped]
    harmful_hits = len(flipped_set.intersection(most_harmful.tolist()))
    out("")
    out(
        f"for comparison, {harmful_hits} of the {num_flipped} flipped labels are "
        f"among the {num_flipped} training points with the most harmful mean "
        f"influence on the test points (chance: "
        f"{num_flipped * num_flipped / num_train:.1f})"
    )
    if plot is not None:
        _save_plot(plot, self_influence, flipped, f"{chosen.name}, {method}")
        out(f"detection curve written to {os.fspath(plot)}")
    out(f"total time {time.perf_counter() - start:.2f} s")
    return DemoResult(influences, flipped, harmful_hits, seconds, self_influence, hits)


def _require_matplotlib() -> None:
    """An ImportError naming the plot extra unless matplotlib imports."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'influx demo --plot needs matplotlib: pip install "influx[plot]"'
        ) from error


def _save_plot(
    path: str | os.PathLike[str],
    self_influence: np.ndarray,
    flipped: np.ndarray,
    title: str,
) -> None:
    """Save the detection curve of ``self_influence`` to ``path``.

    Draws on a bare :class:`matplotlib.figure.Figure` (no pyplot, no window).
    """
    from matplotlib.figure import Figure

    from influx.plot import detection_curve

    figure = Figure(figsize=(5, 4))
    ax = figure.add_subplot()
    detection_curve(self_influence, flipped, ax=ax, label="self-influence")
    ax.set_title(f"influx demo: flipped labels found ({title})")
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=110)
