"""Faults of a distributed run, and bad input refused before any work.

- a worker process killed mid-run (SIGKILL by its PID): the run completes,
  equal to the single-process result, every chunk written once (writes are
  logged on the workers by a plugin, reads by the data source);
- the client process killed mid-run (a subprocess with its own cluster):
  running it again computes exactly the chunks that were missing;
- a store of another job, ``influx run`` with a missing factory, a wrong
  backend or an unreachable scheduler: a clear error, quickly, and the
  existing store untouched (bytes and mtimes).

Each fault test starts its own ``LocalCluster`` (processes), as killing a
worker of the shared one would disturb other tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fault_support as fs
import numpy as np
import pytest
from conftest import local_cluster_options
from models import mlp_weights, to_numpy, wrap_mlp

import influx

pytest.importorskip("distributed")
pytest.importorskip("zarr")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAMBDA = 1e-3


def fitted(backend_name: str, regularization: float = LAMBDA) -> influx.Influence:
    """The fault tests' MLP, fitted in this process on the in-memory points."""
    model = wrap_mlp(backend_name, mlp_weights(fs.SIZES))
    inf = influx.Influence(model, "direct", regularization, curvature="ggn")
    return inf.fit(influx.batches(*fs.arrays(), batch_size=fs.BATCH))


def slow_source(log_dir: Path | None, delay: float) -> influx.FactorySource:
    return influx.FactorySource(
        "fault_support:slow_data",
        log_dir=None if log_dir is None else str(log_dir),
        delay=delay,
        batch_size=fs.BATCH,
        partition_size=fs.PARTITION,
    )


def query() -> influx.Batches:
    return influx.batches(*fs.query_arrays(), batch_size=fs.N_TEST)


def reference(backend_name: str) -> np.ndarray:
    """The single-process, in-memory influences ``[N_TEST, N_TRAIN]``."""
    inf = fitted(backend_name)
    train = influx.batches(*fs.arrays(), batch_size=fs.BATCH)
    return to_numpy(inf.influences(query(), train))


