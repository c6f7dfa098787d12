"""Queries with ``client=`` on the session's 2-worker LocalCluster.

Reference: the same fitted Influence queried in this process without a
client. Tolerances: 1e-10 (float64) and 1e-5 relative (float32); the blocks
are computed by the same code on the same batches, so they agree far closer.
The input is a source of 23 points in partitions of 8 (8, 8, 7) and batches
of 4 (the last of 3): uneven last partition and batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from models import mlp_weights, to_numpy, wrap_mlp

import influx

pytest.importorskip("distributed")
pytest.importorskip("zarr")

N_TRAIN, N_TEST, BATCH, PARTITION = 23, 5, 4, 8
REG = 2.0
TOL = {"float64": 1e-10, "float32": 1e-5}


def factory_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training points (a FactorySource reads them on each worker)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_TRAIN, 3))
    y = rng.standard_normal((N_TRAIN, 2))
    x[17], y[17] = x[2], y[2]  # a duplicate in another partition: tied scores
    return x, y


def factory_data_with_nan() -> tuple[np.ndarray, np.ndarray]:
    """:func:`factory_data` with a NaN input in batch 4 (partition 2)."""
    x, y = factory_data()
    x[17, 0] = np.nan
    return x, y


def _problem(backend_name: str, dtype: str = "float64", method: str = "direct") -> Any:
    x, y = factory_data()
    x, y = x.astype(dtype), y.astype(dtype)
    rng = np.random.default_rng(5)
    xt = rng.standard_normal((N_TEST, 3)).astype(dtype)
    yt = rng.standard_normal((N_TEST, 2)).astype(dtype)
    model = wrap_mlp(backend_name, mlp_weights((3, 4, 2), seed=1), dtype=dtype)
    train = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    inf = influx.Influence(model, method, REG).fit(train)
    return inf, train, influx.batches(xt, yt, batch_size=2)


def _close(actual: Any, expected: Any, dtype: str) -> None:
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_influences_equal_single_process(
    backend_name: str, dtype: str, dask_client: Any, tmp_path: Path
) -> None:
    inf, train, test = _problem(backend_name, dtype)
    for options in (
        {},
        {"influence_type": "perturbation"},
        {"by_layer": True},
    ):
        expected = inf.influences(test, **options)
        got = inf.influences(test, train, client=dask_client, **options)
        assert type(got) is type(expected)
        _close(got, expected, dtype)
    expected = inf.influences(test)
    stored = inf.influences(test, out=tmp_path / "s.zarr", client=dask_client)
    _close(stored[:], expected, dtype)
    results = influx.open_results(tmp_path / "s.zarr")
    assert results.written_by(1) == 3 and results.chunks_missing == []
    filled = np.zeros((N_TEST, N_TRAIN), dtype=dtype)
    assert inf.influences(test, out=filled, client=dask_client) is filled
    _close(filled, expected, dtype)


@pytest.mark.parametrize("method", ["direct", "cg", "ekfac"])
def test_self_influence_equals_single_process(
    backend_name: str, method: str, dask_client: Any, tmp_path: Path
) -> None:
    inf, train, _ = _problem(backend_name, method=method)
    expected = inf.self_influence(train)
    _close(inf.self_influence(train, client=dask_client), expected, "float64")
    stored = inf.self_influence(train, out=tmp_path / "self.zarr", client=dask_client)
    assert stored.shape == (N_TRAIN,)
    _close(stored[:], expected, "float64")
    # the model went to the workers once for both queries
    assert len(inf.__dict__["_worker_models"]) == 1


def test_self_influence_needs_source_training_for_cg(
    backend_name: str, dask_client: Any
) -> None:
    """cg solves with the training Hessian on the workers: it must read it there."""
    inf, train, _ = _problem(backend_name)
    x, y = factory_data()
    on_arrays = influx.Influence(inf.model, "cg", REG).fit(
        influx.batches(x, y, batch_size=BATCH)
    )
    with pytest.raises(influx.InputError, match="training data must be a source"):
        on_arrays.self_influence(train, client=dask_client)
    direct = influx.Influence(inf.model, "direct", REG).fit(
        influx.batches(x, y, batch_size=BATCH)
    )  # factorised: the workers need no training data
    _close(
        direct.self_influence(train, client=dask_client),
        direct.self_influence(train),
        "float64",
    )


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_single_process(
    backend_name: str, largest: bool, dask_client: Any
) -> None:
    inf, train, test = _problem(backend_name)
    for k in (1, 4, N_TRAIN):
        values, indices = inf.top_k(test, train, k, largest=largest)
        got_values, got_indices = inf.top_k(
            test, train, k, largest=largest, client=dask_client
        )
        _close(got_values, values, "float64")
        np.testing.assert_array_equal(to_numpy(got_indices), to_numpy(indices))
    # the duplicated point ties with its original: the smaller index first
    scores = to_numpy(inf.influences(test))
    np.testing.assert_allclose(scores[:, 17], scores[:, 2], rtol=0, atol=1e-12)
    _, indices = inf.top_k(test, train, N_TRAIN, largest=largest, client=dask_client)
    order = to_numpy(indices).astype(int)
    for row in order:
        assert list(row).index(2) < list(row).index(17)


def test_factory_source_resumes_on_workers(
    backend_name: str, dask_client: Any, tmp_path: Path
) -> None:
    """Workers read a FactorySource; a rerun recomputes only the missing chunk."""
    inf, _, test = _problem(backend_name)
    source = influx.FactorySource(
        "test_distributed_scoring:factory_data",
        batch_size=BATCH,
        partition_size=PARTITION,
    )
    expected = to_numpy(inf.influences(test, source))
    path = tmp_path / "f.zarr"
    stored = inf.influences(test, source, out=path, client=dask_client)
    np.testing.assert_allclose(stored[:], expected, rtol=0, atol=1e-10)
    # lose chunk 1 as a crash before its done mark would have
    stored[:, PARTITION : 2 * PARTITION] = np.nan
    influx.open_results(path)  # readable while incomplete
    import zarr

    zarr.open_group(str(path), mode="r+")["done"][1:2] = 0
    assert influx.open_results(path).chunks_missing == [1]
    again = inf.influences(test, source, out=path, client=dask_client)
    results = influx.open_results(path)
    assert results.written_by(2) == 1 and results.written_by(1) == 2
    np.testing.assert_allclose(again[:], expected, rtol=0, atol=1e-10)


def test_client_needs_a_source(
    backend_name: str, dask_client: Any, tmp_path: Path
) -> None:
    inf, _, test = _problem(backend_name)
    x, y = factory_data()
    arrays = influx.batches(x, y, batch_size=BATCH)
    path = tmp_path / "never.zarr"
    for call in (
        lambda: inf.influences(test, arrays, client=dask_client, out=path),
        lambda: inf.self_influence(arrays, client=dask_client),
        lambda: inf.top_k(test, arrays, 3, client=dask_client),
    ):
        with pytest.raises(influx.InputError, match=r"influx\.ArraySource"):
            call()
    assert not path.exists()
    with pytest.raises(TypeError, match=r"dask\.distributed\.Client"):
        inf.influences(test, client="tcp://nowhere:8786")


def test_worker_error_reaches_the_client(
    backend_name: str, dask_client: Any, tmp_path: Path
) -> None:
    """A task's error is raised here, naming the batch as the whole source does."""
    inf, _, test = _problem(backend_name)
    source = influx.FactorySource(
        "test_distributed_scoring:factory_data_with_nan",
        batch_size=BATCH,
        partition_size=PARTITION,
    )
    path = tmp_path / "nan.zarr"
    with pytest.raises(influx.InputError, match="batch 4"):
        inf.influences(test, source, out=path, client=dask_client)
    assert 2 in influx.open_results(path).chunks_missing
