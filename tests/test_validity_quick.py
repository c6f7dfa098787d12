"""A tiny run of the logistic-regression LOO study (benchmarks/validity).

Guards the study code against rot: 60 digits, direct only, one backend; the
predicted leave-one-out change must correlate with the retrained one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sklearn")

VALIDITY = Path(__file__).resolve().parents[1] / "benchmarks" / "validity"


@pytest.fixture
def loo_logistic(monkeypatch):
    monkeypatch.syspath_prepend(str(VALIDITY))
    import loo_logistic

    return loo_logistic


def test_tiny_loo_logistic(backend_name, loo_logistic, tmp_path):
    results = loo_logistic.run(
        [backend_name],
        True,
        methods=["direct"],
        num_train=60,
        num_test=5,
        l2=0.1,
    )
    assert results["grad_norm"] < 1e-12
    assert results["loo_grad_norm_max"] < 1e-12
    (row,) = results["rows"]
    assert (row["backend"], row["method"]) == (backend_name, "direct")
    assert row["pearson"] > 0.99
    assert row["pooled_pearson"] > 0.99
    pytest.importorskip("matplotlib")
    text = loo_logistic.section(results, tmp_path)
    assert "| " + backend_name + " | direct |" in text
    assert (tmp_path / "loo_logistic_scatter.png").stat().st_size > 0