def stored_scores(path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r")["scores"][...])


NUM_CHUNKS = -(-fs.N_TRAIN // fs.PARTITION)
#: A cluster of its own per fault test; no dashboard (no port clash warning).
QUIET_CLUSTER = {**local_cluster_options(2), "dashboard_address": ":0"}


# -- a worker killed mid-run ---------------------------------------------------


def _chunk_of(name: str, selection: str) -> int:
    """The chunk a logged write of ``scores`` or ``done`` went to."""
    parts = selection.split(",")
    if name == "done":
        first = parts[0].split(":")[0]
        return int(first)
    start = parts[-1].split(":")[0] if len(parts) > 1 else parts[0].split(":")[0]
    return int(start or 0) // fs.PARTITION


def _in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call()`` in a thread; its result or error lands in the dict."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # re-raised by the test
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _finish(thread: threading.Thread, outcome: dict[str, Any], what: str) -> Any:
    thread.join(120)
    assert not thread.is_alive(), f"the {what} did not finish after a worker died"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _worker_reads(logs: Path) -> int:
    return sum(1 for pid, _, _ in fs.read_log(logs) if pid != os.getpid())


def test_worker_killed_mid_run(backend_name, tmp_path):
    """A worker killed mid-fit, then another one mid-scoring: both complete."""
    from distributed import Client, LocalCluster

    expected = reference(backend_name)
    model = wrap_mlp(backend_name, mlp_weights(fs.SIZES))
    inf = influx.Influence(model, "direct", LAMBDA, curvature="ggn")
    store, logs, fit_logs = (tmp_path / n for n in ("scores.zarr", "logs", "fit"))
    logs.mkdir()
    fit_logs.mkdir()
    source = slow_source(logs, delay=0.05)

    with (
        LocalCluster(**QUIET_CLUSTER) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        client.register_plugin(fs.write_log_plugin(str(logs)))
        client.run(fs.warm_up, backend_name)  # kill mid-work, not mid-import

        # the fit: a worker killed once a few batches are read
        pids = sorted(client.run(os.getpid).values())
        thread, outcome = _in_thread(
            lambda: inf.fit(slow_source(fit_logs, 0.05), client=client)
        )
        fs.wait_until(lambda: _worker_reads(fit_logs) >= 4, 60, "4 batches read")
        assert thread.is_alive()  # killed mid-fit
        os.kill(pids[0], signal.SIGKILL)
        _finish(thread, outcome, "fit")
        # every batch read at least once on the workers (a partition whose
        # result was lost with the worker is read again)
        fit_batches = {b for pid, b, _ in fs.read_log(fit_logs) if pid != os.getpid()}
        assert fit_batches == set(range(-(-fs.N_TRAIN // fs.BATCH)))

        # the scoring: a worker killed once 3 chunks are done
        client.wait_for_workers(2)
        client.run(fs.warm_up, backend_name)
        pids = sorted(client.run(os.getpid).values())
        thread, outcome = _in_thread(
            lambda: inf.influences(query(), source, out=str(store), client=client)
        )
        fs.wait_until(lambda: fs.chunks_done(store) >= 3, 60, "3 chunks done")
        assert thread.is_alive()  # killed mid-scoring
        victim = pids[0]
        done_before = fs.done_runs(store)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        result = _finish(thread, outcome, "scoring")
        survivors = set(client.run(os.getpid).values())
    assert victim not in survivors

    # the run completed, equal to the single-process result
    done = fs.done_runs(store)
    assert done is not None and done.shape == (NUM_CHUNKS,)
    assert np.all(done == done[0]) and done[0] >= 1, done  # this run's number
    np.testing.assert_allclose(stored_scores(store), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_numpy(result[...]), expected, rtol=0, atol=1e-10)

    # every chunk's done entry written once; its data once, but for a task
    # that the killed worker had started (rerun elsewhere, same values)
    writes = fs.read_writes(logs)
    done_writes = [(pid, _chunk_of(n, s)) for pid, n, s, _ in writes if n == "done"]
    data_writes = [(pid, _chunk_of(n, s)) for pid, n, s, _ in writes if n == "scores"]
    per_chunk = {c: [p for p, k in done_writes if k == c] for c in range(NUM_CHUNKS)}
    assert all(len(p) == 1 for p in per_chunk.values()), per_chunk
    for chunk in range(NUM_CHUNKS):
        by_survivors = [p for p, c in data_writes if c == chunk and p != victim]
        by_victim = [p for p, c in data_writes if c == chunk and p == victim]
        assert len(by_survivors) + len(by_victim) >= 1, f"chunk {chunk} not written"
        assert len(by_survivors) <= 1 and len(by_victim) <= 1, (chunk, data_writes)
    twice = [c for c in range(NUM_CHUNKS) if sum(k == c for _, k in data_writes) > 1]
    assert len(twice) <= 1, f"chunks written twice: {twice}"
    # chunks done when the worker died were neither read nor written again
    finished = {int(c) for c in np.flatnonzero(done_before)}
    assert len(finished) >= 3
    late_writes = [
        (n, s) for _, n, s, t in writes if t > killed_at and _chunk_of(n, s) in finished
    ]
    assert not late_writes, late_writes
    per_partition = fs.PARTITION // fs.BATCH
    late_reads = [
        b
        for pid, b, t in fs.read_log(logs)
        if t > killed_at and pid != os.getpid() and b // per_partition in finished
    ]
    assert not late_reads, late_reads


# -- the client process killed mid-run ----------------------------------------


def _client_run(store: Path, logs: Path, backend_name: str, delay: float):
    """Start tests/fault_client_run.py in its own process group."""
    env = dict(os.environ)
    paths = [str(HERE), str(ROOT / "src"), str(ROOT / "backends")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        str(HERE / "fault_client_run.py"),
        str(store),
        str(logs),
        backend_name,
        str(delay),
    ]
    # its own session: the cluster's nannies and workers are in its group,
    # so one killpg stops the client with everything it started
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_client_killed_then_resumed(backend_name, tmp_path):
    if backend_name == "jax" and _has("torch"):
        pytest.skip("one backend is enough here (the slowest test): torch")
    expected = reference(backend_name)
    store = tmp_path / "scores.zarr"
    first_logs, second_logs = tmp_path / "run1", tmp_path / "run2"
    first_logs.mkdir()
    second_logs.mkdir()

    process = _client_run(store, first_logs, backend_name, delay=0.1)
    try:
        fs.wait_until(
            lambda: fs.chunks_done(store) >= 4 or process.poll() is not None,
            90,
            "4 chunks done by the client subprocess",
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == -signal.SIGKILL, output
    # nothing of the killed run writes any more
    time.sleep(0.5)
    after_kill = fs.done_runs(store)
    time.sleep(0.5)
    assert after_kill is not None
    np.testing.assert_array_equal(fs.done_runs(store), after_kill)
    missing = {int(c) for c in np.flatnonzero(after_kill == 0)}
    assert 0 < len(missing) < NUM_CHUNKS, after_kill
    assert set(np.unique(after_kill)) <= {0, 1}

    process = _client_run(store, second_logs, backend_name, delay=0.0)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output

    done = fs.done_runs(store)
    assert done is not None
    # chunks done before the kill kept their run (1); exactly the missing ones
    # were computed by the second run (2)
    assert {int(c) for c in np.flatnonzero(done == 2)} == missing, done
    assert np.all(done[after_kill == 1] == 1)
    assert np.all(done > 0)
    results = influx.open_results(store)
    assert results.chunks_missing == []
    assert [run["number"] for run in results.runs] == [1, 2]
    print(  # shown with pytest -s: the resume counts docs/scaling.md quotes
        f"client killed after {NUM_CHUNKS - len(missing)} of {NUM_CHUNKS} chunks; "
        f"the rerun computed {results.written_by(2)} (the {len(missing)} missing)"
    )
    assert results.written_by(2) == len(missing)
    assert results.written_by(1) == NUM_CHUNKS - len(missing)
    # and only they were read by the second run's workers (once each)
    reads = fs.partition_reads(fs.read_log(second_logs), exclude_pid=process.pid)
    per_partition = fs.PARTITION // fs.BATCH
    last = fs.N_TRAIN - (NUM_CHUNKS - 1) * fs.PARTITION
    expected_reads = {
        c: per_partition if c < NUM_CHUNKS - 1 else -(-last // fs.BATCH)
        for c in missing
    }
    assert reads == expected_reads
    np.testing.assert_allclose(stored_scores(store), expected, rtol=0, atol=1e-10)

    # equal to an uninterrupted run into a store of its own (this process)
    uninterrupted = tmp_path / "uninterrupted.zarr"
    fitted(backend_name).influences(
        query(), slow_source(None, 0.0), out=str(uninterrupted)
    )
    np.testing.assert_allclose(
        stored_scores(store), stored_scores(uninterrupted), rtol=0, atol=1e-10
    )


# -- bad input: refused before any work, the store untouched ------------------


def test_store_of_another_job_refused(backend_name, dask_client, tmp_path):
    store, logs = tmp_path / "scores.zarr", tmp_path / "logs"
    logs.mkdir()
    fitted(backend_name).influences(query(), slow_source(None, 0.0), out=str(store))
    before = fs.file_states(store)
    other = fitted(backend_name, regularization=1e-2)
    start = time.monotonic()
    with pytest.raises(influx.InputError, match="overwrite"):
        other.influences(
            query(), slow_source(logs, 0.0), out=str(store), client=dask_client
        )
    assert time.monotonic() - start < 5  # refused up front: nothing computed
    assert fs.file_states(store) == before
    worker_reads = [e for e in fs.read_log(logs) if e[0] != os.getpid()]
    assert worker_reads == []


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _job_file(tmp_path: Path, backend: str, factory: str, cluster: str = "") -> Path:
    job = tmp_path / "job.toml"
    job.write_text(
        f'backend = "{backend}"\n'
        f'factory = "{factory}"\n'
        f"python_path = [{str(HERE)!r}]\n"
        "[influence]\n"
        'method = "direct"\n'
        'curvature = "ggn"\n'
        f"hessian_regularization = {LAMBDA}\n"
        "[data]\n"
        f"batch_size = {fs.BATCH}\n"
        f"partition_size = {fs.PARTITION}\n"
        "[output]\n"
        'scores = "scores.zarr"\n' + cluster
    )
    return job


@pytest.fixture
def job_store(backend_name, tmp_path):
    """A finished job's store at ``tmp_path/scores.zarr``, and its file states."""
    from influx.cli import main

    job = _job_file(tmp_path, backend_name, f"fault_support:job_{backend_name}")
    assert main(["run", "--no-progress", str(job)]) == 0
    store = tmp_path / "scores.zarr"
    return store, fs.file_states(store)


def _run_fails(job: Path, capsys, *words: str) -> str:
    from influx.cli import main

    start = time.monotonic()
    status = main(["run", "--no-progress", str(job)])
    elapsed = time.monotonic() - start
    message = capsys.readouterr().err
    assert status == 2, message
    assert message.startswith("influx run: error:"), message
    assert "Traceback" not in message
    for word in words:
        assert word in message, message
    return f"{elapsed:.1f}"


def test_job_missing_factory(backend_name, tmp_path, job_store, capsys):
    store, before = job_store
    job = _job_file(tmp_path, backend_name, "fault_support:no_such_factory")
    _run_fails(job, capsys, "no_such_factory")
    job = _job_file(tmp_path, backend_name, "no_such_module:build")
    _run_fails(job, capsys, "no_such_module")
    assert fs.file_states(store) == before


def test_job_wrong_backend(backend_name, tmp_path, job_store, capsys):
    store, before = job_store
    other = "jax" if backend_name == "torch" else "torch"
    if not _has(other):
        pytest.skip(f"needs {other} installed to name it as the wrong backend")
    job = _job_file(tmp_path, other, f"fault_support:job_{backend_name}")
    _run_fails(job, capsys, other, backend_name)
    assert fs.file_states(store) == before


def test_job_unreachable_scheduler(backend_name, tmp_path, job_store, capsys):
    store, before = job_store
    address = f"tcp://127.0.0.1:{_closed_port()}"
    # the scores are done; a self-influence store still to compute needs the
    # cluster (a job with nothing left to compute connects to none)
    extra = f'self_influence = "self.zarr"\n[cluster]\nscheduler = "{address}"\n'
    job = _job_file(
        tmp_path,
        backend_name,
        f"fault_support:job_{backend_name}",
        extra + "timeout = 2\n",
    )
    start = time.monotonic()
    _run_fails(job, capsys, address)
    assert time.monotonic() - start < 20
    assert fs.file_states(store) == before
    assert not (tmp_path / "self.zarr").exists()
