"""Distributed scoring: 1 against 2 dask workers, and the single-process baseline.

Scores ``N`` training points (default 100,000) against ``N_test`` test points
(default 100) with an MLP of about 43k parameters (``32 -> 256 -> 128 -> 10``,
tanh, cross-entropy), the training data in memory-mapped ``.npy`` files read
by the workers themselves (:class:`influx.ArraySource`). For each worker count
``W`` it starts ``LocalCluster(n_workers=W, threads_per_worker=1)``, pins every
worker to one thread (torch, BLAS, XLA), warms the workers up (imports, one
small task), then times separately:

- ``fit``: ``Influence(model, method, lam).fit(train, client=client)``;
- ``factors``: ``inf.factors(test)`` (on the client, serial);
- ``scoring``: ``inf.influences(test, train, out=<zarr>, client=client)``
  minus its factors (the call computes them again), i.e. the broadcast of the
  factors, the partition tasks and their writes.

The baseline is the same work in this process (one thread) on the in-memory
arrays, with no client; the distributed scores are compared with it (max abs
difference). Results go to ``benchmarks/results/distributed/<stamp>.json``
and a table is printed.

Run it on a quiet machine, lowered in priority::

    nice -n 10 python benchmarks/distributed.py                # full size
    nice -n 10 python benchmarks/distributed.py --repeats 3
    python benchmarks/distributed.py --n-train 5000 --repeats 1  # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ in ("__main__", "__mp_main__"):
    # run as a script, this file's folder comes first on the path, and this
    # file would shadow the dask.distributed package
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed"
CACHE = ROOT / "benchmarks" / ".cache" / "distributed"

#: One thread per process: the worker count is then the core count used.
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def pin_threads() -> int:
    """One thread for torch (and BLAS through the environment) here; the pid."""
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    if "torch" in sys.modules or _importable("torch"):
        import torch

        torch.set_num_threads(1)
        if torch.get_num_interop_threads() != 1:
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already used: it stays as it is
                pass
    return os.getpid()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def layer_sizes(dim: int, hidden: list[int], classes: int) -> list[int]:
    return [dim, *hidden, classes]


def make_weights(sizes: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
        for i, o in itertools.pairwise(sizes)
    ]


def make_model(backend: str, weights: list[Any], dtype: str) -> Any:
    """The tanh MLP of ``weights`` with cross-entropy, wrapped for ``backend``."""
    import influx

    if backend == "torch":
        import torch

        layers: list[Any] = []
        for index, (w, b) in enumerate(weights):
            linear = torch.nn.Linear(
                w.shape[1], w.shape[0], dtype=getattr(torch, dtype)
            )
            with torch.no_grad():
                linear.weight.copy_(torch.as_tensor(w))
                linear.bias.copy_(torch.as_tensor(b))
            layers.append(linear)
            if index < len(weights) - 1:
                layers.append(torch.nn.Tanh())
        return influx.twice_differentiable(
            torch.nn.Sequential(*layers), torch.nn.CrossEntropyLoss()
        )
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    params = [
        {"w": jnp.asarray(w, dtype=dtype), "b": jnp.asarray(b, dtype=dtype)}
        for w, b in weights
    ]

    def apply_fn(p: Any, x: Any) -> Any:
        h = x
        for index, layer in enumerate(p):
            h = h @ layer["w"].T + layer["b"]
            if index < len(p) - 1:
                h = jnp.tanh(h)
        return h

    def loss(logits: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return influx.twice_differentiable(apply_fn, loss, params=params)


def make_data(
    n_train: int, n_test: int, dim: int, classes: int, dtype: str, seed: int
) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Training ``.npy`` files (made once, cached) and the test arrays.

    Labels come from a fixed random linear teacher, so the problem has
    structure; the model is not trained (timing does not depend on it).
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{n_train}x{dim}_{classes}_{dtype}_{seed}"
    x_path, y_path = CACHE / f"x_{tag}.npy", CACHE / f"y_{tag}.npy"
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((dim, classes))
    if not (x_path.exists() and y_path.exists()):
        x = np.lib.format.open_memmap(
            x_path, mode="w+", dtype=dtype, shape=(n_train, dim)
        )
        y = np.lib.format.open_memmap(
            y_path, mode="w+", dtype=np.int64, shape=(n_train,)
        )
        step = 10_000
        for start in range(0, n_train, step):
            stop = min(start + step, n_train)
            block = rng.standard_normal((stop - start, dim))
            x[start:stop] = block
            y[start:stop] = np.argmax(block @ teacher, axis=1)
        x.flush()
        y.flush()
        del x, y
    test_rng = np.random.default_rng(seed + 1)
    x_test = test_rng.standard_normal((n_test, dim)).astype(dtype)
    y_test = np.argmax(x_test @ teacher, axis=1).astype(np.int64)
    return x_path, y_path, x_test, y_test


def _timed(call: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array[...] if hasattr(array, "chunks") else array)


def run_baseline(args: argparse.Namespace, paths: Any) -> tuple[dict, np.ndarray]:
    """Fit, factors and scoring in this process, in memory, one thread."""
    import influx

    pin_threads()
    x_path, y_path, x_test, y_test = paths
    x, y = np.load(x_path), np.load(y_path)  # into memory
    train = influx.batches(x, y, batch_size=args.batch_size)
    test = influx.batches(x_test, y_test, batch_size=args.n_test)
    model = make_model(args.backend, args.weights, args.dtype)
    inf = influx.Influence(model, args.method, args.lam, **args.options)
    cpu = [time.process_time()]
    _, fit_s = _timed(lambda: inf.fit(train))
    cpu.append(time.process_time())
    _, factors_s = _timed(lambda: inf.factors(test))
    cpu.append(time.process_time())
    scores, total_s = _timed(lambda: inf.influences(test, train))
    cpu.append(time.process_time())
    scores = _to_numpy(scores)
    times = {
        "fit_s": fit_s,
        "factors_s": factors_s,
        "influences_s": total_s,
        "scoring_s": total_s - factors_s,
        "cpu_fit_s": cpu[1] - cpu[0],
        "cpu_factors_s": cpu[2] - cpu[1],
        "cpu_scoring_s": (cpu[3] - cpu[2]) - (cpu[2] - cpu[1]),
    }
    return times, scores


def _worker_setup(backend: str, dtype: str) -> int:
    """Run on every worker: one thread, the framework imported, x64 if asked."""
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    else:
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
    import influx  # noqa: F401

    return os.getpid()


def _noop(value: Any = None) -> None:
    return None


def _nbytes(value: Any) -> int:
    return int(value.nbytes)


def _time_write(block: tuple[int, int], repeats: int = 5) -> float:
    """Median seconds to write ``block`` into a zarr array, then a done entry."""
    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        group = zarr.open_group(str(Path(tmp) / "t.zarr"), mode="w")
        rows, width = block
        scores = group.create_array(
            "scores", shape=(rows, width * repeats), chunks=(rows, width), dtype="f8"
        )
        done = group.create_array("done", shape=(repeats,), chunks=(1,), dtype="i4")
        values = np.random.default_rng(0).standard_normal(block)
        times = []
        for index in range(repeats):
            start = time.perf_counter()
            scores[:, index * width : (index + 1) * width] = values
            done[index] = 1
            times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def calibrate(
    client: Any, workers: int, block: tuple[int, int] = (100, 4096), state_mib=8.0
) -> dict:
    """Dask's overheads on this cluster, the constants of the cost model.

    ``task_s``: wall time per no-op task when ``200 * workers`` are submitted
    at once (scheduling, the round trip; a worker runs them one after the
    other); ``broadcast_s_per_mib``: sending one array to every worker
    (``scatter(broadcast=True)``), per MiB; ``reduce_add_s_per_mib``: one
    level of a tree sum of arrays of ``state_mib`` (a transfer and an add on a
    worker), per MiB; ``write_s``: writing one ``block`` of float64 scores
    and a done marker into a local zarr store (on a worker).
    """
    from distributed import wait

    from influx._executor import tree_add

    count = 200 * workers
    client.gather(client.map(_noop, range(workers * 4), pure=False))  # warm
    start = time.perf_counter()
    wait(client.map(_noop, range(count), pure=False))
    task_s = (time.perf_counter() - start) * workers / count
    array = np.ones(int(state_mib * 2**20 / 8))
    broadcasts, reductions = [], []
    for _ in range(3):
        start = time.perf_counter()
        scattered = client.scatter(array, broadcast=True, hash=False)
        client.submit(_nbytes, scattered, pure=False).result()
        broadcasts.append(time.perf_counter() - start)
        # two leaves (on two workers when there are two), added on a worker
        leaves = [client.submit(np.ones, array.shape, pure=False) for _ in range(2)]
        wait(leaves)
        start = time.perf_counter()
        client.submit(tree_add, leaves[0], leaves[1], pure=False).result()
        reductions.append(time.perf_counter() - start)
        del scattered, leaves
    broadcast_s = statistics.median(broadcasts)
    reduce_s = statistics.median(reductions)
    write_s = client.submit(_time_write, block, pure=False).result()
    return {
        "task_s": task_s,
        "write_s": write_s,
        "broadcast_s_per_mib": broadcast_s / state_mib,
        "reduce_add_s_per_mib": reduce_s / state_mib,
    }


def run_distributed(
    args: argparse.Namespace, paths: Any, workers: int, store: Path
) -> tuple[dict, np.ndarray]:
    """Fit, factors and scoring with ``workers`` worker processes."""
    from distributed import Client, LocalCluster

    import influx
    from influx._job_cluster import without_malloc_trim

    pin_threads()
    x_path, y_path, x_test, y_test = paths
    env = dict(THREAD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "backends"), os.environ.get("PYTHONPATH", "")]
    )
    if args.dtype == "float64":
        env["JAX_ENABLE_X64"] = "1"
    cluster_options = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "silence_logs": 40,
        "env": env,
    }
    # influx run's setting (glibc's adaptive mmap threshold kept in the
    # workers); --dask-malloc-trim measures dask's default instead
    malloc = (
        contextlib.nullcontext() if args.dask_malloc_trim else without_malloc_trim()
    )
    with malloc, LocalCluster(**cluster_options) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(_worker_setup, args.backend, args.dtype)
        overheads = calibrate(client, workers, (args.n_test, args.partition_size))
        train = influx.ArraySource(
            str(x_path),
            str(y_path),
            batch_size=args.batch_size,
            partition_size=args.partition_size,
        )
        test = influx.batches(x_test, y_test, batch_size=args.n_test)
        model = make_model(args.backend, args.weights, args.dtype)
        inf = influx.Influence(model, args.method, args.lam, **args.options)
        cpu = [_cpu(client)]
        if _fit_takes_client():
            _, fit_s = _timed(lambda: inf.fit(train, client=client))
        else:  # a checkout without the distributed fit: fit here
            _, fit_s = _timed(lambda: inf.fit(train))
        cpu.append(_cpu(client))
        _, factors_s = _timed(lambda: inf.factors(test))
        if store.exists():
            shutil.rmtree(store)
        cpu.append(_cpu(client))
        scores, total_s = _timed(
            lambda: inf.influences(test, train, out=str(store), client=client)
        )
        cpu.append(_cpu(client))
        scores = _to_numpy(scores)
    times = {
        "fit_s": fit_s,
        "factors_s": factors_s,
        "influences_s": total_s,
        "scoring_s": total_s - factors_s,
        "partitions": train.num_partitions,
        "overheads": overheads,
        # CPU seconds of each process (the client, then the workers) per stage:
        # what the run costs whatever else the machine runs
        "cpu_fit_s": _cpu_delta(cpu[0], cpu[1]),
        "cpu_factors_s": _cpu_delta(cpu[1], cpu[2]),
        "cpu_scoring_s": _cpu_delta(cpu[2], cpu[3]),
    }
    return times, scores


def _cpu(client: Any) -> dict[str, float]:
    """CPU seconds used so far by this process and by each worker process."""
    used = {"client": time.process_time()}
    used.update(client.run(time.process_time))
    return used


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after if key in before}


# -- the cost model (docs/scaling.md) ------------------------------------------


def makespan(sizes: list[int], workers: int) -> int:
    """Points of the busiest worker when free workers take partitions in order."""
    loads = [0] * workers
    for size in sizes:
        loads[loads.index(min(loads))] += size
    return max(loads)


def kfac_state_bytes(sizes: list[int], method: str, itemsize: int = 8) -> int:
    """Bytes of K-FAC's summed factors (and EK-FAC's corrections) of an MLP."""
    total = 0
    for d_in, d_out in itertools.pairwise(sizes):
        total += (d_in + 1) ** 2 + d_out**2
        if method == "ekfac":
            total += d_out * (d_in + 1)
    return total * itemsize


def eigh_seconds(sizes: list[int], repeats: int = 3) -> float:
    """Time of the client's eigendecompositions of the layer factors (K-FAC)."""
    rng = np.random.default_rng(0)
    matrices = []
    for d_in, d_out in itertools.pairwise(sizes):
        for d in (d_in + 1, d_out):
            a = rng.standard_normal((d, d))
            matrices.append(a @ a.T)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for matrix in matrices:
            np.linalg.eigh(matrix)
        times.append(time.perf_counter() - start)
    return min(times)


