"""Leave-one-out with warm-started retraining on the digits MLP (Koh and Liang).

The MLP of :mod:`_mlp` is trained to its optimum; a few test points are
chosen (the highest test losses and random ones); for each, the training
points with the largest ``|I_up|`` (``direct``, ``curvature="hessian"``, on the
first backend) plus random others are removed one at a time and the model is
retrained from the full-data optimum to a gradient norm below ``_mlp.GTOL``.
The actual change of each chosen test loss is compared with the prediction
``I_up / N`` of every method and curvature on every backend: Pearson and
Spearman per test point, then their mean over the test points. The
retraining is numpy (it does not depend on the backend), so one set of actual
changes serves every backend.

``run(backends, quick)`` returns JSON-able results; ``section(results,
figures)`` renders them as markdown and writes ``loo_mlp.png`` and
``accuracy_time.png`` into ``figures``.

Run alone: ``python benchmarks/validity/loo_mlp.py [--quick] [--backends torch]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from influx.metrics import loo_correlation

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _mlp

#: Full and quick settings of :func:`study`.
FULL = {
    "n_train": 400,
    "n_test": 200,
    "hidden": _mlp.HIDDEN,
    "n_high": 3,
    "n_random_test": 3,
    "top": 10,
    "n_random": 40,
    "repeats": 2,
}
QUICK = {
    "n_train": 100,
    "n_test": 50,
    "hidden": 8,
    "n_high": 1,
    "n_random_test": 1,
    "top": 5,
    "n_random": 10,
    "methods": tuple(m for m in _mlp.METHODS if (m[0], m[2]) in _mlp.QUICK_METHODS),
}


def run(backends: list[str], quick: bool) -> dict:
    """The study at the full (or quick) settings, every method in
    ``_mlp.METHODS`` on every backend."""
    return study(backends, **(QUICK if quick else FULL))


def study(
    backends: list[str],
    *,
    n_train: int,
    n_test: int,
    hidden: int,
    n_high: int,
    n_random_test: int,
    top: int,
    n_random: int,
    methods: tuple = _mlp.METHODS,
    seed: int = 0,
    repeats: int = 1,
) -> dict:
    """Leave-one-out study; see the module docstring.

    Parameters
    ----------
    backends
        ``"torch"`` and/or ``"jax"``; the first selects the retrained points.
    n_train, n_test, hidden
        Training points ``N``, test pool, hidden units.
    n_high, n_random_test
        Test points: the ``n_high`` highest test losses plus ``n_random_test``
        random others.
    top, n_random
        Retrained points: per test point the ``top`` largest ``|I_up|``
        (union), plus ``n_random`` random others.
    methods
        ``(label, method, curvature, options)`` tuples.
    seed
        Data split and random choices.
    repeats
        Runs of each method's fit and query on one wrapped model per
        backend; the last run's seconds are reported.
    """
    problem = _mlp.digits(n_train, n_test, seed=seed, hidden=hidden)
    sizes, n = problem.sizes, n_train
    full = _mlp.train(problem)
    theta = full.theta
    base = _mlp.losses(theta, sizes, problem.x_test, problem.y_test)
    rng = np.random.default_rng(seed)
    by_loss = np.argsort(-base)
    test = np.concatenate(
        [
            by_loss[:n_high],
            rng.choice(by_loss[n_high:], n_random_test, replace=False),
        ]
    )

    models = {backend: _mlp.wrap(backend, theta, sizes) for backend in backends}
    reference = _mlp.influences(
        backends[0],
        theta,
        problem,
        test,
        "direct",
        "hessian",
        model=models[backends[0]],
        repeats=repeats,
    )
    chosen: set[int] = set()
    for row in reference[0]:
        chosen |= {int(i) for i in np.argsort(-np.abs(row))[:top]}
    rest = np.setdiff1d(np.arange(n), sorted(chosen))
    randoms = rng.choice(rest, min(n_random, rest.size), replace=False)
    points = np.array(sorted(chosen) + sorted(int(i) for i in randoms))

    start = time.perf_counter()
    actual, grad_norms = [], []
    for i in points:
        weights = np.ones(n)
        weights[i] = 0.0
        retrained = _mlp.train(problem, theta, weights=weights)
        grad_norms.append(retrained.grad_norm)
        after = _mlp.losses(
            retrained.theta, sizes, problem.x_test[test], problem.y_test[test]
        )
        actual.append(after - base[test])
    retrain_seconds = time.perf_counter() - start
    actual_array = np.array(actual).T  # [T, M]

    rows = []
    for backend in backends:
        for label, method, curvature, options in methods:
            if (backend, method, curvature, options) == (
                backends[0],
                "direct",
                "hessian",
                {},
            ):
                scores, seconds, caught = reference
            else:
                scores, seconds, caught = _mlp.influences(
                    backend,
                    theta,
                    problem,
                    test,
                    method,
                    curvature,
                    options,
                    model=models[backend],
                    repeats=repeats,
                )
            predicted = scores[:, points] / n  # [T, M]
            correlation = loo_correlation(predicted, actual_array)
            pearson = correlation.pearson_per_test.tolist()
            spearman = correlation.spearman_per_test.tolist()
            rows.append(
                {
                    "backend": backend,
                    "label": label,
                    "method": method,
                    "curvature": curvature,
                    "options": dict(options),
                    "seconds": seconds,
                    "warnings": caught,
                    "pearson": float(np.mean(pearson)),
                    "spearman": float(np.mean(spearman)),
                    "pearson_per_test": pearson,
                    "spearman_per_test": spearman,
                    "predicted": predicted.tolist(),
                }
            )
    return {
        "settings": {
            "n_train": n,
            "n_test_pool": n_test,
            "hidden": hidden,
            "num_params": problem.num_params,
            "regularization": problem.regularization,
            "gtol": _mlp.GTOL,
            "n_high": n_high,
            "n_random_test": n_random_test,
            "top": top,
            "n_random": n_random,
            "seed": seed,
            "repeats": repeats,
        },
        "train": {
            "grad_norm": full.grad_norm,
            "seconds": full.seconds,
            "train_accuracy": _mlp.accuracy(
                theta, sizes, problem.x_train, problem.y_train
            ),
            "test_accuracy": _mlp.accuracy(
                theta, sizes, problem.x_test, problem.y_test
            ),
        },
        "test_points": test.tolist(),
        "test_losses": base[test].tolist(),
        "retrained_points": points.tolist(),
        "retrain": {
            "count": int(points.size),
            "seconds": retrain_seconds,
            "max_grad_norm": float(max(grad_norms)),
        },
        "actual": actual_array.tolist(),
        "methods": rows,
    }


def _name(row: dict) -> str:
    return f"{row['label']} ({row['curvature']})"


def section(results: dict, figures: Path) -> str:
    """Markdown of ``results`` (settings, table, figures); writes
    ``loo_mlp.png`` and ``accuracy_time.png`` into ``figures``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import influx.plot

    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    s, t, r = results["settings"], results["train"], results["retrain"]
    rows = results["methods"]
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    names = list(dict.fromkeys(_name(row) for row in rows))
    actual = np.asarray(results["actual"])

    first = [row for row in rows if row["backend"] == backends[0]]
    columns = 4
    lines = (len(first) + columns - 1) // columns
    fig, axes = plt.subplots(
        lines, columns, figsize=(3.2 * columns, 3.2 * lines), squeeze=False
    )
    for ax, row in zip(axes.ravel(), first, strict=False):
        influx.plot.loo_scatter(
            np.ravel(row["predicted"]), actual.ravel(), ax=ax, title=_name(row)
        )
    for ax in axes.ravel()[len(first) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(figures / "loo_mlp.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    influx.plot.accuracy_time(
        [
            {
                "method": _name(row),
                "seconds": row["seconds"],
                "accuracy": row["pearson"],
                "backend": row["backend"],
            }
            for row in rows
        ],
        ax=ax,
    )
    ax.set_ylabel("leave-one-out Pearson (MLP, mean over test points)")
    ax.set_title("Accuracy against time, digits MLP")
    fig.tight_layout()
    fig.savefig(figures / "accuracy_time.png", dpi=100)
    plt.close(fig)

    header = (
        "| method (curvature) | "
        + " | ".join(
            f"{b} Pearson | {b} Spearman | {b} pooled Pearson | {b} s" for b in backends
        )
        + " |"
    )
    table = [header, "|---" * (1 + 4 * len(backends)) + "|"]
    for name in names:
        cells = []
        for backend in backends:
            match = [r for r in rows if r["backend"] == backend and _name(r) == name]
            if match:
                m = match[0]
                pooled = loo_correlation(
                    np.ravel(m["predicted"]), np.ravel(actual)
                ).pearson
                cells.append(
                    f"{m['pearson']:.3f} | {m['spearman']:.3f} | {pooled:.3f} | "
                    f"{m['seconds']:.2f}"
                )
            else:
                cells.append("- | - | - | -")
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    options = "; ".join(
        f"{_name(row)}: {row['options']}" for row in first if row["options"]
    )
    notes = [
        f"- {row['backend']}, {_name(row)}: {text.split('. ')[0]}."
        for row in rows
        for text in row.get("warnings", [])
    ]
    if notes:
        notes = ["Warnings raised by influx:", "", *notes, ""]
    return "\n".join(
        [
            "## Leave-one-out on an MLP (warm-started retraining)",
            "",
            f"sklearn digits, {s['n_train']} training points, a tanh MLP "
            f"64-{s['hidden']}-10 ({s['num_params']} parameters), cross-entropy, "
            f"trained full batch in float64 (L-BFGS, then Newton steps) on "
            f"`mean loss + {s['regularization']:g}/2 ||theta||^2` to a gradient "
            f"norm of {t['grad_norm']:.1e}; `hessian_regularization="
            f"{s['regularization']:g}`, the same L2 weight, so influx's H is the "
            f"Hessian of the training objective. Train accuracy "
            f"{t['train_accuracy']:.3f}, test accuracy {t['test_accuracy']:.3f}.",
            "",
            f"Test points: the {s['n_high']} highest test losses and "
            f"{s['n_random_test']} random test points. Removed one at a time: per "
            f"test point the {s['top']} training points with the largest "
            f"|I_up| (direct, Hessian, {backends[0]}), plus {s['n_random']} random "
            f"others: {r['count']} points. Each is retrained from the full-data "
            f"optimum with the point's weight set to 0 (the 1/N kept) to a "
            f"gradient norm below {s['gtol']:g} (worst {r['max_grad_norm']:.1e}; "
            f"{r['seconds']:.0f} s in all, numpy, shared by both backends). "
            "Predicted change of a test loss: `I_up / N`. Pearson and Spearman "
            "are computed per test point over the removed points, then averaged "
            "over the test points; the pooled Pearson (and the figure) runs "
            "over all (test point, removed point) pairs at once. Seconds: fit "
            "plus one `influences` query, "
            f"wall clock, the last of {s.get('repeats', 1)} runs on one wrapped "
            "model per backend (the first run includes JAX's compilation)"
            + (f"; options: {options}." if options else "."),
            "",
            *table,
            "",
            *notes,
            f"![Predicted against actual leave-one-out change, {backends[0]}]"
            "(figures/loo_mlp.png)",
            "",
            "![LOO Pearson against seconds per method](figures/accuracy_time.png)",
            "",
        ]
    )


def main() -> None:
    """``python benchmarks/validity/loo_mlp.py [--quick] [--backends torch,jax]``:
    run the study and print each method's correlations."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", default="torch,jax")
    args = parser.parse_args()
    results = run(args.backends.split(","), args.quick)
    for row in results["methods"]:
        print(
            f"{row['backend']:5} {_name(row):18} pearson {row['pearson']:.3f} "
            f"spearman {row['spearman']:.3f} {row['seconds']:.2f} s"
        )


if __name__ == "__main__":
    main()
