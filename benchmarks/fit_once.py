"""Fit once, query many: ``influx.Influence`` against the seed functions on W1.

``python benchmarks/fit_once.py [--backend torch|jax] [--methods direct,arnoldi,cg]``

Issue 8's targets, measured in float32 as the benchmark runs (W1: digits, MLP
64-32-10, P = 2,410, 1,000 training points, lambda = 0.01, batches of 100):

(a) one ``fit`` plus 10 ``influences`` queries of 10 test points against 10
    ``compute_influences`` calls of 10 test points each (target: >= 5x for
    direct and arnoldi, >= 2x for cg);
(b) ``self_influence`` of the 1,000 training points (direct) against one
    ``influences`` call of one test point on them (target: <= 2x);
(c) equality, in float64: every object result equals the functional API's to
    1e-10, self-influence equals the diagonal of the full matrix, ``top_k``
    equals sorting the full scores.

Each timing is one run (the slow side takes tens of seconds); the load average
is printed, as the machine may be shared. The W1 file is written by
``make_workloads.py`` (needs scikit-learn); only W1 is made here if missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import cache_dir, load
from run_influx import METHODS, jax_model, torch_model

import influx

QUERIES, PER_QUERY = 10, 10
#: Targets of issue 8: minimum speed-up of (a) per method, maximum ratio of (b).
SPEEDUP_TARGETS = {"direct": 5.0, "arnoldi": 5.0, "cg": 2.0}
SELF_INFLUENCE_TARGET = 2.0
TOLERANCE = 1e-10


def ensure_w1() -> None:
    path = cache_dir() / "W1.npz"
    if not path.exists():
        import make_workloads

        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **make_workloads.make_w1())


def setup(backend: str, dtype: str) -> tuple[Any, Any, list[Any], Any, Any]:
    """``(model, train, queries, one_test_point, all_test)`` of W1 in ``dtype``."""
    workload = load("W1")
    build = torch_model if backend == "torch" else jax_model
    model, native = build(workload.weights, dtype)
    size = workload.spec.batch_size

    def data(x: np.ndarray, y: np.ndarray) -> Any:
        return influx.batches(native(x), native(y), batch_size=size)

    x, y = workload.x_test, workload.y_test
    queries = [
        data(x[i : i + PER_QUERY], y[i : i + PER_QUERY])
        for i in range(0, QUERIES * PER_QUERY, PER_QUERY)
    ]
    train = data(workload.x_train, workload.y_train)
    return model, train, queries, data(x[:1], y[:1]), data(x, y)


def options(method: str) -> dict[str, Any]:
    return METHODS[method][2]


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def functional(model: Any, train: Any, test: Any, method: str, **kwargs: Any) -> Any:
    return influx.compute_influences(
        model,
        train,
        test_data=test,
        inversion_method=method,
        hessian_regularization=load("W1").spec.hessian_regularization,
        **options(method),
        **kwargs,
    )


def fitted(model: Any, train: Any, method: str) -> influx.Influence:
    lam = load("W1").spec.hessian_regularization
    return influx.Influence(model, method, lam, **options(method)).fit(train)


def speedups(backend: str, methods: list[str]) -> list[tuple[str, float, float]]:
    """(a): ``(method, seconds of 10 calls, seconds of fit + 10 queries)``."""
    model, train, queries, _, _ = setup(backend, "float32")
    # Warm up (JAX compiles each batch shape once; torch's first call allocates).
    fitted(model, train, "direct").influences(queries[0])
    rows = []
    for method in methods:
        calls, _ = timed(
            lambda m=method: [functional(model, train, q, m) for q in queries]
        )

        def fit_and_query(m: str = method) -> list[Any]:
            inf = fitted(model, train, m)
            return [inf.influences(q) for q in queries]

        once, _ = timed(fit_and_query)
        rows.append((method, calls, once))
        print(f"  (a) {method}: 10 calls {calls:.2f} s, fit + 10 queries {once:.2f} s")
    return rows


def self_influence_cost(backend: str) -> tuple[float, float]:
    """(b): seconds of self_influence(train) and of influences(one point)."""
    model, train, _, one, _ = setup(backend, "float32")
    inf = fitted(model, train, "direct")
    inf.influences(one)  # warm
    inf.self_influence(train)
    # Best of three: both sides take about a second, and the load varies.
    one_call = min(timed(lambda: inf.influences(one))[0] for _ in range(3))
    self_call = min(timed(lambda: inf.self_influence(train))[0] for _ in range(3))
    return self_call, one_call


def relative(actual: Any, expected: Any) -> float:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))


def equality(backend: str, methods: list[str]) -> list[tuple[str, float]]:
    """(c) in float64: ``(check, relative error or mismatches)`` rows."""
    model, train, queries, _, all_test = setup(backend, "float64")
    host = model.backend.to_numpy
    rows = []
    lam = load("W1").spec.hessian_regularization
    test = queries[0]
    objects = {}
    for method in methods:
        inf = objects[method] = fitted(model, train, method)
        factors = influx.compute_influence_factors(
            model, train, test, method, hessian_regularization=lam, **options(method)
        )
        error = relative(host(inf.factors(test)), host(factors))
        rows.append((f"factors == compute_influence_factors ({method})", error))
        scores = influx.compute_influences_up(model, train, factors)
        error = relative(host(inf.influences(test)), host(scores))
        rows.append((f"influences == compute_influences_up ({method})", error))
    inf = objects["direct"] if "direct" in objects else fitted(model, train, "direct")
    full = host(inf.influences(train, train))
    rows.append(
        (
            "self_influence == diag (direct)",
            relative(host(inf.self_influence(train)), np.diag(full)),
        )
    )
    scores = host(inf.influences(all_test))
    values, indices = inf.top_k(all_test, train, 10)
    columns = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((columns, -row)) for row in scores])[:, :10]
    mismatched = int(np.sum(host(indices) != order))
    rows.append(("top_k == sorting (indices differing)", float(mismatched)))
    expected = np.take_along_axis(scores, order, axis=1)
    rows.append(("top_k values == sorted scores", relative(host(values), expected)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax"], default="torch")
    parser.add_argument("--methods", default="direct,arnoldi,cg")
    parser.add_argument("--threads", type=int, default=0, help="torch threads")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if args.backend == "torch" and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ensure_w1()
    print(f"W1 on {args.backend}; load average before: {os.getloadavg()}")
    ok = True
    print("(a) fit once + 10 queries of 10 test points vs 10 compute_influences calls")
    rows = speedups(args.backend, methods)
    print(
        f"{'method':<9}{'10 calls s':>12}{'fit+10 s':>10}{'speed-up':>10}{'target':>8}"
    )
    for method, calls, once in rows:
        target = SPEEDUP_TARGETS.get(method, 1.0)
        ok &= calls / once >= target
        print(
            f"{method:<9}{calls:>12.2f}{once:>10.2f}{calls / once:>9.1f}x"
            f"{'>=':>4}{target:g}x"
        )
    self_call, one_call = self_influence_cost(args.backend)
    ratio = self_call / one_call
    ok &= ratio <= SELF_INFLUENCE_TARGET
    print(
        f"(b) self_influence of 1,000 points {self_call:.3f} s, influences of one "
        f"test point {one_call:.3f} s: ratio {ratio:.2f} (target <= "
        f"{SELF_INFLUENCE_TARGET:g})"
    )
    print("(c) float64 equality")
    for check, value in equality(args.backend, methods):
        passed = value == 0 if "differing" in check else value <= TOLERANCE
        ok &= passed
        print(f"  {check:<52}{value:>10.2e}  {'ok' if passed else 'FAILED'}")
    print(f"load average after: {os.getloadavg()}")
    print("all targets met" if ok else "some target missed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
