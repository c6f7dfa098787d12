"""Distributed fit: ``Influence.fit(source, client=...)`` on 1 and 2 local workers.

``python benchmarks/distributed_fit.py [--points 20000] [--direct-points 5000]
[--repeats 2]`` times the fit of two workloads (torch, float32, one thread per
process) in this process (no client) and on a ``LocalCluster`` of 1 and of 2
worker processes:

- ``kfac`` and ``ekfac`` on a tanh MLP 256-512-128-10 (199k parameters),
  softmax cross-entropy, ``--points`` training points;
- ``direct`` on a tanh MLP 20-64-10 (2k parameters), ``--direct-points``.

The training data is written to ``.npy`` files and read through
``influx.ArraySource`` memory maps (batches of 500, partitions of 2500), so
the workers read their partitions themselves. Each row gives the fit's wall
seconds, the best of ``--repeats`` after one warm-up fit on the first
partition (the workers are started and have imported torch before the
clock starts; the model is sent within each fit), and the largest difference
of the fitted state (direct: the Hessian; K-FAC: factors and eigenvalues) to
the in-process fit, relative to its largest entry. The load average is
printed too: the machine's other work slows the workers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]

BATCH, PARTITION = 500, 2500
WORKLOADS = {
    "kfac": ((256, 512, 128, 10), 1e-3),
    "ekfac": ((256, 512, 128, 10), 1e-3),
    "direct": ((20, 64, 10), 1e-2),
}


def _mlp(sizes: tuple[int, ...], seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    layers: list[Any] = []
    for index, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _data(folder: Path, points: int, width: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(width)
    x = rng.standard_normal((points, width)).astype(np.float32)
    y = rng.integers(0, 10, points)
    np.save(folder / f"x{width}.npy", x)
    np.save(folder / f"y{width}.npy", y)
    return folder / f"x{width}.npy", folder / f"y{width}.npy"


def _state(inf: Any) -> list[np.ndarray]:
    state = inf._fitted.state
    if inf.method == "direct":
        return [np.asarray(state.matrix)]
    found = [np.asarray(v) for v in state.eigenvalues]
    for index in range(len(state.layer_names)):
        found.extend(np.asarray(f) for f in state.factors(index))
    return found


def _difference(found: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
        for a, b in zip(found, reference, strict=True)
    )


def _warm(workers: int) -> Any:
    from distributed import Client, LocalCluster

    paths = os.pathsep.join([str(ROOT / "src"), str(ROOT / "backends")])
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": paths},
    )
    client = Client(cluster)

    def setup() -> None:
        for path in (str(ROOT / "src"), str(ROOT / "backends")):
            if path not in sys.path:
                sys.path.insert(0, path)
        import torch

        import influx  # noqa: F401

        torch.set_num_threads(1)

    client.run(setup)
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--direct-points", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="kfac,ekfac,direct")
    args = parser.parse_args()

    import torch

    import influx

    torch.set_num_threads(1)
    methods = args.methods.split(",")
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        sources, warm, models, references = {}, {}, {}, {}
        for method in methods:
            sizes, reg = WORKLOADS[method]
            points = args.direct_points if method == "direct" else args.points
            px, py = _data(Path(folder), points, sizes[0])
            sources[method] = influx.ArraySource(
                px, py, batch_size=BATCH, partition_size=PARTITION
            )
            warm[method] = influx.ArraySource(
                np.load(px, mmap_mode="r")[:PARTITION],
                np.load(py, mmap_mode="r")[:PARTITION],
                batch_size=BATCH,
            )
            models[method] = influx.twice_differentiable(
                _mlp(sizes, 0), torch.nn.CrossEntropyLoss()
            )
        for method in methods:
            reg = WORKLOADS[method][1]
            influx.Influence(models[method], method, reg).fit(warm[method])
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                inf = influx.Influence(models[method], method, reg)
                inf.fit(sources[method])
                times.append(time.perf_counter() - start)
            references[method] = _state(inf)
            rows.append((method, "in-process", min(times), 0.0))
            print(rows[-1], flush=True)
        for workers in (1, 2):
            client = _warm(workers)
            try:
                for method in methods:
                    reg = WORKLOADS[method][1]
                    influx.Influence(models[method], method, reg).fit(
                        warm[method], client=client
                    )
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        inf = influx.Influence(models[method], method, reg)
                        inf.fit(sources[method], client=client)
                        times.append(time.perf_counter() - start)
                    diff = _difference(_state(inf), references[method])
                    rows.append((method, f"{workers} worker(s)", min(times), diff))
                    print(rows[-1], flush=True)
            finally:
                cluster = client.cluster
                client.close()
                cluster.close()
    params = {
        m: sum(a * b + b for a, b in itertools.pairwise(s))
        for m, (s, _) in WORKLOADS.items()
    }
    print(
        f"\n{args.points} points ({args.direct_points} for direct), batches of "
        f"{BATCH}, partitions of {PARTITION}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'method':8} {'P':>7} {'where':>12} {'fit s':>8} {'rel. diff':>10}")
    for method, where, seconds, diff in rows:
        print(f"{method:8} {params[method]:7d} {where:>12} {seconds:8.2f} {diff:10.1e}")


if __name__ == "__main__":
    main()