def model_constants(result: dict, basis: str = "wall") -> dict:
    """The cost model's constants from a benchmark result (see docs/scaling.md).

    Per-point costs from the single-process baseline (its wall times, or with
    ``basis="cpu"`` its CPU seconds: what a process costs with a core of its
    own), the client's serial fit step from timing the eigendecompositions,
    dask's overheads from the 2-worker (else 1-worker) calibration.
    """
    config, summary = result["config"], result["summary"]
    base = dict(summary["baseline"])
    if basis == "cpu":
        base["fit_s"] = base["cpu_path_fit_s"]
        base["scoring_s"] = base["cpu_path_scoring_s"]
    elif basis == "worker":  # per-point costs as a dask worker pays them
        base["fit_s"] = summary["1"]["cpu_path_fit_s"]
        base["scoring_s"] = summary["1"]["cpu_path_scoring_s"]
    n, sizes, method = config["n_train"], config["layer_sizes"], config["method"]
    fit_client = result.get("fit_client_s", 0.0)
    calibrations = result["workers"].get("2") or result["workers"]["1"]
    overheads = {
        key: statistics.median(run["overheads"][key] for run in calibrations)
        for key in calibrations[0]["overheads"]
    }
    itemsize = 8 if config["dtype"] == "float64" else 4
    return {
        "n_train": n,
        "n_test": config["n_test"],
        "partition_size": config["partition_size"],
        "num_params": config["num_params"],
        "c_fit": (base["fit_s"] - fit_client) / n,
        "fit_client_s": fit_client,
        "c_score": base["scoring_s"] / n,
        "factors_s": base["factors_s"],
        "passes": 2 if method == "ekfac" else 1,
        "state_bytes": kfac_state_bytes(sizes, method, itemsize),
        "factor_bytes": config["n_test"] * config["num_params"] * itemsize,
        **overheads,
    }


