"""Dense [P, P] steps that cannot fit in memory are refused before any product."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import jax_mlp, mlp_weights, mse_loss, torch_mlp

import influx
import influx._memory


def _counting(model: Any) -> dict[str, int]:
    """Count calls of the model's Hessian products (instance attributes)."""
    calls = {"hvp": 0}
    for name in calls:
        original = getattr(model, name)

        def counted(*args: Any, _name: str = name, _f: Any = original) -> Any:
            calls[_name] += 1
            return _f(*args)

        setattr(model, name, counted)
    return calls


def _small_model(backend_name: str) -> Any:
    layers = mlp_weights((3, 2, 1), seed=0)  # P = 11
    if backend_name == "torch":
        return influx.twice_differentiable(
            torch_mlp(layers, "float64"), mse_loss(backend_name)
        )
    apply_fn, params = jax_mlp(layers, "float64")
    return influx.twice_differentiable(apply_fn, mse_loss(backend_name), params=params)


def _data(in_dim: int = 3, out_dim: int = 1) -> Any:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, in_dim)), rng.standard_normal((8, out_dim))
    return influx.batches(x, y, batch_size=4)


@pytest.mark.parametrize(
    ("method", "options"), [("direct", {}), ("arnoldi", {"rank_estimate": 11})]
)
def test_dense_step_refused_before_any_product(
    backend_name: str,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    options: dict[str, Any],
) -> None:
    # 11 * 11 * 8 bytes * 4 matrices = 3,872 bytes; pretend only 1,000 are free.
    monkeypatch.setattr(influx._memory, "available_memory", lambda: 1000)
    model = _small_model(backend_name)
    calls = _counting(model)
    with pytest.raises(influx.InputError) as raised:
        influx.compute_influences(
            model,
            _data(),
            inversion_method=method,
            hessian_regularization=5.0,
            **options,
        )
    message = str(raised.value)
    assert "GiB" in message and "P=11" in message
    assert "'cg', 'lissa' or 'arnoldi'" in message
    assert calls == {"hvp": 0}


def test_dense_step_allowed_when_it_fits(
    backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(influx._memory, "available_memory", lambda: 10_000)
    model = _small_model(backend_name)
    result = influx.compute_influences(model, _data(), hessian_regularization=5.0)
    assert tuple(result.shape) == (8, 8)


def test_iterative_methods_never_check_dense_memory(
    backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(influx._memory, "available_memory", lambda: 1)
    model = _small_model(backend_name)
    result = influx.compute_influences(
        model, _data(), inversion_method="cg", hessian_regularization=5.0
    )
    assert tuple(result.shape) == (8, 8)


def test_huge_torch_model_refused_without_allocating() -> None:
    torch = pytest.importorskip("torch")
    # P = 400,000: one float32 [P, P] matrix is 596 GiB.
    module = torch.nn.Linear(1, 200_000)
    model = influx.twice_differentiable(module, torch.nn.MSELoss())
    calls = _counting(model)
    rng = np.random.default_rng(0)
    data = influx.batches(
        rng.standard_normal((2, 1)).astype(np.float32),
        rng.standard_normal((2, 200_000)).astype(np.float32),
        batch_size=2,
    )
    with pytest.raises(influx.InputError, match=r"GiB.*'cg', 'lissa' or 'arnoldi'"):
        influx.compute_influence_factors(model, data, data, "direct")
    assert calls == {"hvp": 0}


def test_available_memory_reads_the_host() -> None:
    available = influx._memory.available_memory()
    assert available is None or available > 0
