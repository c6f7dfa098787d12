"""Results written block by block into ``out`` (numpy, memmap) equal the
in-memory results; a wrong ``out`` is named before any work is lost."""

from __future__ import annotations

import numpy as np
import pytest
from models import mlp_weights, to_numpy, wrap_mlp

import influx

SIZES = (3, 6, 2)
N_TRAIN, N_TEST = 13, 4  # batches of 5: 5, 5, 3


def _setup(backend_name: str):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((N_TRAIN, 3)), rng.standard_normal((N_TRAIN, 2))
    x_test, y_test = rng.standard_normal((N_TEST, 3)), rng.standard_normal((N_TEST, 2))
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=1))
    train = influx.batches(x, y, batch_size=5)
    test = influx.batches(x_test, y_test, batch_size=N_TEST)
    return model, train, test


@pytest.mark.parametrize("kind", ["up", "perturbation"])
@pytest.mark.parametrize("container", ["ndarray", "memmap"])
def test_out_equals_in_memory_result(backend_name, kind, container, tmp_path):
    model, train, test = _setup(backend_name)
    options = dict(
        test_data=test,
        influence_type=kind,
        hessian_regularization=3.0,
    )
    expected = to_numpy(influx.compute_influences(model, train, **options))
    if container == "ndarray":
        out = np.full(expected.shape, np.nan)
    else:
        out = np.lib.format.open_memmap(
            tmp_path / "influences.npy",
            mode="w+",
            dtype=np.float64,
            shape=expected.shape,
        )
    result = influx.compute_influences(model, train, out=out, **options)
    assert result is out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    if container == "memmap":
        out.flush()
        np.testing.assert_allclose(
            np.load(tmp_path / "influences.npy"), expected, rtol=1e-12, atol=1e-14
        )


def test_out_of_the_wrong_size_is_named(backend_name):
    model, train, test = _setup(backend_name)
    factors = influx.compute_influence_factors(
        model, train, test, "direct", hessian_perturbation=3.0
    )
    with pytest.raises(influx.InputError, match=r"N_test=4"):
        influx.compute_influences_up(model, train, factors, out=np.zeros((3, N_TRAIN)))
    with pytest.raises(influx.InputError, match="too small"):
        influx.compute_influences_up(model, train, factors, out=np.zeros((4, 7)))
    with pytest.raises(influx.InputError, match="M=13"):
        influx.compute_influences_up(model, train, factors, out=np.zeros((4, 20)))
    with pytest.raises(TypeError, match="writable array"):
        influx.compute_influences_up(model, train, factors, out=[[0.0]])


def test_wrong_out_fails_before_the_factors(backend_name):
    model, train, test = _setup(backend_name)
    with pytest.raises(TypeError, match="writable array"):
        influx.compute_influences(model, train, test_data=test, out="influences.npy")
