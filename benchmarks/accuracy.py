"""Print the accuracy each inversion method reaches, per backend, as a table.

Two problems, in float64 unless stated, with a short last training batch:

- the closed form of multi-output linear regression under MSE
  (``tests/test_closed_form.py``): up-weighting and perturbation influences
  of 47 training points on 5 test points, ``hessian_regularization=0.3``;
- a small tanh MLP (``tests/models.py``), each method against Direct.

Errors are ``max |result - reference| / max |reference|``. Run with
``python benchmarks/accuracy.py`` from the repository root (needs
``influx[all]``, or one framework: the other is skipped).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import mlp_weights, rel_err, to_numpy, wrap_mlp

import influx

OPTIONS = {
    "direct": {},
    "cg": {"rtol": 1e-12, "atol": 0.0},
    "arnoldi (full rank)": {"rank_estimate": None},
    "lissa (1000 steps)": {"maxiter": 1000, "seed": 0},
}
LAMBDA = 0.3


def _method(label: str) -> str:
    return label.split()[0]


def _options(label: str, num_params: int) -> dict:
    options = dict(OPTIONS[label])
    if "rank_estimate" in options:
        options["rank_estimate"] = num_params
    return options


def closed_form_rows(
    backend: str, dtype: str = "float64"
) -> list[tuple[str, str, float, float]]:
    from test_closed_form import (
        PROBLEM,
        held_out_data,
        model_for,
        reference,
        train_data,
    )

    ref = reference(PROBLEM, LAMBDA)
    model = model_for(backend, dtype)
    rows = []
    for label in OPTIONS:
        factors = influx.compute_influence_factors(
            model,
            train_data(),
            held_out_data(),
            _method(label),
            hessian_perturbation=LAMBDA,
            **_options(label, model.num_params),
        )
        up = influx.compute_influences_up(model, train_data(), factors)
        pert = influx.compute_influences_pert(model, train_data(), factors)
        rows.append((backend, label, rel_err(up, ref.up), rel_err(pert, ref.pert)))
    return rows


def mlp_rows(backend: str) -> list[tuple[str, str, float, float]]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((41, 3)), rng.integers(0, 3, 41)
    data = influx.batches(x, y, batch_size=9)
    test = influx.batches(x[:6], y[:6], batch_size=4)
    model = wrap_mlp(backend, mlp_weights((3, 4, 3)), loss="cross_entropy")
    lam = 1.0  # makes the untrained MLP's regularised Hessian positive definite
    results = {}
    for label in OPTIONS:
        factors = influx.compute_influence_factors(
            model,
            data,
            test,
            _method(label),
            hessian_perturbation=lam,
            **_options(label, model.num_params),
        )
        results[label] = (
            influx.compute_influences_up(model, data, factors),
            influx.compute_influences_pert(model, data, factors),
        )
    up_ref, pert_ref = (to_numpy(a) for a in results["direct"])
    return [
        (backend, label, rel_err(up, up_ref), rel_err(pert, pert_ref))
        for label, (up, pert) in results.items()
        if label != "direct"
    ]


def main() -> None:
    backends = [b for b in ("torch", "jax") if importlib.util.find_spec(b)]
    if "jax" in backends:
        import jax

        jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore", influx.NotConvergedWarning)
    for title, rows_of in (
        (f"Linear regression vs closed form (lambda {LAMBDA})", closed_form_rows),
        (
            f"Linear regression vs closed form (lambda {LAMBDA}), float32 model",
            lambda backend: closed_form_rows(backend, "float32"),
        ),
        ("Tanh MLP 3-4-3 vs Direct (lambda 1.0)", mlp_rows),
    ):
        print(f"\n{title}; max error relative to max |reference|")
        print("| backend | method | up | perturbation |")
        print("|---|---|---|---|")
        for backend in backends:
            for row in rows_of(backend):
                print(f"| {row[0]} | {row[1]} | {row[2]:.1e} | {row[3]:.1e} |")


if __name__ == "__main__":
    main()
