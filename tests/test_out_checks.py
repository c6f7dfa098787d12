"""``out=`` is checked up front: type, floating dtype, writability, full shape.

A bad ``out`` is refused before any model evaluation (counted), and nothing
is written into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import mlp_weights, to_backend, to_numpy, wrap_mlp

import influx

SIZES = (3, 4, 2)
N_TRAIN, N_TEST = 11, 3  # training batches of 4: 4, 4, 3
REG = 3.0


def _setup(backend_name: str) -> tuple[Any, Any, Any, dict[str, int]]:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((N_TRAIN, 3)), rng.standard_normal((N_TRAIN, 2))
    xt, yt = rng.standard_normal((N_TEST, 3)), rng.standard_normal((N_TEST, 2))
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=1))
    calls = _count_calls(model)
    return model, influx.batches(x, y, batch_size=4), influx.batches(xt, yt), calls


def _count_calls(model: Any) -> dict[str, int]:
    """Count every model evaluation (wrapped as instance attributes)."""
    names = ("per_sample_grads", "hvp", "mixed_grads")
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(model, name)

        def counted(*args: Any, _name: str = name, _f: Any = original) -> Any:
            calls[_name] += 1
            return _f(*args)

        setattr(model, name, counted)
    return calls


def _no_calls(calls: dict[str, int]) -> bool:
    return not any(calls.values())


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128])
def test_non_floating_out_refused_before_any_work(backend_name, dtype):
    model, train, test, calls = _setup(backend_name)
    out = np.zeros((N_TEST, N_TRAIN), dtype=dtype)
    with pytest.raises(influx.InputError, match="floating dtype"):
        influx.compute_influences(
            model, train, test_data=test, out=out, hessian_regularization=REG
        )
    assert _no_calls(calls)


def test_read_only_numpy_and_memmap_refused(backend_name, tmp_path):
    model, train, test, calls = _setup(backend_name)
    frozen = np.zeros((N_TEST, N_TRAIN))
    frozen.flags.writeable = False
    path = tmp_path / "out.npy"
    np.save(path, np.zeros((N_TEST, N_TRAIN)))
    read_only_memmap = np.load(path, mmap_mode="r")
    for out in (frozen, read_only_memmap):
        with pytest.raises(influx.InputError, match="read-only"):
            influx.compute_influences(
                model, train, test_data=test, out=out, hessian_regularization=REG
            )
    assert _no_calls(calls)


def test_native_arrays_refused_with_the_fix(backend_name):
    model, train, test, calls = _setup(backend_name)
    out = to_backend(backend_name, np.zeros((N_TEST, N_TRAIN)))
    with pytest.raises(TypeError, match=r"numpy array.*out=None"):
        influx.compute_influences(
            model, train, test_data=test, out=out, hessian_regularization=REG
        )
    factors = np.zeros((N_TEST, model.num_params))
    with pytest.raises(TypeError, match=r"numpy array.*out=None"):
        influx.compute_influences_up(model, train, factors, out=out)
    assert _no_calls(calls)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("up", (N_TEST, N_TRAIN + 1)),
        ("up", (N_TEST, N_TRAIN - 1)),  # too narrow: used to be partly written
        ("up", (N_TEST + 1, N_TRAIN)),
        ("up", (N_TEST, N_TRAIN, 1)),
        ("perturbation", (N_TEST, N_TRAIN)),
        ("perturbation", (N_TEST, N_TRAIN, 2)),
        ("perturbation", (N_TEST, N_TRAIN - 1, 3)),
    ],
)
def test_wrong_shape_refused_before_the_solve(backend_name, kind, shape):
    model, train, test, calls = _setup(backend_name)
    out = np.full(shape, np.nan)
    with pytest.raises(influx.InputError, match=rf"N_test={N_TEST}.*M={N_TRAIN}"):
        influx.compute_influences(
            model,
            train,
            test_data=test,
            influence_type=kind,
            out=out,
            hessian_regularization=REG,
        )
    assert _no_calls(calls)
    assert np.all(np.isnan(out))


@pytest.mark.parametrize("kind", ["up", "perturbation"])
def test_too_narrow_out_is_not_partly_written(backend_name, kind):
    model, train, test, calls = _setup(backend_name)
    factors = influx.compute_influence_factors(
        model, train, test, "direct", hessian_perturbation=REG
    )
    compute = (
        influx.compute_influences_up if kind == "up" else influx.compute_influences_pert
    )
    shape = (N_TEST, N_TRAIN - 3) if kind == "up" else (N_TEST, N_TRAIN - 3, 3)
    out = np.full(shape, np.nan)
    before = dict(calls)
    with pytest.raises(influx.InputError, match="too small"):
        compute(model, train, factors, out=out)
    assert calls == before  # no input gradient was computed
    assert np.all(np.isnan(out))


def test_sized_list_and_plain_iterable_counted_without_the_model(backend_name):
    model, train, test, calls = _setup(backend_name)

    class Reiterable:
        def __init__(self, batches: list[Any]) -> None:
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    as_list = list(train)
    for data in (as_list, Reiterable(as_list)):
        out = np.full((N_TEST, N_TRAIN + 2), np.nan)
        with pytest.raises(influx.InputError, match=f"M={N_TRAIN}"):
            influx.compute_influences(
                model, data, test_data=test, out=out, hessian_regularization=REG
            )
        assert _no_calls(calls)
    out = np.empty((N_TEST, N_TRAIN), dtype=np.float32)
    result = influx.compute_influences(
        model, Reiterable(as_list), test_data=test, out=out, hessian_regularization=REG
    )
    expected = to_numpy(
        influx.compute_influences(
            model, train, test_data=test, hessian_regularization=REG
        )
    )
    assert result is out
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_dataloader_length_from_its_sampler():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    model, _, test, calls = _setup("torch")
    rng = np.random.default_rng(2)
    dataset = TensorDataset(
        torch.as_tensor(rng.standard_normal((N_TRAIN, 3))),
        torch.as_tensor(rng.standard_normal((N_TRAIN, 2))),
    )
    loader = DataLoader(dataset, batch_size=4)
    with pytest.raises(influx.InputError, match=f"M={N_TRAIN}"):
        influx.compute_influences(
            model,
            loader,
            test_data=test,
            out=np.zeros((N_TEST, 5)),
            hessian_regularization=REG,
        )
    assert _no_calls(calls)
    # drop_last is ignored (every point is read once), so M is still N_TRAIN.
    dropped = DataLoader(dataset, batch_size=4, drop_last=True, shuffle=True)
    with pytest.raises(influx.InputError, match=f"M={N_TRAIN}"):
        influx.compute_influences(
            model,
            dropped,
            test_data=test,
            out=np.zeros((N_TEST, 8)),
            hessian_regularization=REG,
        )
    assert _no_calls(calls)


def test_zarr_out_checked_and_filled(backend_name, tmp_path):
    zarr = pytest.importorskip("zarr")
    model, train, test, calls = _setup(backend_name)
    store = str(tmp_path / "out.zarr")
    zarr.open_array(store, mode="w", shape=(N_TEST, N_TRAIN), dtype="f8")
    with pytest.raises(influx.InputError, match="read-only"):
        influx.compute_influences(
            model,
            train,
            test_data=test,
            out=zarr.open_array(store, mode="r"),
            hessian_regularization=REG,
        )
    integer = zarr.zeros((N_TEST, N_TRAIN), dtype="i4")
    with pytest.raises(influx.InputError, match="floating dtype"):
        influx.compute_influences(
            model, train, test_data=test, out=integer, hessian_regularization=REG
        )
    assert _no_calls(calls)
    out = zarr.open_array(store, mode="r+")
    influx.compute_influences(
        model, train, test_data=test, out=out, hessian_regularization=REG
    )
    expected = to_numpy(
        influx.compute_influences(
            model, train, test_data=test, hessian_regularization=REG
        )
    )
    np.testing.assert_allclose(out[:], expected, rtol=1e-12, atol=1e-14)
