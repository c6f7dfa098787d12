"""Resumable results in a zarr store, in this process (``out="path.zarr"``).

References: the same query returned in memory (``out=None``), to 1e-12 in
float64 (the same blocks, so in practice bit-equal). An interruption is
simulated by a chunk computation that raises after ``k`` chunks; the rerun
must write exactly the missing chunks (counted from the ``done`` run numbers)
and end equal to an uninterrupted run. Refused stores are compared byte for
byte (and by mtime) before and after.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from models import mlp_weights, to_numpy, wrap_mlp

import influx
from influx import _distributed_scoring

pytest.importorskip("zarr")

N_TRAIN, N_TEST, BATCH, PARTITION = 23, 5, 4, 8  # partitions 8, 8, 7; last batch 3
REG = 2.0


def _data(seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((N_TRAIN, 3)),
        rng.standard_normal((N_TRAIN, 2)),
        rng.standard_normal((N_TEST, 3)),
        rng.standard_normal((N_TEST, 2)),
    )


def _fitted(backend_name: str, reg: float = REG, method: str = "direct") -> Any:
    x, y, xt, yt = _data()
    model = wrap_mlp(backend_name, mlp_weights((3, 4, 2), seed=1))
    train = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    test = influx.batches(xt, yt, batch_size=2)
    return influx.Influence(model, method, reg).fit(train), train, test


def _snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = Path(root) / name
            found[str(full)] = (full.stat().st_mtime_ns, full.read_bytes())
    return found


def test_store_equals_in_memory_and_reopens(backend_name: str, tmp_path: Path) -> None:
    inf, _train, test = _fitted(backend_name)
    expected = to_numpy(inf.influences(test))
    path = tmp_path / "scores.zarr"
    scores = inf.influences(test, out=path)
    np.testing.assert_allclose(scores[:], expected, rtol=0, atol=1e-12)
    results = influx.open_results(path)
    assert results.num_chunks == 3 and results.chunks_missing == []
    assert results.chunk_size == PARTITION
    assert results.scores.chunks == (N_TEST, PARTITION)
    assert results.fingerprint["test"]["num_points"] == N_TEST
    assert results.written_by(1) == 3
    # the same call again: nothing recomputed, a second run recorded
    calls = []
    original = _distributed_scoring.compute_chunk

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    _distributed_scoring.compute_chunk = counted
    try:
        again = inf.influences(test, out=str(path))
    finally:
        _distributed_scoring.compute_chunk = original
    assert calls == []
    np.testing.assert_array_equal(again[:], scores[:])
    results = influx.open_results(path)
    assert [run["number"] for run in results.runs] == [1, 2]
    assert results.written_by(2) == 0


def test_perturbation_and_by_layer_and_self(backend_name: str, tmp_path: Path) -> None:
    inf, train, test = _fitted(backend_name)
    pert = inf.influences(test, influence_type="perturbation", out=tmp_path / "p.zarr")
    expected = to_numpy(inf.influences(test, influence_type="perturbation"))
    assert pert.shape == (N_TEST, N_TRAIN, 3)
    np.testing.assert_allclose(pert[:], expected, rtol=0, atol=1e-12)
    layered = inf.influences(test, by_layer=True, out=tmp_path / "l.zarr")
    expected = to_numpy(inf.influences(test, by_layer=True))
    np.testing.assert_allclose(layered[:], expected, rtol=0, atol=1e-12)
    own = inf.self_influence(train, out=tmp_path / "s.zarr")
    assert own.shape == (N_TRAIN,)
    expected = to_numpy(inf.self_influence(train))
    np.testing.assert_allclose(own[:], expected, rtol=0, atol=1e-12)


def test_non_source_data_in_groups(backend_name: str, tmp_path: Path) -> None:
    """Any re-iterable input is stored in groups of consecutive batches."""
    inf, _, test = _fitted(backend_name)
    x, y, _, _ = _data()
    data = influx.batches(x, y, batch_size=BATCH)
    expected = to_numpy(inf.influences(test, data))
    scores = inf.influences(test, data, out=tmp_path / "g.zarr")
    np.testing.assert_allclose(scores[:], expected, rtol=0, atol=1e-12)
    assert influx.open_results(tmp_path / "g.zarr").complete


def test_resume_after_interruption(
    backend_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inf, _train, test = _fitted(backend_name)
    expected = to_numpy(inf.influences(test))
    path = tmp_path / "scores.zarr"
    original = _distributed_scoring.compute_chunk
    computed: list[int] = []

    def failing(job: Any, prepared: Any, chunk: Any) -> Any:
        if len(computed) == 2:
            raise KeyboardInterrupt("simulated crash")
        computed.append(chunk.number)
        return original(job, prepared, chunk)

    monkeypatch.setattr(_distributed_scoring, "compute_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        inf.influences(test, out=path)
    partial = influx.open_results(path)
    assert partial.chunks_missing == [2] and partial.chunks_done == 2
    computed.clear()
    monkeypatch.setattr(_distributed_scoring, "compute_chunk", original)

    def recount(job: Any, prepared: Any, chunk: Any) -> Any:
        computed.append(chunk.number)
        return original(job, prepared, chunk)

    monkeypatch.setattr(_distributed_scoring, "compute_chunk", recount)
    scores = inf.influences(test, out=path)
    assert computed == [2]
    results = influx.open_results(path)
    assert results.written_by(1) == 2 and results.written_by(2) == 1
    np.testing.assert_allclose(scores[:], expected, rtol=0, atol=1e-12)


def test_task_skips_a_done_chunk(backend_name: str, tmp_path: Path) -> None:
    """A task rerun after its worker died does not rewrite a finished chunk."""
    inf, train, test = _fitted(backend_name)
    path = tmp_path / "scores.zarr"
    inf.influences(test, out=path)
    results = influx.open_results(path)
    before = _snapshot(path)
    writer = influx._store.ChunkWriter(str(path), 7, PARTITION, 1)
    job = _distributed_scoring.Job(
        token="t", mode="influences", name="x", writer=writer
    )
    partition = train.partitions[1]
    assert _distributed_scoring.run_chunk(partition, job, inf.model) == (1, None)
    assert _snapshot(path) == before
    assert results.chunks_done == 3


def test_other_job_refused_and_untouched(backend_name: str, tmp_path: Path) -> None:
    inf, _train, test = _fitted(backend_name)
    path = tmp_path / "scores.zarr"
    inf.influences(test, out=path)
    before = _snapshot(path)
    other, _, _ = _fitted(backend_name, reg=3.0)
    with pytest.raises(
        influx.InputError, match=r"hessian_regularization.*overwrite=True"
    ):
        other.influences(test, out=path)
    _x, _y, xt, yt = _data(seed=9)
    with pytest.raises(influx.InputError, match="test"):
        inf.influences(influx.batches(xt, yt, batch_size=2), out=path)
    with pytest.raises(influx.InputError, match="influence_type"):
        inf.influences(test, influence_type="perturbation", out=path)
    assert _snapshot(path) == before
    # overwrite: starts over with the other job
    scores = other.influences(test, out=path, overwrite=True)
    np.testing.assert_allclose(
        scores[:], to_numpy(other.influences(test)), rtol=0, atol=1e-12
    )
    results = influx.open_results(path)
    assert [run["number"] for run in results.runs] == [1]
    assert results.written_by(1) == 3
    assert results.fingerprint["hessian_regularization"] == 3.0


def test_non_store_path_refused(backend_name: str, tmp_path: Path) -> None:
    inf, _train, test = _fitted(backend_name)
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"\x00\x01")
    for path in (file, folder):
        before = _snapshot(tmp_path)
        for overwrite in (False, True):
            with pytest.raises(influx.InputError, match="not an influx results store"):
                inf.influences(test, out=path, overwrite=overwrite)
        assert _snapshot(tmp_path) == before
    with pytest.raises(influx.InputError, match="not an influx results store"):
        influx.open_results(folder)
    # an empty directory is used
    empty = tmp_path / "empty"
    empty.mkdir()
    inf.influences(test, out=empty)
    assert influx.open_results(empty).complete


def test_save_load_through_a_file_object(backend_name: str) -> None:
    import io

    inf, train, _test = _fitted(backend_name)
    buffer = io.BytesIO()
    inf.save(buffer)
    loaded = influx.Influence.load(io.BytesIO(buffer.getvalue()), inf.model)
    np.testing.assert_allclose(
        to_numpy(loaded.self_influence(train)),
        to_numpy(inf.self_influence(train)),
        rtol=0,
        atol=1e-12,
    )


def test_unseeded_random_method_warns(backend_name: str, tmp_path: Path) -> None:
    inf, train, test = _fitted(backend_name)
    seeded = influx.Influence(inf.model, "arnoldi", REG, seed=None).fit(train)
    with pytest.warns(RuntimeWarning, match="seed"):
        seeded.influences(test, out=tmp_path / "a.zarr")


def test_large_chunks_split_their_rows(
    backend_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk over CHUNK_BYTES splits along the test axis; results unchanged."""
    monkeypatch.setattr(influx._store, "CHUNK_BYTES", 2 * PARTITION * 8)
    inf, _, test = _fitted(backend_name)
    scores = inf.influences(test, out=tmp_path / "rows.zarr")
    assert scores.chunks == (2, PARTITION)
    np.testing.assert_allclose(
        scores[:], to_numpy(inf.influences(test)), rtol=0, atol=1e-12
    )