def predict(constants: dict, workers: int) -> dict:
    """Predicted fit, factors and scoring seconds on ``workers`` workers."""
    n, m = constants["n_train"], constants["partition_size"]
    sizes = [min(m, n - start) for start in range(0, n, m)]
    load = makespan(sizes, workers)
    levels = math.ceil(math.log2(workers)) if workers > 1 else 0
    mib = 2.0**20
    per_task = len(sizes) / workers * constants["task_s"]
    state = constants["state_bytes"] / mib
    fit = (
        constants["fit_client_s"]
        + constants["c_fit"] * load
        + constants["passes"] * per_task
        + constants["passes"]
        * (
            levels * (constants["task_s"] + state * constants["reduce_add_s_per_mib"])
            + state * constants["broadcast_s_per_mib"] * (1 + levels)
        )
    )
    factors_bcast = (
        constants["factor_bytes"]
        / mib
        * constants["broadcast_s_per_mib"]
        * (1 + levels)
    )
    scoring = (
        factors_bcast
        + constants["c_score"] * load
        + len(sizes) / workers * (constants["task_s"] + constants["write_s"])
    )
    return {
        "fit_s": fit,
        "factors_s": constants["factors_s"],
        "scoring_s": scoring,
        "busiest_points": load,
    }


def scaled(constants: dict, **changes: Any) -> dict:
    """The constants of another problem: ``num_params``, ``n_train`` and the
    others given; per-point costs scale with the parameters, the factors'
    bytes with ``n_test * num_params``."""
    new = dict(constants)
    ratio = changes.get("num_params", new["num_params"]) / new["num_params"]
    new["c_fit"] *= ratio
    new["c_score"] *= ratio
    new["factors_s"] *= ratio
    new["factor_bytes"] *= ratio
    new.update(changes)
    return new


