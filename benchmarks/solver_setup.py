"""Setup linear algebra of the flat solvers at 1M parameters (issue 9, item 7).

``python benchmarks/solver_setup.py [--size 1126410] [--what nystrom,arnoldi]``

Times ``NystromPreconditioner(rank=100).fit`` and ``ArnoldiSolver.init`` (block
Krylov, ``rank_estimate=10``, the default basis limit of 240 vectors, ``tol``
small enough that the whole basis is built: the worst case) on an operator
whose products cost almost nothing: ``H = diag(d)`` with ``d_i = 1 / sqrt(i)``
and ``hessian_regularization`` 0.01, as torch float32 arrays (the solvers
accumulate in float64). What is measured is therefore what the setup spends
outside the products, which does not depend on the training set: the sketch's
QR, the SVD or eigenproblem, orthogonalisation and Rayleigh-Ritz. Each
measurement runs in a fresh process and reports its wall and CPU time (one
torch thread: the CPU time is the work, also on a shared machine) and the peak
resident memory of the process (``ru_maxrss``).

Run it on two commits to compare (the module's own code is what is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import influx
from influx.operators import LinearOperator

SIZE = 1_126_410  # the 64-1024-1024-10 MLP


class DiagonalOperator(LinearOperator):
    """``diag(d)`` on torch arrays: products cost ``O(K P)``."""

    tags = frozenset({"symmetric"})

    def __init__(self, diagonal: Any) -> None:
        self.diagonal = diagonal
        self.size = int(diagonal.shape[0])

    @property
    def like(self) -> Any:
        return self.diagonal

    @property
    def backend(self) -> Any:
        return influx.backends.get_backend("torch")

    def mv(self, vectors: Any) -> Any:
        return vectors * self.diagonal.to(vectors.dtype)


def measure(what: str, size: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("INFLUX_THREADS", "1")))
    index = torch.arange(1, size + 1, dtype=torch.float64)
    operator = DiagonalOperator((1.0 / index.sqrt()).float()).shift(0.01)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu = time.perf_counter(), time.process_time()
    if what == "nystrom":
        from influx.solvers import NystromPreconditioner

        NystromPreconditioner(rank=100).fit(operator, torch.float64)
    else:
        import warnings

        from influx.solvers import ArnoldiSolver

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ArnoldiSolver(rank_estimate=10, tol=1e-12).init(operator)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "what": what,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_gib": round(peak / 2**20, 2),
        "setup_gib": round((peak - baseline) / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--what", default="nystrom,arnoldi")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.size)))
        return
    print(f"# P = {args.size:,}, load {os.getloadavg()[0]:.1f}")
    for what in args.what.split(","):
        result = subprocess.run(
            [sys.executable, __file__, "--child", what, "--size", str(args.size)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
