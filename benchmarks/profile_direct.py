"""Where Direct's time goes on W1: the dense Hessian against everything else.

Runs in the influx environment or in pyDVL 0.10's, and times each stage of
the Direct up-weighting influences separately (median of 5 after a warm-up):

- influx: ``HessianOperator.to_dense`` (chunked reverse-over-reverse HVPs
  with the identity), the Cholesky factorisation, and the rest;
- pyDVL 0.10: ``pydvl.influence.torch.functional.hessian`` (torch.func's
  ``hessian``, forward over reverse, batch by batch), and the rest of
  ``DirectInfluence.fit(...).influences(...)``.

``python benchmarks/profile_direct.py`` (or the peer's interpreter).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import load


def _median(call: Callable[[], Any], repeats: int = 5) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_influx() -> dict[str, float]:
    import torch
    from _models import torch_model

    import influx
    from influx.operators import HessianOperator

    workload = load("W1")
    model, tensor = torch_model(workload.weights, "float32")
    train = influx.batches(
        tensor(workload.x_train), tensor(workload.y_train), batch_size=100
    )
    test = influx.batches(
        tensor(workload.x_test), tensor(workload.y_test), batch_size=100
    )
    operator = HessianOperator(model, train)
    dense = operator.to_dense() + 0.01 * torch.eye(model.num_params)

    def total() -> Any:
        return influx.compute_influences(
            model, train, test_data=test, hessian_regularization=0.01
        )

    return {
        "hessian": _median(operator.to_dense),
        "cholesky": _median(lambda: torch.linalg.cholesky(dense)),
        "total": _median(total),
    }


def profile_pydvl() -> dict[str, float]:
    from peer_pydvl import build_data, build_model, loss_fn
    from pydvl.influence.torch import DirectInfluence
    from pydvl.influence.torch.functional import hessian

    workload = load("W1")
    model, data = build_model(workload), build_data(workload)

    def total() -> Any:
        fitted = DirectInfluence(model, loss_fn, regularization=0.01)
        fitted = fitted.fit(data.train_loader)
        return fitted.influences(data.x_test, data.y_test, data.x_train, data.y_train)

    return {
        "hessian": _median(lambda: hessian(model, loss_fn, data.train_loader)),
        "total": _median(total),
    }


def main() -> None:
    try:
        import pydvl  # noqa: F401

        name, stages = "pyDVL", profile_pydvl()
    except ImportError:
        name, stages = "influx-torch", profile_influx()
    rest = stages["total"] - sum(v for k, v in stages.items() if k != "total")
    parts = ", ".join(f"{k} {v:.3f} s" for k, v in stages.items() if k != "total")
    print(f"{name}: total {stages['total']:.3f} s = {parts}, rest {rest:.3f} s")


if __name__ == "__main__":
    main()
