"""Cold-start wall time of influx on torch and on JAX, each run in a fresh process.

What a user waits for on the first call is dominated, on JAX, by compilation.
This script runs every inversion method once per backend in a new Python
process (same weights and data) and prints the wall time of the first
``compute_influences`` call, measured inside the child, plus ``influx demo``
timed as a whole command. The model is a logistic regression with 64 inputs
and 10 classes (650 parameters) on 500 synthetic training points and 50 test
points, float32, ``hessian_regularization=1e-2``, batches of 100.

Run from the repository root::

    PYTHONPATH=src:backends python benchmarks/cold_start.py [--workload W1]

``INFLUX_JAX_CACHE_DIR`` is removed from the children's environment, so the
JAX numbers are truly cold (no persistent compilation cache). On a shared,
loaded machine the BLAS thread pools of numpy and torch spin against other
processes and the times swing several fold; ``--threads 1`` sets
``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` in the
children (both backends alike) for steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("direct", "cg", "lissa", "arnoldi")
BACKENDS = ("torch", "jax")

CHILD = r"""
import json, sys, time
import numpy as np
backend, method = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
features, classes, n_train, n_test = 64, 10, 500, 50
centers = rng.normal(size=(classes, features))
def sample(n):
    labels = rng.integers(0, classes, size=n)
    points = centers[labels] + 2.0 * rng.normal(size=(n, features))
    return points.astype(np.float32), labels.astype(np.int64)
x_train, y_train = sample(n_train)
x_test, y_test = sample(n_test)
weight = (0.1 * rng.normal(size=(classes, features))).astype(np.float32)
bias = np.zeros(classes, np.float32)
import influx
if backend == "torch":
    import torch
    layer = torch.nn.Linear(features, classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    model = influx.twice_differentiable(layer, torch.nn.functional.cross_entropy)
else:
    import jax, jax.numpy as jnp
    def apply(p, x):
        return x @ p["w"].T + p["b"]
    def loss(logits, labels):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
    params = {"w": jnp.asarray(weight), "b": jnp.asarray(bias)}
    model = influx.twice_differentiable(apply, loss, params=params)
train = influx.batches(x_train, y_train, batch_size=100)
test = influx.batches(x_test, y_test, batch_size=100)
options = {"lissa": {"maxiter": 200}}.get(method, {})
start = time.perf_counter()
result = influx.compute_influences(
    model, train, test_data=test, inversion_method=method,
    hessian_regularization=1e-2, **options)
values = np.asarray(model.backend.to_numpy(result))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "checksum": float(np.abs(values).sum())}))
"""

#: The same first call on W1 (digits MLP, P = 2,410, 1,000 training and 100
#: test points, float32, its benchmark options), for ``--workload W1``.
CHILD_W1 = r"""
import json, sys, time
import numpy as np
backend, method, folder = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, folder)
from _models import influx_model
from _workloads import load
from run_influx import METHODS
import influx
workload = load("W1")
spec = workload.spec
model, native = influx_model(backend, workload.weights, "float32")
def data(x, y):
    return influx.batches(native(x), native(y), batch_size=spec.batch_size)
name, kind, options = METHODS[method]
start = time.perf_counter()
result = influx.compute_influences(
    model, data(workload.x_train, workload.y_train),
    test_data=data(workload.x_test, workload.y_test), inversion_method=name,
    hessian_regularization=spec.hessian_regularization, **options)
values = np.asarray(model.backend.to_numpy(result))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "checksum": float(np.abs(values).sum())}))
"""

THREADS: str | None = None
WORKLOAD = "synthetic"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS is not None:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = THREADS
    env.pop("INFLUX_JAX_CACHE_DIR", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [os.path.join(root, "src"), os.path.join(root, "backends")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_method(backend: str, method: str) -> tuple[float, float]:
    """``(first-call seconds, process seconds)`` of one method in a new process."""
    start = time.perf_counter()
    if WORKLOAD == "W1":
        folder = os.path.dirname(os.path.abspath(__file__))
        command = [sys.executable, "-c", CHILD_W1, backend, method, folder]
    else:
        command = [sys.executable, "-c", CHILD, backend, method]
    done = subprocess.run(
        command,
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    total = time.perf_counter() - start
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], total


def run_demo(backend: str) -> tuple[float, float]:
    """``(influence seconds as the demo reports them, command seconds)``."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "influx.cli", "demo", "--backend", backend],
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    total = time.perf_counter() - start
    line = next(s for s in done.stdout.splitlines() if " computed in " in s)
    return float(line.rsplit(" computed in ", 1)[1].split()[0]), total


def main() -> None:
    """Print one row per method (and the demo): seconds per backend and the ratio."""
    global THREADS, WORKLOAD
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="BLAS/OpenMP threads")
    parser.add_argument(
        "--workload",
        choices=["synthetic", "W1"],
        default="synthetic",
        help="the 650-parameter logistic regression, or W1 (made by "
        "make_workloads.py, needs scikit-learn)",
    )
    args = parser.parse_args()
    THREADS, WORKLOAD = args.threads, args.workload
    print(f"load average before: {os.getloadavg()}")
    header = (
        f"{'case':<10}{'torch s':>10}{'jax s':>10}{'jax/torch':>11}"
        f"{'torch proc s':>14}{'jax proc s':>12}"
    )
    print(header)
    cases = [(m, run_method) for m in METHODS] + [("demo", None)]
    for name, runner in cases:
        times = {}
        for backend in BACKENDS:
            times[backend] = (
                run_demo(backend) if runner is None else runner(backend, name)
            )
        (t_torch, p_torch), (t_jax, p_jax) = times["torch"], times["jax"]
        print(
            f"{name:<10}{t_torch:>10.2f}{t_jax:>10.2f}{t_jax / t_torch:>11.2f}"
            f"{p_torch:>14.2f}{p_jax:>12.2f}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
