"""Benchmark kronfluence's K-FAC and EK-FAC on an S workload (peer runner).

Runs in ``benchmarks/.envs/kronfluence-1.0.1`` (no influx there). Weights and
data come from :mod:`_scale`, timing from :mod:`_measure`, single thread.

Usage::

    python benchmarks/peer_kronfluence.py --workload S1 --method ekfac \
        --damping default|equal --out DIR [--repeats 1]

``--method``: ``ekfac`` or ``kfac`` (kronfluence's ``strategy``), true Fisher
with labels sampled from the model (kronfluence's default). ``--damping
default`` keeps ``ScoreArguments``' default damping (1e-8, absolute);
``equal`` sets ``damping_factor`` to the workload's ``hessian_regularization``
(kronfluence's factors are means over the training set, so its damping adds
``lambda I`` to the same mean-loss curvature as influx's). *fit* is
``fit_all_factors`` (covariances, eigendecompositions, and for EK-FAC the
eigenvalue corrections); *query* is ``compute_pairwise_scores`` of the 10 test
points against every training point. Both write kronfluence's files to a
scratch folder, as a user's run would. Scores are kronfluence's pairwise
scores, ``grad f(test)^T (F + damping I)^-1 grad l(train)``, influx's sign.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, write_result
from _scale import SCALE_SPECS, load_scale, torch_module

SEED = 0


def make_task() -> Any:
    """kronfluence's ``Task`` for classification with cross-entropy."""
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(
            self, batch: Any, model: torch.nn.Module, sample: bool = False
        ) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    y = torch.multinomial(probs, num_samples=1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    return Classification()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    workload = load_scale(args.workload)
    spec = workload.spec
    model = torch_module(workload, "float32")
    task = make_task()
    model = prepare_model(model, task)
    train = TensorDataset(
        torch.from_numpy(workload.x_train), torch.from_numpy(workload.y_train)
    )
    test = TensorDataset(
        torch.from_numpy(workload.x_test), torch.from_numpy(workload.y_test)
    )
    scratch = Path(tempfile.mkdtemp(prefix="kronfluence-"))
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(scratch),
    )
    factor_args = FactorArguments(strategy=args.method)
    score_args = ScoreArguments()
    if args.damping == "equal":
        score_args.damping_factor = spec.hessian_regularization

    def fit() -> None:
        torch.manual_seed(SEED)
        analyzer.fit_all_factors(
            factors_name="factors",
            dataset=train,
            per_device_batch_size=spec.batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )

    def query() -> Any:
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="factors",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=len(test),
            per_device_train_batch_size=spec.batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"]

    fit_m, _ = measure(fit, args.repeats)
    query_m, scores = measure(query, args.repeats)
    meta = _record(
        args, kronfluence, spec, workload, score_args, fit_m, query_m, scores
    )
    write_result(args.out, meta, None, scores.detach().double().numpy())
    if args.also_default:
        # The fit does not depend on the damping: query again with the default
        # damping_factor and record it beside, with the same fit.
        score_args.damping_factor = ScoreArguments().damping_factor
        query_d, scores_d = measure(query, args.repeats)
        args.damping = "default"
        meta_d = _record(
            args, kronfluence, spec, workload, score_args, fit_m, query_d, scores_d
        )
        meta_d["note"] = "fit shared with the equal-damping run"
        write_result(args.also_default, meta_d, None, scores_d.double().numpy())
    shutil.rmtree(scratch, ignore_errors=True)
    return meta


def _record(
    args: argparse.Namespace,
    kronfluence: Any,
    spec: Any,
    workload: Any,
    score_args: Any,
    fit_m: dict[str, Any],
    query_m: dict[str, Any],
    scores: Any,
) -> dict[str, Any]:
    result = scores.detach().double().numpy()
    peaks = [m["peak_mib"] for m in (fit_m, query_m) if m["peak_mib"] is not None]
    return {
        "tool": "kronfluence",
        "version": kronfluence.__version__,
        "workload": args.workload,
        "method": args.method,
        "damping": args.damping,
        "damping_factor": score_args.damping_factor,
        "regularization": spec.hessian_regularization,
        "fisher": "mc (sampled labels)",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": workload.num_params,
        "n_train": len(workload.x_train),
        "loadavg_before": os.getloadavg()[0],
        "fit": fit_m,
        "query": query_m,
        "fit_s": fit_m["median_s"],
        "query_s": query_m["median_s"],
        "fit_cpu_s": fit_m.get("median_cpu_s"),
        "query_cpu_s": query_m.get("median_cpu_s"),
        "peak_mib": max(peaks) if peaks else None,
        "shape": list(result.shape),
        "nan": bool(not np.all(np.isfinite(result))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=sorted(SCALE_SPECS))
    parser.add_argument("--method", required=True, choices=("ekfac", "kfac"))
    parser.add_argument("--damping", choices=("default", "equal"), default="equal")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--also-default",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the run, query again with kronfluence's default damping "
        "(same fit) and write that result to DIR",
    )
    meta = run(parser.parse_args(argv))
    print(
        f"kronfluence {meta['workload']} {meta['method']} ({meta['damping']}): "
        f"fit {meta['fit_s']:.3g} s, query {meta['query_s']:.3g} s, "
        f"peak {meta['peak_mib']:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
