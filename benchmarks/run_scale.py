"""Benchmark one influx method on an S workload (issue 9), on torch or JAX.

``python benchmarks/run_scale.py --backend torch --workload S1 --method kfac
--out DIR [--repeats 1] [--options JSON]`` builds ``influx.Influence(model,
method, hessian_regularization=lambda, **options)``, times ``fit(train)`` and
the query ``influences(test)`` (10 test points against every training point)
apart, single thread, and writes ``DIR/result.json`` and
``DIR/influences.npy`` (influx's sign, ``[10, N_train]``, float64).

Methods (:data:`METHODS`): ``kfac``, ``ekfac`` (``fisher="mc"``, seed 0),
``ekfac-empirical``, ``block``, ``cg`` and ``block-cg`` (``curvature="ggn"``),
``arnoldi`` (rank 100, GGN). A method that this influx does not have yet
(``TypeError``/``ValueError`` from ``Influence``) is recorded as an error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, write_result
from _scale import SCALE_SPECS, jax_apply, jax_cross_entropy, load_scale, torch_module

#: A fit or query whose first (cold: JAX compiles) call took less than this
#: is repeated warm, and the warm time is the one reported.
WARM_UP_TO_S = 300.0

#: Benchmark method -> (influx method, options).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("kfac", {"fisher": "mc", "seed": 0}),
    "ekfac": ("ekfac", {"fisher": "mc", "seed": 0}),
    "ekfac-empirical": ("ekfac", {"fisher": "empirical"}),
    "block": ("block", {"curvature": "ggn"}),
    "cg": ("cg", {"curvature": "ggn"}),
    "block-cg": ("cg", {"curvature": "ggn", "block": True}),
    "arnoldi": ("arnoldi", {"curvature": "ggn", "rank_estimate": 100}),
}


def build(backend: str, workload: Any, dtype: str) -> tuple[Any, Any]:
    """``(influx model, numpy -> native)`` on ``backend``, one thread."""
    import influx

    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        module = torch_module(workload, dtype)
        model = influx.twice_differentiable(module, torch.nn.functional.cross_entropy)

        def tensor(a: np.ndarray) -> Any:
            t = torch.from_numpy(a)
            return t.to(getattr(torch, dtype)) if t.is_floating_point() else t

        return model, tensor
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    params = {k: jnp.asarray(v, dtype=dtype) for k, v in workload.params.items()}
    model = influx.twice_differentiable(
        jax_apply(workload.spec.arch), jax_cross_entropy, params=params
    )

    def array(a: np.ndarray) -> Any:
        if np.issubdtype(a.dtype, np.floating):
            return jnp.asarray(a, dtype=dtype)
        return jnp.asarray(a.astype(np.int32))

    if hasattr(model, "find_layers"):
        # The JAX adapter finds the layers by tracing apply_fn on the first
        # batch it sees; tracing here keeps that out of the timed fit.
        model.find_layers(array(workload.x_train[:2]))
    return model, array


def _tree_commit() -> str | None:
    """``PATH@commit`` of the influx checkout imported (``INFLUX_BENCH_TREE``)."""
    tree = os.environ.get("INFLUX_BENCH_TREE")
    if not tree:
        return None
    try:
        head = subprocess.run(
            ["git", "-C", tree, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "?"
    return f"{tree}@{head}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import influx

    workload = load_scale(args.workload)
    spec = workload.spec
    model, native = build(args.backend, workload, args.dtype)
    method, options = METHODS[args.method]
    options = {**options, **json.loads(args.options)}
    train = influx.batches(
        native(workload.x_train), native(workload.y_train), batch_size=spec.batch_size
    )
    test = influx.batches(
        native(workload.x_test), native(workload.y_test), batch_size=spec.batch_size
    )
    meta: dict[str, Any] = {
        "tool": f"influx-{args.backend}",
        "version": influx.__version__,
        "workload": args.workload,
        "method": args.method,
        "influx_method": method,
        "options": options,
        "dtype": args.dtype,
        "regularization": spec.hessian_regularization,
        "num_params": workload.num_params,
        "n_train": len(workload.x_train),
        "loadavg_before": os.getloadavg()[0],
        "influx_tree": _tree_commit(),
    }
    state: dict[str, Any] = {}

    def fit() -> None:
        state["inf"] = influx.Influence(
            model, method, hessian_regularization=spec.hessian_regularization, **options
        ).fit(train)

    def query() -> Any:
        return state["inf"].influences(test)

    result = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit_m, _ = measure(fit, args.repeats, WARM_UP_TO_S)
            query_m, raw = measure(query, args.repeats, WARM_UP_TO_S)
            result = np.asarray(model.backend.to_numpy(raw), dtype=np.float64)
            peaks = [m["peak_mib"] for m in (fit_m, query_m) if m["peak_mib"]]
            info = state["inf"].info
            meta.update(
                fit=fit_m,
                query=query_m,
                fit_s=fit_m["median_s"],
                query_s=query_m["median_s"],
                fit_cpu_s=fit_m.get("median_cpu_s"),
                query_cpu_s=query_m.get("median_cpu_s"),
                peak_mib=max(peaks) if peaks else None,
                shape=list(result.shape),
                nan=bool(not np.all(np.isfinite(result))),
                info=None if info is None else str(info)[:500],
            )
        except Exception as error:  # recorded in the table, not fatal
            meta["error"] = repr(error)[:500]
    meta["warnings"] = sorted({str(w.message)[:300] for w in caught})[:5]
    write_result(args.out, meta, None, result)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax"], required=True)
    parser.add_argument("--workload", required=True, choices=sorted(SCALE_SPECS))
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--options", default="{}", help="extra options as JSON")
    meta = run(parser.parse_args(argv))
    status = meta.get("error") or (
        f"fit {meta['fit_s']:.3g} s, query {meta['query_s']:.3g} s, "
        f"peak {meta['peak_mib']:.0f} MiB"
    )
    print(f"{meta['tool']} {meta['workload']} {meta['method']}: {status}")


if __name__ == "__main__":
    main()
