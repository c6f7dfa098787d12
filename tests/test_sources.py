"""Data sources (``influx.ArraySource``, ``influx.FactorySource``) and partitions.

Reference: the numpy arrays themselves, sliced by hand. Every kind of array a
source takes must give the same batches, in the same order, with the same
global batch numbers; a pickled partition of a memmap, zarr or factory source
must not carry the data.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import influx
from influx.data import DataReader
from influx.errors import InputError
from influx.sources import Partition, resolve_factory

N, BATCH, PARTITION = 23, 4, 8  # partitions of 8, 8, 7 points; last batch 3
CALLS: list[int] = []


def arrays(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """``x [n, 3]`` (float64) and ``y [n]`` (int64) with distinct values."""
    x = np.arange(n * 3, dtype=np.float64).reshape(n, 3) / 7.0
    y = np.arange(n, dtype=np.int64) % 5
    return x, y


def factory(n: int = N, *, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A factory: ``arrays(n)`` with ``x`` scaled (its calls are counted)."""
    CALLS.append(n)
    x, y = arrays(n)
    return x * scale, y


def not_a_pair() -> np.ndarray:
    return np.zeros(3)


def _expected_batches(x: np.ndarray, y: np.ndarray) -> list[tuple[Any, Any]]:
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def _check_source(source: influx.ArraySource, x: np.ndarray, y: np.ndarray) -> None:
    expected = _expected_batches(x, y)
    assert source.num_samples == N and len(source) == len(expected) == 6
    assert source.item_shape == (3,)
    for (xb, yb), (xe, ye) in zip(source, expected, strict=True):
        assert isinstance(xb, np.ndarray)
        np.testing.assert_array_equal(xb, xe)
        np.testing.assert_array_equal(yb, ye)
    np.testing.assert_array_equal(source[-1][0], expected[-1][0])
    partitions = source.partitions
    assert [p.num_samples for p in partitions] == [8, 8, 7]
    assert [(p.number, p.start, p.stop, p.first_batch) for p in partitions] == [
        (0, 0, 8, 0),
        (1, 8, 16, 2),
        (2, 16, 23, 4),
    ]
    flat = [batch for p in partitions for batch in p]
    for (xb, yb), (xe, ye) in zip(flat, expected, strict=True):
        np.testing.assert_array_equal(xb, xe)
        np.testing.assert_array_equal(yb, ye)
    # a partition read after a round trip through pickle (as on a worker)
    copy = pickle.loads(pickle.dumps(partitions[2]))
    np.testing.assert_array_equal(copy[1][0], x[20:23])
    np.testing.assert_array_equal(copy[-1][1], y[20:23])


def test_numpy_source(tmp_path: Path) -> None:
    x, y = arrays()
    source = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    _check_source(source, x, y)
    # each partition pickles its own slice only
    x, y = arrays(4000)
    source = influx.ArraySource(x, y, batch_size=BATCH, partition_size=400)
    sizes = [len(pickle.dumps(p)) for p in source.partitions]
    assert max(sizes) < len(pickle.dumps((x, y))) / 5


