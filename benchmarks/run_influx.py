"""Benchmark one influx method on one workload, on torch or JAX.

``python benchmarks/run_influx.py --backend torch --workload W1 --method cg
--out DIR`` times the whole user call (wrapping excluded, factors and
influences included), once cold and ``--repeats`` times warm, and writes
``DIR/result.json`` and ``DIR/influences.npy`` (see ``_measure.py``).

Methods: ``direct``, ``cg``, ``lissa``, ``arnoldi`` (up-weighting influences
of all test points on all training points) and ``direct-pert``
(perturbation influences). ``--options`` passes solver options as JSON;
``--dtype float64`` runs the model in double precision (the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, write_result
from _models import influx_model, jax_model, torch_model  # noqa: F401 (re-exported)
from _workloads import load

import influx

#: influx's options per benchmark method: what a user would pass.
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "direct": ("direct", "up", {}),
    "cg": ("cg", "up", {}),
    "lissa": ("lissa", "up", {}),
    "arnoldi": ("arnoldi", "up", {"rank_estimate": 30}),
    "direct-pert": ("direct", "perturbation", {}),
}


def run(args: argparse.Namespace) -> None:
    workload = load(args.workload)
    spec = workload.spec
    if args.backend == "torch" and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, to_native = influx_model(args.backend, workload.weights, args.dtype)
    method, kind, options = METHODS[args.method]
    options = {**options, **json.loads(args.options)}
    train = influx.batches(
        to_native(workload.x_train),
        to_native(workload.y_train),
        batch_size=spec.batch_size,
    )
    test = influx.batches(
        to_native(workload.x_test),
        to_native(workload.y_test),
        batch_size=spec.batch_size,
    )

    def call() -> Any:
        return influx.compute_influences(
            model,
            train,
            test_data=test,
            inversion_method=method,
            influence_type=kind,
            hessian_regularization=spec.hessian_regularization,
            **options,
        )

    meta: dict[str, Any] = {
        "tool": f"influx-{args.backend}",
        "version": influx.__version__,
        "workload": args.workload,
        "method": args.method,
        "dtype": args.dtype,
        "options": options,
        "num_params": workload.num_params,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            measurement, result = measure(call, args.repeats)
        except Exception as error:  # reported in the table, not fatal
            write_result(args.out, {**meta, "error": repr(error)}, None, None)
            return
    meta["warnings"] = sorted({str(w.message) for w in caught})
    values = np.asarray(model.backend.to_numpy(result))
    meta["nan"] = bool(not np.all(np.isfinite(values)))
    write_result(args.out, meta, measurement, values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax"], required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--options", default="{}", help="solver options as JSON")
    parser.add_argument("--threads", type=int, default=0)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