def prediction_table(
    result: dict,
    workers: tuple[int, ...] = (1, 2, 8, 64),
    constants_override: dict | None = None,
    basis: str = "wall",
) -> str:
    """Markdown: measured / model seconds per stage, and the extrapolation.

    ``basis="cpu"`` compares the critical path in CPU seconds (the client's
    plus the busiest worker's) instead of wall times; ``"worker"`` too, with
    the per-point costs of the 1-worker run instead of the baseline's.
    """
    constants = constants_override or model_constants(result, basis)
    summary = result["summary"]
    if basis in ("cpu", "worker"):
        summary = {
            key: {
                **value,
                "fit_s": value["cpu_path_fit_s"],
                "scoring_s": value["cpu_path_scoring_s"],
            }
            for key, value in summary.items()
            if isinstance(value, dict) and "cpu_path_fit_s" in value
        }
    lines = [
        "| W | fit s | factors s | scoring s | total s | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = ("fit_s", "factors_s", "scoring_s")

    def total(times: dict) -> float:
        return sum(times[key] for key in keys)

    one = total(predict(constants, 1))
    for count in workers:
        model = predict(constants, count)
        cells = [f"{model[key]:.1f}" for key in keys]
        cells += [f"{total(model):.1f}", f"{one / total(model):.2f}"]
        measured = summary.get(str(count))
        if measured:
            seen = [f"{measured[key]:.1f}" for key in keys]
            seen += [
                f"{total(measured):.1f}",
                f"{total(summary['1']) / total(measured):.2f}",
            ]
            cells = [f"{a} / {b}" for a, b in zip(seen, cells, strict=True)]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The bigger problem the model extrapolates to: an MLP 784-1024-1024-10
#: (1.86M parameters) on 1M training points, 100 test points.
BIG_SIZES = [784, 1024, 1024, 10]


def report(result: dict) -> str:
    """The constants, the measured-against-model table and the extrapolation.

    The extrapolations take the per-point costs of the 1-worker run.
    """
    constants = model_constants(result, "worker")
    config = result["config"]
    big_params = sum((i + 1) * o for i, o in itertools.pairwise(BIG_SIZES))
    big = scaled(
        constants,
        num_params=big_params,
        n_train=1_000_000,
        partition_size=4096,
        state_bytes=kfac_state_bytes(BIG_SIZES, config["method"]),
        fit_client_s=constants["fit_client_s"] * 60,
    )
    small_partitions = dict(constants, partition_size=512)
    shown = {
        key: f"{value:.3g}" if isinstance(value, float) else value
        for key, value in constants.items()
    }
    return "\n\n".join(
        [
            "constants: " + json.dumps(shown),
            "wall times, measured / model:\n" + prediction_table(result),
            "CPU critical path (client + busiest worker), measured / model:\n"
            + (
                prediction_table(result, basis="cpu")
                if "cpu_path_fit_s" in result["summary"].get("baseline", {})
                else "(not in this result)"
            ),
            "CPU critical path, the per-point costs from the 1-worker run "
            "(checked at 2 workers):\n" + prediction_table(result, basis="worker"),
            "partition_size 512:\n"
            + prediction_table(
                {**result, "summary": {}}, constants_override=small_partitions
            ),
            f"MLP {BIG_SIZES} ({big_params:,} parameters), N = 1,000,000:\n"
            + prediction_table({**result, "summary": {}}, constants_override=big),
        ]
    )


def _fit_takes_client() -> bool:
    import inspect

    import influx

    return "client" in inspect.signature(influx.Influence.fit).parameters


def _best(runs: list[dict], key: str) -> float:
    """The best of the repeats (the least disturbed by other work)."""
    return float(min(run[key] for run in runs))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax"], default="torch")
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", default="256,128")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--method", default="ekfac")
    parser.add_argument("--lam", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--partition-size", type=int, default=4096)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--repeats", type=int, default=1, help="the summary keeps the best"
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--dask-malloc-trim",
        action="store_true",
        help="start workers with dask's MALLOC_TRIM_THRESHOLD_ (its default; "
        "influx run starts them without it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--predict",
        metavar="RESULT_JSON",
        help="print the cost model's table for a saved result and exit",
    )
    args = parser.parse_args(argv)
    if args.predict:
        result = json.loads(Path(args.predict).read_text())
        print(report(result))
        return result
    args.options = {}
    sizes = layer_sizes(
        args.dim, [int(h) for h in args.hidden.split(",")], args.classes
    )
    args.weights = make_weights(sizes, args.seed)
    num_params = sum(w.size + b.size for w, b in args.weights)
    paths = make_data(
        args.n_train, args.n_test, args.dim, args.classes, args.dtype, args.seed
    )
    worker_counts = [int(w) for w in args.workers.split(",")]

    print(
        f"{args.backend} {args.method} MLP {sizes} P={num_params:,} "
        f"N={args.n_train:,} N_test={args.n_test} {args.dtype} "
        f"batch {args.batch_size} partition {args.partition_size}",
        flush=True,
    )
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "config": {
            "backend": args.backend,
            "method": args.method,
            "hessian_regularization": args.lam,
            "layer_sizes": sizes,
            "num_params": num_params,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "partition_size": args.partition_size,
            "repeats": args.repeats,
            "distributed_fit": _fit_takes_client(),
            "dask_malloc_trim": args.dask_malloc_trim,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
        },
        "baseline": [],
        "workers": {},
    }
    reference = None
    result["workers"] = {str(w): [] for w in worker_counts}
    with tempfile.TemporaryDirectory(prefix="influx-bench-") as tmp:
        # repeats outermost: each repeat sees the machine in about one state
        for _ in range(args.repeats):
            if not args.no_baseline:
                times, reference = run_baseline(args, paths)
                result["baseline"].append(times)
                print("baseline (1 process, in memory):", _fmt(times), flush=True)
            for workers in worker_counts:
                times, scores = run_distributed(
                    args, paths, workers, Path(tmp) / "scores.zarr"
                )
                if reference is not None:
                    times["max_abs_diff"] = float(np.max(np.abs(scores - reference)))
                    times["max_abs"] = float(np.max(np.abs(reference)))
                times["loadavg"] = os.getloadavg()
                result["workers"][str(workers)].append(times)
                print(f"{workers} worker(s):", _fmt(times), flush=True)
    result["machine"]["loadavg_after"] = os.getloadavg()
    if args.method in ("kfac", "ekfac"):
        result["fit_client_s"] = eigh_seconds(sizes)
    summary = _summary(result, worker_counts)
    result["summary"] = summary
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"{stamp}_{args.backend}_{args.n_train}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    if result["baseline"] and "1" in result["workers"]:
        print(report(result))
    return result


