"""Leave-one-out retraining of an L2 logistic regression on sklearn's digits.

The model (10 classes, 64 pixels + bias: P = 650 parameters) is trained in
float64 with Newton's method to a gradient norm near machine precision
(``_common.train_logistic``); every training point is then left out in turn
and the model retrained from the optimum (warm start; Newton steps with the
full-data Hessian, ``_common.leave_out``) to the same precision.
The measured change of each test point's loss is compared with influx's
prediction ``+I_up / N`` (``influx.metrics``): Pearson and Spearman per test
point (the mean over test points) and over all (test point, left-out point)
pairs at once, per method and backend. ``hessian_regularization`` equals the
L2 weight, so ``H`` is the training objective's Hessian.

Run alone: ``python benchmarks/validity/loo_logistic.py [--quick]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    LOGISTIC_METHODS,
    digits,
    hessian_factor,
    leave_out,
    save_figure,
    single_threaded_blas,
    table,
    timer,
    to_numpy,
    train_logistic,
    wrap_linear,
)

NAME = "loo_logistic"
FULL = {
    "num_train": 500,
    "num_test": 50,
    "l2": 1e-2,
    "batch_size": 100,
    "seed": 0,
    "repeats": 2,
    "sweep": [1e-3, 1e-2, 1e-1],
}
QUICK = {
    "num_train": 100,
    "num_test": 10,
    "l2": 1e-2,
    "batch_size": 50,
    "seed": 0,
    "repeats": 1,
    "sweep": [],
}


def loo_changes(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    l2: float,
    fitted: Any,
) -> tuple[np.ndarray, float]:
    """Retrain without each point; ``[N_test, N]`` test-loss changes.

    Returns the changes and the largest final gradient norm of a retraining.
    """
    base = fitted.losses(x_test, y_test)
    changes = np.empty((len(y_test), len(y)))
    worst = 0.0
    with single_threaded_blas():
        factor = hessian_factor(x, y, l2, fitted)
        for i in range(len(y)):
            retrained = leave_out(x, y, l2, fitted, i, factor)
            worst = max(worst, retrained.grad_norm)
            changes[:, i] = retrained.losses(x_test, y_test) - base
    return changes, worst


def predict(
    model: Any,
    data: tuple[np.ndarray, ...],
    method: str,
    l2: float,
    batch_size: int,
    repeats: int = 2,
) -> tuple[np.ndarray, float]:
    """influx's ``I_up [N_test, N]`` and the seconds of fit plus scoring.

    Runs ``repeats`` times on the same wrapped ``model`` and reports the last
    run's seconds: the first includes one-off costs (JAX compilation, torch's
    first calls), which dwarf the work at this size.
    """
    import influx

    x, y, x_test, y_test = data
    options = dict(LOGISTIC_METHODS[method])
    if method == "arnoldi":
        options["rank_estimate"] = model.num_params
    train = influx.batches(x, y, batch_size=batch_size)
    test = influx.batches(x_test, y_test, batch_size=batch_size)
    for _ in range(repeats):
        with timer() as elapsed:
            scores = influx.Influence(model, method, l2, **options).fit(train)
            scores = to_numpy(scores.influences(test))
    return scores, elapsed["seconds"]


def run(
    backends: list[str],
    quick: bool,
    *,
    methods: list[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The study; JSON-able results. ``overrides`` replace the settings."""
    from influx.metrics import loo_correlation

    settings = {**(QUICK if quick else FULL), **overrides}
    methods = list(LOGISTIC_METHODS) if methods is None else list(methods)
    x, y, x_test, y_test = digits(
        settings["num_train"], settings["num_test"], settings["seed"]
    )
    l2 = settings["l2"]
    with timer() as t_train, single_threaded_blas():
        fitted = train_logistic(x, y, l2)
    with timer() as t_loo:
        actual, worst = loo_changes(x, y, x_test, y_test, l2, fitted)
    n = len(y)
    results: dict[str, Any] = {
        "settings": settings,
        "num_params": int(fitted.weight.size + fitted.bias.size),
        "grad_norm": fitted.grad_norm,
        "loo_grad_norm_max": worst,
        "test_accuracy": float(
            np.mean(np.argmax(x_test @ fitted.weight.T + fitted.bias, 1) == y_test)
        ),
        "train_seconds": t_train["seconds"],
        "loo_seconds": t_loo["seconds"],
        "actual": actual,
        "rows": [],
        "predicted": {},
    }
    for backend in backends:
        model = wrap_linear(backend, fitted.weight, fitted.bias)
        for method in methods:
            scores, seconds = predict(
                model,
                (x, y, x_test, y_test),
                method,
                l2,
                settings["batch_size"],
                settings["repeats"],
            )
            predicted = scores / n  # removing z_i changes the loss by +I_up / N
            rows = loo_correlation(predicted, actual)
            pooled = loo_correlation(predicted.ravel(), actual.ravel())
            results["rows"].append(
                {
                    "backend": backend,
                    "method": method,
                    "pearson": rows.pearson,
                    "spearman": rows.spearman,
                    "pearson_min": float(np.nanmin(rows.pearson_per_test)),
                    "pooled_pearson": pooled.pearson,
                    "pooled_spearman": pooled.spearman,
                    "seconds": seconds,
                }
            )
            if backend == backends[0]:
                results["predicted"][method] = predicted
            print(
                f"{NAME}: {backend:5s} {method:8s} pearson {rows.pearson:.4f} "
                f"spearman {rows.spearman:.4f} pooled {pooled.pearson:.4f} "
                f"({seconds:.2f} s)",
                flush=True,
            )
    results["sweep"] = []
    for swept_l2 in settings["sweep"]:
        # The L2 weight sets how nonlinear one removal is: direct, first backend.
        with single_threaded_blas():
            swept = train_logistic(x, y, swept_l2)
        swept_actual, _ = loo_changes(x, y, x_test, y_test, swept_l2, swept)
        model = wrap_linear(backends[0], swept.weight, swept.bias)
        scores, _ = predict(
            model,
            (x, y, x_test, y_test),
            "direct",
            swept_l2,
            settings["batch_size"],
            repeats=1,
        )
        found = loo_correlation(scores / n, swept_actual)
        results["sweep"].append(
            {
                "l2": swept_l2,
                "test_accuracy": float(
                    np.mean(
                        np.argmax(x_test @ swept.weight.T + swept.bias, 1) == y_test
                    )
                ),
                "pearson": found.pearson,
                "spearman": found.spearman,
            }
        )
    return results


