"""``out=`` a zarr array, through ``influx.Influence`` and the functional API.

The reference is the same computation returned in memory. A read-only zarr
array is refused before any model evaluation (counted) and left untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import mlp_weights, to_numpy, wrap_mlp

import influx

zarr = pytest.importorskip("zarr")

SIZES = (3, 4, 2)
N_TRAIN, N_TEST = 13, 5  # batches of 4 (4, 4, 4, 1) cross the zarr chunks
REG = 2.0
CHUNKS = (2, 3)


def _problem(backend_name: str) -> tuple[Any, Any, Any, dict[str, int]]:
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((N_TRAIN, 3)), rng.standard_normal((N_TRAIN, 2))
    xt, yt = rng.standard_normal((N_TEST, 3)), rng.standard_normal((N_TEST, 2))
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=2))
    calls = dict.fromkeys(("per_sample_grads", "hvp", "mixed_grads"), 0)
    for name in calls:
        original = getattr(model, name)

        def counted(*args: Any, _name: str = name, _f: Any = original) -> Any:
            calls[_name] += 1
            return _f(*args)

        setattr(model, name, counted)
    train = influx.batches(x, y, batch_size=4)
    return model, train, influx.batches(xt, yt, batch_size=2), calls


def _array(tmp_path: Any, shape: tuple[int, ...], mode: str = "w") -> Any:
    store = str(tmp_path / "scores.zarr")
    if mode == "w":
        chunks = CHUNKS + shape[2:]
        return zarr.open_array(store, mode="w", shape=shape, chunks=chunks, dtype="f8")
    return zarr.open_array(store, mode=mode)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("up", (N_TEST, N_TRAIN)), ("perturbation", (N_TEST, N_TRAIN, 3))],
)
def test_influence_object_fills_zarr(backend_name, tmp_path, kind, shape):
    model, train, test, _ = _problem(backend_name)
    inf = influx.Influence(model, "direct", REG).fit(train)
    expected = to_numpy(inf.influences(test, influence_type=kind))
    assert expected.shape == shape
    out = _array(tmp_path, shape)
    returned = inf.influences(test, influence_type=kind, out=out)
    assert returned is out
    # Written block by block from the same factors: the same numbers.
    np.testing.assert_allclose(out[:], expected, rtol=1e-13, atol=1e-15)
    # What is on disk, read back through a fresh handle.
    np.testing.assert_allclose(
        _array(tmp_path, shape, mode="r")[:], expected, rtol=1e-13, atol=1e-15
    )


def test_functional_perturbation_fills_zarr(backend_name, tmp_path):
    model, train, test, _ = _problem(backend_name)
    shape = (N_TEST, N_TRAIN, 3)
    out = _array(tmp_path, shape)
    influx.compute_influences(
        model,
        train,
        test_data=test,
        influence_type="perturbation",
        hessian_regularization=REG,
        out=out,
    )
    expected = influx.compute_influences(
        model,
        train,
        test_data=test,
        influence_type="perturbation",
        hessian_regularization=REG,
    )
    np.testing.assert_allclose(out[:], to_numpy(expected), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("up", (N_TEST, N_TRAIN)), ("perturbation", (N_TEST, N_TRAIN, 3))],
)
def test_read_only_zarr_refused_before_any_work(backend_name, tmp_path, kind, shape):
    model, train, test, calls = _problem(backend_name)
    _array(tmp_path, shape)[:] = 7.0
    read_only = _array(tmp_path, shape, mode="r")
    with pytest.raises(influx.InputError, match="read-only"):
        influx.compute_influences(
            model,
            train,
            test_data=test,
            influence_type=kind,
            hessian_regularization=REG,
            out=read_only,
        )
    assert not any(calls.values()), calls

    inf = influx.Influence(model, "direct", REG).fit(train)
    calls.update(dict.fromkeys(calls, 0))
    with pytest.raises(influx.InputError, match="read-only"):
        inf.influences(test, influence_type=kind, out=read_only)
    assert not any(calls.values()), calls
    np.testing.assert_array_equal(read_only[:], np.full(shape, 7.0))
