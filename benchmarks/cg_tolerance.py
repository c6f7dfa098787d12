"""How tight must CG solve for the influences to be right? (issue 9, item 7)

``python benchmarks/cg_tolerance.py --workload W1``
``python benchmarks/cg_tolerance.py --workload mlp --n-train 1000``

For each ``rtol`` (``atol=0``) and for plain and block CG (both with the
default rank-100 Nystrom preconditioner, fitted once and shared), the
influences of every training point on 10 test points are compared with a
reference: the direct solve on W1 (P = 2,410), block CG to ``rtol=1e-10`` on
the ~1.1M-parameter tanh MLP ``64-1024-1024-10`` (random torch init, Gaussian
inputs, random labels; untrained, so the Hessian is indefinite and
``hessian_regularization`` is set from a Lanczos estimate of its smallest
eigenvalue, minus the Ritz residual, plus 0.05). Reported per row: the solve's
CPU time (one torch thread, so it is the work even on a shared machine), the
largest iteration count, the Pearson correlation of the influences with the
reference (the smallest over the test points) and the overlap of the top 10%
training points by ``|influence|`` (the mean over the test points).

The influences are ``g_test^T (H + lambda I)^{-1} g_train``; the training
gradients are computed once, in batches, for all rows at once. Torch, float64
by default (``--dtype float32`` measures what users run; the reference is then
limited by float32 products). The machine may be shared: the load average is
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import influx
from influx.solvers import CgSolver, DirectSolver

RTOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
TEST_POINTS = 10


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, float]:
    """``(model, to_tensor, train batches, (x_test, y_test), lambda)``, torch."""
    import torch
    from _models import torch_mlp, torch_model

    if args.workload == "W1":
        from _workloads import load

        workload = load("W1")
        model, tensor = torch_model(workload.weights, args.dtype)
        x, y = workload.x_train, workload.y_train
        x_test, y_test = workload.x_test[:TEST_POINTS], workload.y_test[:TEST_POINTS]
        lam, batch = workload.spec.hessian_regularization, workload.spec.batch_size
    else:
        torch.manual_seed(0)
        sizes = [64, args.hidden, args.hidden, 10]
        module = torch_mlp(sizes, args.dtype).eval()
        model = influx.twice_differentiable(module, torch.nn.functional.cross_entropy)
        dtype = getattr(torch, args.dtype)

        def tensor(array: np.ndarray) -> Any:
            out = torch.from_numpy(array)
            return out.to(dtype) if out.is_floating_point() else out

        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.n_train, 64))
        y = rng.integers(0, 10, args.n_train)
        x_test = rng.standard_normal((TEST_POINTS, 64))
        y_test = rng.integers(0, 10, TEST_POINTS)
        batch = args.batch_size
        lam = None if args.lam == "auto" else float(args.lam)
    train = influx.batches(tensor(x), tensor(y), batch_size=batch)
    if lam is None:
        lam = MARGIN + max(0.0, -smallest_eigenvalue(model, train))
    return model, tensor, train, (tensor(x_test), tensor(y_test)), lam


#: ``hessian_regularization`` above the negative of the smallest eigenvalue.
MARGIN = 0.05


def smallest_eigenvalue(model: Any, train: Any) -> float:
    """Lanczos estimate (30 steps) of the Hessian's smallest eigenvalue.

    Ritz values lie inside the spectrum, so the true one can be a little
    lower; CG reports a breakdown if the margin does not cover it.
    """
    import torch

    from influx.solvers.spectrum import extreme_eigenvalues

    operator = influx.HessianOperator(model, train)
    start = torch.from_numpy(
        np.random.default_rng(1).standard_normal((1, model.num_params))
    )
    extremes = extreme_eigenvalues(operator.mv, start, operator, maxiter=30)
    smallest = float(extremes.smallest[0] - extremes.smallest_error[0])
    print(
        f"# Lanczos: eigenvalues from {smallest:.4g} (Ritz "
        f"{float(extremes.smallest[0]):.4g}) to {float(extremes.largest[0]):.4g}",
        flush=True,
    )
    return smallest


def influences(model: Any, train: Any, factors: Any) -> np.ndarray:
    """``factors [R, P] @ grads^T`` over all training points, ``[R, N]``."""
    import torch

    parts = []
    for x, y in train:
        grads, _ = model.per_sample_grads(x, y)
        parts.append((factors.to(grads.dtype) @ grads.T).double().numpy())
    del torch
    return np.concatenate(parts, axis=1)


def pearson_min(scores: np.ndarray, reference: np.ndarray) -> float:
    values = [np.corrcoef(a, b)[0, 1] for a, b in zip(scores, reference, strict=True)]
    return float(np.min(values))


def top_overlap(scores: np.ndarray, reference: np.ndarray, share: float = 0.1) -> float:
    k = max(1, round(share * scores.shape[1]))
    overlaps = []
    for a, b in zip(scores, reference, strict=True):
        top_a = set(np.argsort(-np.abs(a))[:k].tolist())
        top_b = set(np.argsort(-np.abs(b))[:k].tolist())
        overlaps.append(len(top_a & top_b) / k)
    return float(np.mean(overlaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["W1", "mlp"], default="W1")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument(
        "--lam",
        default="auto",
        help="hessian_regularization of the MLP; 'auto': 0.05 above the negative "
        "of the smallest Hessian eigenvalue (Lanczos estimate, 30 steps)",
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--rtols", default=",".join(f"{r:g}" for r in RTOLS))
    parser.add_argument("--preconditioner", default="nystrom")
    parser.add_argument("--solvers", default="plain,block")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("INFLUX_THREADS", "1")))
    preconditioner = None if args.preconditioner == "none" else args.preconditioner
    rtols = [float(r) for r in args.rtols.split(",")]
    model, _, train, (x_test, y_test), lam = build(args)
    n_train = sum(int(x.shape[0]) for x, _ in train)
    print(
        f"# {args.workload}: P = {model.num_params:,}, N = {n_train}, lambda = {lam}, "
        f"{args.dtype}, preconditioner {preconditioner}, torch threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rhs, _ = model.per_sample_grads(x_test, y_test)
    operator = influx.HessianOperator(model, train).shift(lam)

    start, cpu = time.perf_counter(), time.process_time()
    state = CgSolver(preconditioner=preconditioner).init(operator)
    print(
        f"# preconditioner fit {time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU",
        flush=True,
    )
    start = time.perf_counter()
    if args.workload == "W1":
        direct = DirectSolver()
        reference, _ = direct.solve(direct.init(operator), rhs)
        label = "direct"
    else:
        tight = CgSolver(
            rtol=1e-10, atol=0.0, preconditioner=preconditioner, block=True
        )
        reference, info = tight.solve(state, rhs)
        label = f"block CG rtol 1e-10 ({int(info.iterations.max())} iterations)"
    print(f"# reference: {label}, {time.perf_counter() - start:.1f} s", flush=True)

    rows, factors = [], [reference]
    for block in [s == "block" for s in args.solvers.split(",")]:
        for rtol in rtols:
            solver = CgSolver(
                rtol=rtol, atol=0.0, preconditioner=preconditioner, block=block
            )
            start, cpu = time.perf_counter(), time.process_time()
            x, info = solver.solve(state, rhs)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            rows.append(("block" if block else "plain", rtol, cpu, info))
            factors.append(x)
            print(
                f"# {rows[-1][0]} rtol {rtol:g}: {seconds:.1f} s wall, {cpu:.1f} s "
                f"CPU, iterations "
                f"{int(info.iterations.max())}",
                flush=True,
            )
    scores = influences(model, train, torch.cat(factors))
    scores = scores.reshape(len(factors), TEST_POINTS, -1)
    print()
    print("| CG | rtol | iterations | solve, CPU s | 1 - Pearson (max) | top-10% |")
    print("|---|---|---|---|---|---|")
    for (kind, rtol, seconds, info), score in zip(rows, scores[1:], strict=True):
        print(
            f"| {kind} | {rtol:g} | {int(info.iterations.max())} | {seconds:.1f} | "
            f"{1 - pearson_min(score, scores[0]):.1e} | "
            f"{top_overlap(score, scores[0]):.3f} |"
        )


if __name__ == "__main__":
    main()