def _save(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> tuple[Path, Path]:
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return tmp_path / "x.npy", tmp_path / "y.npy"


def test_npy_paths_and_memmaps_pickle_without_data(tmp_path: Path) -> None:
    x, y = arrays(4000)
    px, py = _save(tmp_path, x, y)
    for source in (
        influx.ArraySource(px, str(py), batch_size=BATCH, partition_size=PARTITION),
        influx.ArraySource(
            np.load(px, mmap_mode="r"),
            np.load(py, mmap_mode="r"),
            batch_size=BATCH,
            partition_size=PARTITION,
        ),
    ):
        partition = source.partitions[100]
        assert len(pickle.dumps(partition)) < 2000  # the data is 96 kB
        copy = pickle.loads(pickle.dumps(partition))
        np.testing.assert_array_equal(copy[0][0], x[800:804])
        np.testing.assert_array_equal(copy[1][1], y[804:808])


def test_memmap_slices_keep_their_offset(tmp_path: Path) -> None:
    big_x, big_y = arrays(40)
    px, py = _save(tmp_path, big_x, big_y)
    mx, my = np.load(px, mmap_mode="r"), np.load(py, mmap_mode="r")
    x, y = mx[7 : 7 + N], my[7 : 7 + N]  # a view that starts inside the file
    source = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    assert len(pickle.dumps(source.partitions[1])) < 2000
    _check_source(source, big_x[7 : 7 + N], big_y[7 : 7 + N])
    # a raw np.memmap with an offset that is not a page multiple
    raw = np.memmap(tmp_path / "raw.bin", dtype=np.float64, mode="w+", shape=(N + 3, 3))
    raw[:] = np.arange((N + 3) * 3).reshape(N + 3, 3)
    raw.flush()
    offset = np.memmap(
        tmp_path / "raw.bin", dtype=np.float64, mode="r", shape=(N, 3), offset=24
    )
    source = influx.ArraySource(offset, big_y[:N], batch_size=BATCH)
    copy = pickle.loads(pickle.dumps(source.partitions[0]))
    np.testing.assert_array_equal(copy[0][0], np.asarray(raw[1:5]))


def _zarr_array(zarr: Any, path: Path, data: np.ndarray, chunks: tuple) -> Any:
    """A zarr array on disk holding ``data`` (zarr 2 and 3 alike)."""
    array = zarr.open(
        str(path), mode="w", shape=data.shape, chunks=chunks, dtype=data.dtype
    )
    array[...] = data
    return array


def test_zarr_source(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    x, y = arrays()
    zx = _zarr_array(zarr, tmp_path / "x.zarr", x, (5, 3))
    zy = _zarr_array(zarr, tmp_path / "y.zarr", y, (5,))
    source = influx.ArraySource(zx, zy, batch_size=BATCH, partition_size=PARTITION)
    _check_source(source, x, y)
    big = _zarr_array(zarr, tmp_path / "big.zarr", np.zeros((20000, 3)), (1000, 3))
    labels = np.zeros(20000, dtype=np.int64)
    sizes = [
        len(pickle.dumps(p.x))
        for p in influx.ArraySource(big, labels, batch_size=100).partitions
    ]
    assert max(sizes) < 5000  # the data is 480 kB


def test_dask_source() -> None:
    da = pytest.importorskip("dask.array")
    x, y = arrays()
    source = influx.ArraySource(
        da.from_array(x, chunks=(5, 3)),
        da.from_array(y, chunks=6),
        batch_size=BATCH,
        partition_size=PARTITION,
    )
    _check_source(source, x, y)


def test_framework_tensor_is_read_once_to_numpy(backend_name: str) -> None:
    from models import to_backend

    x, y = arrays()
    source = influx.ArraySource(
        to_backend(backend_name, x), y, batch_size=BATCH, partition_size=PARTITION
    )
    _check_source(source, x, y)


def test_factory_source() -> None:
    CALLS.clear()
    source = influx.FactorySource(
        "test_sources:factory", N, scale=2.0, batch_size=BATCH, partition_size=PARTITION
    )
    x, y = arrays()
    _check_source(source, 2 * x, y)
    # the function runs once per process and arguments
    assert CALLS == [N]
    partition = source.partitions[2]
    payload = pickle.dumps(partition)
    assert b"test_sources" in payload and len(payload) < 2000
    np.testing.assert_array_equal(pickle.loads(payload)[0][0], 2 * x[16:20])
    assert CALLS == [N]


def test_default_partition_size_is_a_multiple_of_the_batch() -> None:
    x, y = arrays(10000)
    source = influx.ArraySource(x, y, batch_size=100)
    assert source.partition_size == 4100 and source.num_partitions == 3
    source = influx.ArraySource(x, y, batch_size=5000)
    assert source.partition_size == 5000 and source.num_partitions == 2


def test_reader_numbers_a_partitions_batches_globally(backend_name: str) -> None:
    from models import mlp_weights, wrap_mlp

    model = wrap_mlp(backend_name, mlp_weights((3, 2)))
    x, y = arrays()
    source = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    partition = source.partitions[2]
    assert isinstance(partition, Partition)
    reader = DataReader(partition, "training_data", model.backend, model.parameters)
    assert [index for index, _, _ in reader] == [4, 5]
    assert reader.num_samples == 7 and reader.first_batch == 4
    whole = DataReader(source, "training_data", model.backend, model.parameters)
    assert [index for index, _, _ in whole] == list(range(6))


def test_a_source_is_accepted_where_batches_are(backend_name: str) -> None:
    from models import mlp_weights, to_numpy, wrap_mlp

    model = wrap_mlp(backend_name, mlp_weights((3, 2)))
    x, y = arrays()
    y = np.stack([y, -y], axis=1).astype(np.float64)
    source = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    plain = influx.batches(x, y, batch_size=BATCH)
    a = influx.Influence(model, "direct", 0.1).fit(source).influences(plain, source)
    b = influx.Influence(model, "direct", 0.1).fit(plain).influences(plain, plain)
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=0, atol=1e-12)


def test_bad_arguments(tmp_path: Path) -> None:
    x, y = arrays()
    with pytest.raises(InputError, match="multiple of batch_size=4"):
        influx.ArraySource(x, y, batch_size=4, partition_size=10)
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        influx.ArraySource(x, y, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be a positive int"):
        influx.ArraySource(x, y, batch_size=2.0)
    with pytest.raises(TypeError, match="partition_size must be a positive int"):
        influx.ArraySource(x, y, partition_size=True)
    with pytest.raises(InputError, match="same number of points"):
        influx.ArraySource(x, y[:-1])
    with pytest.raises(InputError, match="empty"):
        influx.ArraySource(x[:0], y[:0])
    with pytest.raises(InputError, match="does not exist"):
        influx.ArraySource(tmp_path / "missing.npy", y)
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(InputError, match=r"not a \.npy file"):
        influx.ArraySource(tmp_path / "text.npy", y)
    with pytest.raises(TypeError, match="x must be a numpy array"):
        influx.ArraySource([[1.0]] * N, y)
    with pytest.raises(InputError, match="scalar"):
        influx.ArraySource(np.float64(1.0), y)
    source = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    with pytest.raises(IndexError, match="out of range"):
        source[6]
    with pytest.raises(TypeError, match="slicing"):
        source[1:2]
    with pytest.raises(IndexError, match="out of range"):
        source.partitions[0][2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must be a string 'module:function'"),
        ("a:b:c", "must be a string 'module:function'"),
        (":function", "must be a string 'module:function'"),
        ("no_such_module_h2:f", "cannot import the module 'no_such_module_h2'"),
        ("test_sources:missing", "has no 'missing'"),
        ("test_sources:N", "is not callable"),
        (42, "must be a string 'module:function'"),
    ],
)
def test_bad_factories(spec: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        influx.FactorySource(spec)
    if isinstance(spec, str):
        with pytest.raises(InputError, match=message):
            resolve_factory(spec, "factory")


def test_factory_must_return_a_pair() -> None:
    with pytest.raises(InputError, match="must return a pair"):
        influx.FactorySource("test_sources:not_a_pair")
    with pytest.raises(InputError, match="returned no points"):
        influx.FactorySource("test_sources:factory", 0)