def _summary(result: dict, worker_counts: list[int]) -> dict:
    summary: dict[str, Any] = {}
    keys = ("fit_s", "factors_s", "scoring_s", "influences_s")
    if result["baseline"]:
        summary["baseline"] = {k: _best(result["baseline"], k) for k in keys}
        for stage in ("fit", "scoring"):
            summary["baseline"][f"cpu_path_{stage}_s"] = _best(
                result["baseline"], f"cpu_{stage}_s"
            )
    for workers in worker_counts:
        runs = result["workers"][str(workers)]
        summary[str(workers)] = {k: _best(runs, k) for k in keys}
        if "max_abs_diff" in runs[0]:
            summary[str(workers)]["max_abs_diff"] = max(r["max_abs_diff"] for r in runs)
        for stage in ("fit", "scoring"):
            # the busiest worker's CPU seconds plus the client's: the wall
            # time the stage would take with a core per process
            # (scoring: less the factors, which influences() computes again)
            paths = [
                run[f"cpu_{stage}_s"]["client"]
                - (run["cpu_factors_s"]["client"] if stage == "scoring" else 0.0)
                + max(v for k, v in run[f"cpu_{stage}_s"].items() if k != "client")
                for run in runs
            ]
            summary[str(workers)][f"cpu_path_{stage}_s"] = min(paths)
    if "1" in summary and "2" in summary:
        one, two = summary["1"], summary["2"]
        summary["speedup_2_vs_1"] = {
            "scoring": one["scoring_s"] / two["scoring_s"],
            "fit": one["fit_s"] / two["fit_s"],
            "fit_plus_scoring": (one["fit_s"] + one["scoring_s"])
            / (two["fit_s"] + two["scoring_s"]),
            "scoring_cpu_path": one["cpu_path_scoring_s"] / two["cpu_path_scoring_s"],
            "fit_cpu_path": one["cpu_path_fit_s"] / two["cpu_path_fit_s"],
        }
    return summary


def _fmt(times: dict) -> str:
    parts = [
        f"{key[:-2]} {value:.2f} s"
        for key, value in times.items()
        if key.endswith("_s") and isinstance(value, float)
    ]
    if "max_abs_diff" in times:
        parts.append(f"max |diff| {times['max_abs_diff']:.1e}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "backends")]
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    main()