def section(results: dict[str, Any], figures: Path) -> str:
    """Markdown for ``docs/validity.md``; writes the figures into ``figures``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from influx.plot import accuracy_time, loo_scatter

    s = results["settings"]
    actual = np.asarray(results["actual"])
    predicted = {k: np.asarray(v) for k, v in results["predicted"].items()}
    first = results["rows"][0]["backend"] if results["rows"] else "?"
    methods = list(predicted)
    columns = min(4, len(methods)) or 1
    lines = (len(methods) + columns - 1) // columns or 1
    _, axes = plt.subplots(
        lines, columns, figsize=(3.6 * columns, 3.4 * lines), squeeze=False
    )
    for ax, method in zip(axes.ravel(), methods, strict=False):
        loo_scatter(predicted[method].ravel(), actual.ravel(), ax=ax, title=method)
        ax.set_xlabel("predicted (+I_up / N)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    for ax in axes.ravel()[len(methods) :]:
        ax.set_visible(False)
    scatter = figures / "loo_logistic_scatter.png"
    save_figure(axes.ravel()[0], scatter)
    records = [
        {
            "method": r["method"],
            "backend": r["backend"],
            "seconds": r["seconds"],
            "accuracy": r["pearson"],
        }
        for r in results["rows"]
    ]
    ax = accuracy_time(records)
    ax.set_ylabel("LOO Pearson (mean over test points)")
    ax.set_xlabel("seconds (fit + influences)")
    timing = figures / "loo_logistic_time.png"
    save_figure(ax, timing)
    rows = [
        [
            r["backend"],
            r["method"],
            f"{r['pearson']:.4f}",
            f"{r['pearson_min']:.4f}",
            f"{r['spearman']:.4f}",
            f"{r['pooled_pearson']:.4f}",
            f"{r['pooled_spearman']:.4f}",
            f"{r['seconds']:.2f}",
        ]
        for r in results["rows"]
    ]
    header = [
        "backend",
        "method",
        "Pearson (mean)",
        "Pearson (worst test point)",
        "Spearman (mean)",
        "Pearson (all pairs)",
        "Spearman (all pairs)",
        "seconds",
    ]
    return "\n".join(
        [
            "## Leave-one-out retraining: logistic regression",
            "",
            f"Multinomial logistic regression on sklearn's digits (pixels scaled to "
            f"[0, 1]): {s['num_train']} training points, {s['num_test']} test points "
            f"(seed {s['seed']}), P = {results['num_params']} parameters (weights and "
            f"biases), L2 weight λ = {s['l2']:g} on every parameter, float64. The "
            "objective `(1/N) Σ l(z_i) + (λ/2) ||θ||²` is minimised with Newton's "
            f"method to a gradient norm of {results['grad_norm']:.1e} "
            f"({results['train_seconds']:.1f} s; test accuracy "
            f"{results['test_accuracy']:.1%}). Each training point is left out in "
            "turn (its term removed, the `1/N` kept, which is exactly up-weighting "
            "by `-1/N`) and the model retrained from the optimum (warm start; Newton "
            "steps with the full-data Hessian, then full Newton if needed) to a "
            f"gradient norm of at most {results['loo_grad_norm_max']:.1e} "
            f"({results['loo_seconds']:.0f} s for all). influx's prediction of the "
            "change of a test loss is `+I_up / N` "
            "(see `influx.metrics.loo_correlation`), with "
            "`hessian_regularization = λ`, so that `H` is the objective's Hessian. "
            f"Batch size {s['batch_size']}.",
            "",
            "Method options: cg `rtol=1e-10, maxiter=2000`; lissa `maxiter=3000, "
            "rtol=1e-8` (its default Nyström preconditioner); arnoldi "
            "`rank_estimate = P` (full rank); block: the default parameter blocks; "
            'kfac and ekfac `fisher="ggn"` (exact Gauss-Newton probes; for a '
            "linear model the Gauss-Newton matrix is the Hessian, so they differ "
            "from the others only by the Kronecker factorisation). Seconds: fit "
            "plus influences of all training points on all test points, the second "
            "of two runs on the same wrapped model (the first pays JAX's "
            "compilation and torch's first calls).",
            "",
            table(header, rows),
            "",
            f"![predicted against actual leave-one-out change ({first})]"
            f"(figures/{scatter.name})",
            "",
            f"Predicted against actual change over all (test point, left-out point) "
            f"pairs, {first} backend, one panel per method.",
            "",
            f"![LOO Pearson against time per method](figures/{timing.name})",
            "",
            *_sweep_lines(results, first),
        ]
    )


def _sweep_lines(results: dict[str, Any], backend: str) -> list[str]:
    """The L2-weight sweep's paragraph and table (none if not run)."""
    sweep = results.get("sweep") or []
    if not sweep:
        return []
    rows = [
        [
            f"{r['l2']:g}",
            f"{r['test_accuracy']:.1%}",
            f"{r['pearson']:.4f}",
            f"{r['spearman']:.4f}",
        ]
        for r in sweep
    ]
    return [
        "The correlation depends on the L2 weight: a removal is a first-order "
        "effect only as far as the objective is close to quadratic over the "
        f"step it causes. The same study with direct on {backend}, per λ (mean "
        "over test points):",
        "",
        table(["λ", "test accuracy", "Pearson", "Spearman"], rows),
        "",
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", default="torch,jax")
    args = parser.parse_args()
    out = run(args.backends.split(","), args.quick)
    print(section(out, Path("/tmp/validity_figures")))
