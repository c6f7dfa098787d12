"""A tiny run of the MLP leave-one-out study (benchmarks/validity/loo_mlp.py).

It guards the study code against rot: a digits MLP trained in numpy to a
gradient norm below 1e-12, a few points removed and the model retrained from
the optimum, and influx's ``direct`` prediction ``I_up / N`` of each test-loss
change compared with the retrained change (an independent reference: numpy
retraining, no influx). The bar is below what was measured (0.93 and 0.97 on
the two test points, both backends) with room for platform rounding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "validity"))

import _mlp
import loo_mlp

DIRECT = (("direct", "direct", "hessian", {}),)


def test_loo_mlp_direct_predicts_retraining(backend_name: str) -> None:
    results = loo_mlp.study(
        [backend_name],
        n_train=60,
        n_test=30,
        hidden=4,
        n_high=1,
        n_random_test=1,
        top=4,
        n_random=6,
        methods=DIRECT,
    )
    assert results["retrain"]["max_grad_norm"] < _mlp.GTOL
    (row,) = results["methods"]
    assert row["backend"] == backend_name
    actual = np.asarray(results["actual"])
    assert np.asarray(row["predicted"]).shape == actual.shape
    assert min(row["pearson_per_test"]) > 0.85, row["pearson_per_test"]
