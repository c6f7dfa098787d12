"""Scoring with and without per-sample gradients (issue 9, item 6).

``python benchmarks/layer_scoring.py [--backend torch|jax] [--n-train 2000]``

Up-weighting scores ``factors @ grads.T`` of ``N`` training points for ``K``
influence factors on an MLP 64-1024-1024-10 (P = 1,127,410, float32, batches
of 500), through ``influx.compute_influences_up``:

- ``flat``: the model with its layer structure hidden, so the scores come from
  per-sample gradients ``[B, P]`` (the path before issue 9);
- ``layers``: the adapter's layer structure, scored from each layer's inputs
  and output gradients (``influx._scoring.LayerScorer``): never ``[B, P]``.

Each variant runs in its own process (one cold call, then warm repeats), so
that its peak resident memory (the rise over the memory held before the first
call) is its own. The factors are random: scoring does not depend on where
they come from. The two results are compared (max relative difference).
Threads: ``--threads`` (default 1, torch and XLA alike). The load average is
printed, as the machine may be shared.

Measured on the 2-core development machine (load average about 5, shared):
torch flat 46.5 s and +8,223 MiB, layers 2.8 s cold, 1.4 s warm and +414 MiB;
JAX flat 40.9 s and +6,659 MiB, layers 4.4 s cold, 1.3 s warm and +424 MiB;
results equal to 1.4e-6 (float32). The flat runs are single samples (slower
than 30 s, so not repeated).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = (64, 1024, 1024, 10)


def _weights(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32),
            (0.1 * rng.standard_normal(o)).astype(np.float32),
        )
        for i, o in itertools.pairwise(SIZES)
    ]


def _model(backend: str) -> Any:
    import influx

    layers = _weights()
    if backend == "torch":
        import torch

        modules: list[Any] = []
        for index, (w, b) in enumerate(layers):
            linear = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                linear.weight.copy_(torch.as_tensor(w))
                linear.bias.copy_(torch.as_tensor(b))
            modules.append(linear)
            if index < len(layers) - 1:
                modules.append(torch.nn.ReLU())
        return influx.twice_differentiable(
            torch.nn.Sequential(*modules), torch.nn.CrossEntropyLoss()
        )
    import jax
    import jax.numpy as jnp

    params = [{"w": jnp.asarray(w), "b": jnp.asarray(b)} for w, b in layers]

    def apply_fn(p: Any, x: Any) -> Any:
        h = x
        for index, layer in enumerate(p):
            h = h @ layer["w"].T + layer["b"]
            if index < len(p) - 1:
                h = jax.nn.relu(h)
        return h

    def loss(logits: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return influx.twice_differentiable(apply_fn, loss, params=params)


class _FlatOnly:
    """The wrapped model with its layer structure hidden (the flat path)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        if name in ("layers", "layer_batch", "find_layers"):
            raise AttributeError(name)
        return getattr(self._model, name)


def child(args: argparse.Namespace) -> None:
    """Measure one variant; print its record as JSON on the last line."""
    from _measure import measure

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    import influx

    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.n_train, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], args.n_train)
    data = influx.batches(x, y, batch_size=args.batch_size)
    model = _model(args.backend)
    factors = rng.standard_normal((args.n_test, model.num_params)).astype(np.float32)
    factors = model.backend.asarray(factors, like=model.parameters)
    scored = model if args.mode == "layers" else _FlatOnly(model)

    def call() -> Any:
        result = influx.compute_influences_up(scored, data, factors)
        return model.backend.to_numpy(result)

    measurement, result = measure(call, repeats=args.repeats)
    np.save(args.out / f"{args.backend}-{args.mode}.npy", result)
    record = {"backend": args.backend, "mode": args.mode, "P": model.num_params}
    record.update(measurement)
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "jax"])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="flat,layers")
    parser.add_argument("--out", type=Path, default=Path("/tmp/influx-layer-scoring"))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode is not None:
        child(args)
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.threads == 1:
        flags = env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        env["XLA_FLAGS"] = flags.strip()
    print(
        f"{args.backend}: MLP {'-'.join(map(str, SIZES))}, N={args.n_train}, "
        f"K={args.n_test}, batches of {args.batch_size}, float32, "
        f"{args.threads} thread(s); load average {os.getloadavg()[0]:.1f}"
    )
    records = {}
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--mode", mode]
        for name in ("backend", "n_train", "n_test", "batch_size", "threads"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        command += ["--repeats", str(args.repeats), "--out", str(args.out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            raise SystemExit(f"{mode} failed with exit status {done.returncode}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        records[mode] = record
        print(
            f"  {mode:6s}: cold {record['cold_s']:7.2f} s, warm median "
            f"{record['median_s']:7.2f} s, peak +{record['peak_mib']:7.0f} MiB"
        )
    if {"flat", "layers"} <= set(records):
        flat = np.load(args.out / f"{args.backend}-flat.npy")
        layers = np.load(args.out / f"{args.backend}-layers.npy")
        diff = float(np.max(np.abs(flat - layers)) / np.max(np.abs(flat)))
        speed = records["flat"]["median_s"] / records["layers"]["median_s"]
        memory = records["flat"]["peak_mib"] / max(records["layers"]["peak_mib"], 1)
        print(
            f"  layers vs flat: {speed:.1f}x faster (warm), {memory:.1f}x less peak "
            f"memory; max relative difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
