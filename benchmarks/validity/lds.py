"""Linear datamodeling score (LDS) on the digits MLP.

The MLP of :mod:`_mlp` is retrained from scratch (the same initial weights,
``_mlp.INIT_SEED``, for every subset and for the full model, full batch to a
gradient norm below ``_mlp.GTOL``) on ``S`` random halves of the training set,
each with the mean loss over its half and the same L2 weight. The measured
output is each test point's cross-entropy under each retrained model. The
scores of every method, curvature and backend (``I_up`` of the full model on
all training points) predict it through the sum over the half, and the LDS is
the mean over test points of the Spearman correlation across subsets between
that prediction (negated: ``I_up > 0`` lowers the loss) and the measured
loss. The baseline is the gradient similarity ``<grad l(test), grad l(train)>``
of the full model (TracIn at its last checkpoint, identity curvature).

``run(backends, quick)`` returns JSON-able results; ``section(results,
figures)`` renders them as markdown and writes ``lds_mlp.png`` into
``figures``.

Run alone: ``python benchmarks/validity/lds.py [--quick] [--backends torch]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from influx.metrics import linear_datamodeling_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _mlp

#: Full and quick settings of :func:`study`.
FULL = {"n_train": 400, "n_test": 50, "hidden": _mlp.HIDDEN, "subsets": 50}
QUICK = {
    "n_train": 100,
    "n_test": 50,
    "hidden": 8,
    "subsets": 10,
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
    subsets: int,
    methods: tuple = _mlp.METHODS,
    seed: int = 0,
) -> dict:
    """LDS study; see the module docstring.

    Parameters
    ----------
    backends
        ``"torch"`` and/or ``"jax"``.
    n_train, n_test, hidden
        Training points ``N`` (even), test points, hidden units.
    subsets
        ``S``, the random halves retrained on.
    methods
        ``(label, method, curvature, options)`` tuples.
    seed
        Data split and subsets.
    """
    problem = _mlp.digits(n_train, n_test, seed=seed, hidden=hidden)
    sizes = problem.sizes
    full = _mlp.train(problem)
    theta = full.theta
    test = np.arange(n_test)

    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, n_train // 2, replace=False)] = True

    start = time.perf_counter()
    outputs, grad_norms, accuracies = [], [], []
    for mask in masks:
        trained = _mlp.train(
            problem, weights=mask.astype(np.float64), denominator=mask.sum()
        )
        grad_norms.append(trained.grad_norm)
        outputs.append(
            _mlp.losses(trained.theta, sizes, problem.x_test, problem.y_test)
        )
        accuracies.append(
            _mlp.accuracy(trained.theta, sizes, problem.x_test, problem.y_test)
        )
    retrain_seconds = time.perf_counter() - start
    outputs_array = np.array(outputs)  # [S, N_test]

    rows = []
    for backend in backends:
        _mlp.wrap(backend, theta, sizes)  # import the framework before timing
        for label, method, curvature, options in methods:
            scores, seconds, caught = _mlp.influences(
                backend, theta, problem, test, method, curvature, options
            )
            rows.append(
                {
                    "backend": backend,
                    "label": label,
                    "method": method,
                    "curvature": curvature,
                    "options": dict(options),
                    "seconds": seconds,
                    "warnings": caught,
                    "lds": linear_datamodeling_score(
                        scores, masks, outputs_array
                    ).score,
                }
            )
    similarity = _mlp.gradient_similarity(theta, problem, test)
    return {
        "settings": {
            "n_train": n_train,
            "n_test": n_test,
            "hidden": hidden,
            "num_params": problem.num_params,
            "regularization": problem.regularization,
            "gtol": _mlp.GTOL,
            "subsets": subsets,
            "subset_size": n_train // 2,
            "init_seed": _mlp.INIT_SEED,
            "seed": seed,
        },
        "train": {
            "grad_norm": full.grad_norm,
            "test_accuracy": _mlp.accuracy(
                theta, sizes, problem.x_test, problem.y_test
            ),
        },
        "retrain": {
            "count": subsets,
            "seconds": retrain_seconds,
            "max_grad_norm": float(max(grad_norms)),
            "mean_test_accuracy": float(np.mean(accuracies)),
        },
        "baseline": {
            "label": "gradient similarity",
            "lds": linear_datamodeling_score(similarity, masks, outputs_array).score,
        },
        "methods": rows,
    }


def _name(row: dict) -> str:
    return f"{row['label']} ({row['curvature']})"


def section(results: dict, figures: Path) -> str:
    """Markdown of ``results`` (settings, table, figure); writes
    ``lds_mlp.png`` into ``figures``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    s, t, r = results["settings"], results["train"], results["retrain"]
    rows, baseline = results["methods"], results["baseline"]
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    names = list(dict.fromkeys(_name(row) for row in rows))

    def value(name: str, backend: str) -> float | None:
        match = [x for x in rows if x["backend"] == backend and _name(x) == name]
        return match[0]["lds"] if match else None

    fig, ax = plt.subplots(figsize=(6, 0.3 * (len(names) + 1) * len(backends) + 1))
    labels = [*names, baseline["label"]]
    height = 0.8 / len(backends)
    for k, backend in enumerate(backends):
        values = [value(name, backend) for name in names] + [baseline["lds"]]
        positions = np.arange(len(labels)) + k * height
        ax.barh(
            positions,
            [np.nan if v is None else v for v in values],
            height=height,
            label=backend,
        )
    ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2, labels)
    ax.invert_yaxis()
    ax.set_xlabel("linear datamodeling score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "lds_mlp.png", dpi=100)
    plt.close(fig)

    header = "| method (curvature) | " + " | ".join(
        f"{b} LDS | {b} s" for b in backends
    )
    table = [header + " |", "|---" * (1 + 2 * len(backends)) + "|"]
    for name in names:
        cells = []
        for backend in backends:
            match = [x for x in rows if x["backend"] == backend and _name(x) == name]
            cells.append(
                f"{match[0]['lds']:.3f} | {match[0]['seconds']:.2f}"
                if match
                else "- | -"
            )
        table.append(f"| {name} | " + " | ".join(cells) + " |")
    table.append(
        f"| {baseline['label']} (identity) | "
        + " | ".join(f"{baseline['lds']:.3f} | -" for _ in backends)
        + " |"
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
            "## Linear datamodeling score on the MLP",
            "",
            f"The digits MLP of the leave-one-out study ({s['n_train']} training "
            f"points, 64-{s['hidden']}-10, {s['num_params']} parameters, L2 weight "
            f"= `hessian_regularization` = {s['regularization']:g}; test accuracy "
            f"{t['test_accuracy']:.3f}), retrained from scratch on {s['subsets']} "
            f"random halves ({s['subset_size']} points each, mean loss over the "
            f"half, the same L2 weight, the same initial weights (seed "
            f"{s['init_seed']}) as the full model, full batch to a gradient norm "
            f"below {s['gtol']:g}; worst {r['max_grad_norm']:.1e}; mean test "
            f"accuracy {r['mean_test_accuracy']:.3f}; {r['seconds']:.0f} s in "
            f"all). The output is the cross-entropy of each of {s['n_test']} test "
            "points. A method's prediction for a half is minus the sum of the "
            "full model's `I_up` over the half; the LDS is the Spearman "
            "correlation across halves of prediction and measured loss, averaged "
            "over the test points. The baseline is the gradient similarity "
            "`<grad l(test), grad l(train)>` of the full model (TracIn-style, "
            "identity curvature, backend-independent). Seconds: fit plus one "
            "`influences` query on all test points (first call).",
            "",
            *table,
            "",
            *notes,
            "![LDS per method](figures/lds_mlp.png)",
            "",
        ]
    )


def main() -> None:
    """``python benchmarks/validity/lds.py [--quick] [--backends torch,jax]``:
    run the study and print each method's LDS."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", default="torch,jax")
    args = parser.parse_args()
    results = run(args.backends.split(","), args.quick)
    for row in results["methods"]:
        print(f"{row['backend']:5} {_name(row):18} LDS {row['lds']:.3f}")
    print(f"gradient similarity      LDS {results['baseline']['lds']:.3f}")


if __name__ == "__main__":
    main()
