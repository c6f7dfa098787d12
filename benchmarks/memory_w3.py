"""W3: peak memory of up-influences as the training set grows.

100 test points, a small tanh MLP (32-16-4, 596 parameters), and 10k, 30k
and 100k synthetic training points streamed in batches of 1,000: each batch
is generated on demand from its index, so the training set is never in
memory. Direct inversion (the Hessian is ``P x P``), cross-entropy,
``hessian_regularization=1.0`` (random weights).

Two ways to hold the ``[100, N]`` result:

- ``in-memory``: the native result array, which grows as ``400 N`` bytes;
- ``zarr``: ``compute_influences(..., out=zarr_array)`` writes each
  ``[100, 1000]`` block to a chunk on disk as it is computed.

Each (tool, N, mode) runs in a fresh process; the peak is the rise of
resident memory over what the process held before the call (see
``_measure.py``). Run ``python benchmarks/memory_w3.py --out DIR`` (all
sizes and tools) or with ``--worker`` for one measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, write_result

SIZES = (10_000, 30_000, 100_000)
MODES = ("in-memory", "zarr")
TOOLS = ("influx-torch", "influx-jax")
LAYERS = (32, 16, 4)
BATCH = 1000
N_TEST = 100
#: The weights are random, not trained: a larger shift keeps H + lambda I positive
#: definite (W3 measures memory, not the values).
REGULARIZATION = 1.0


class SyntheticStream:
    """Batches ``(x [B, 32] float32, y [B] int64)`` made from their index.

    Indexable and re-iterable, never holding more than one batch: batch
    ``i`` is drawn from ``default_rng((seed, i))`` and labelled by a fixed
    random linear teacher.
    """

    def __init__(self, n: int, seed: int, batch_size: int = BATCH) -> None:
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.teacher = np.random.default_rng(99).standard_normal((LAYERS[0], 4))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        size = min(self.batch_size, self.n - i * self.batch_size)
        rng = np.random.default_rng((self.seed, i))
        x = rng.standard_normal((size, LAYERS[0])).astype(np.float32)
        y = (x @ self.teacher + rng.standard_normal((size, 4))).argmax(axis=1)
        return x, y.astype(np.int64)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _weights() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        (
            (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32),
            (0.1 * rng.standard_normal(o)).astype(np.float32),
        )
        for i, o in itertools.pairwise(LAYERS)
    ]


def _model(tool: str) -> Any:
    from _models import influx_model

    return influx_model(tool.removeprefix("influx-"), _weights(), "float32")[0]


def worker(args: argparse.Namespace) -> None:
    """One measurement: ``tool`` at ``n`` training points in ``mode``."""
    import influx

    model = _model(args.tool)
    train = SyntheticStream(args.n, seed=1)
    test = SyntheticStream(N_TEST, seed=2, batch_size=N_TEST)

    with tempfile.TemporaryDirectory() as scratch:

        def call() -> Any:
            out = None
            if args.mode == "zarr":
                import zarr

                out = zarr.create_array(
                    store=f"{scratch}/influences.zarr",
                    shape=(N_TEST, args.n),
                    chunks=(N_TEST, BATCH),
                    dtype="float32",
                    overwrite=True,
                )
            result = influx.compute_influences(
                model,
                train,
                test_data=test,
                inversion_method="direct",
                hessian_regularization=REGULARIZATION,
                out=out,
            )
            return float(np.asarray(result[:, :10]).sum())

        measurement, _ = measure(call, repeats=1)
    meta = {
        "tool": args.tool,
        "workload": "W3",
        "mode": args.mode,
        "n_train": args.n,
        "num_params": model.num_params,
        "result_mib": N_TEST * args.n * 4 / 2**20,
    }
    write_result(args.out, meta, measurement, None)


def sweep(args: argparse.Namespace) -> None:
    """Every (tool, N, mode), each in a fresh process, one at a time."""
    tools = [t for t in args.tools.split(",") if t in TOOLS]
    for tool in tools:
        for n in SIZES:
            for mode in MODES:
                out = Path(args.out) / tool / f"n{n}-{mode}"
                argv = [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"--tool={tool}",
                    f"--n={n}",
                    f"--mode={mode}",
                    f"--out={out}",
                ]
                subprocess.run(argv, check=False)
                record = json.loads((out / "result.json").read_text())
                print(
                    f"W3 {tool} n={n} {mode}: peak {record.get('peak_mib', 0):.0f} MiB,"
                    f" {record.get('median_s', float('nan')):.2f} s",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--peer-python", action="append", default=[])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--tool", choices=TOOLS)
    parser.add_argument("--n", type=int)
    parser.add_argument("--mode", choices=MODES)
    args = parser.parse_args(argv)
    (worker if args.worker else sweep)(args)


if __name__ == "__main__":
    main()
