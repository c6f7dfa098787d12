"""float16 and bfloat16 models: every method works, in float32 or wider inside.

Each half-precision result is compared with the same method on float64 weights
rounded from the same numbers. Tolerances (max abs error over the largest
reference entry): 5e-3 for float16 (11-bit mantissa, measured ~5e-4) and 5e-2
for bfloat16 (8-bit mantissa, measured ~1e-2); a tiny linear regression with
``hessian_regularization=0.5`` keeps the problem well conditioned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from models import jax_mlp, mlp_weights, mse_loss, torch_mlp

import influx

TOLERANCE = {"float16": 5e-3, "bfloat16": 5e-2}
METHODS = [
    ("direct", {}),
    ("cg", {}),
    ("lissa", {"rtol": 1e-2, "maxiter": 200, "seed": 0}),
    ("arnoldi", {"rank_estimate": 7}),  # full rank: dense eigh
    ("arnoldi", {"rank_estimate": 3}),
    ("arnoldi", {"rank_estimate": 3, "eigensolver": "arpack"}),
]


def _wrap(backend_name: str, dtype: str) -> Any:
    layers = mlp_weights((6, 1), seed=0)
    if backend_name == "torch":
        return influx.twice_differentiable(
            torch_mlp(layers, dtype), mse_loss(backend_name)
        )
    apply_fn, params = jax_mlp(layers, dtype)
    return influx.twice_differentiable(apply_fn, mse_loss(backend_name), params=params)


def _host(array: Any) -> np.ndarray:
    if type(array).__module__.startswith("torch"):
        return array.detach().double().numpy()
    return np.asarray(array, dtype=np.float64)


def _data() -> Any:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6)), rng.standard_normal((16, 1))
    return influx.batches(x, y, batch_size=8)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(("method", "options"), METHODS)
def test_half_precision_matches_float64(
    backend_name: str, dtype: str, method: str, options: dict[str, Any]
) -> None:
    data = _data()
    kwargs = dict(inversion_method=method, hessian_regularization=0.5, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", influx.NotConvergedWarning)
        reference = _host(
            influx.compute_influences(_wrap(backend_name, "float64"), data, **kwargs)
        )
        model = _wrap(backend_name, dtype)
        result = influx.compute_influences(model, data, **kwargs)
    assert str(result.dtype).endswith(dtype)  # the model's dtype comes back
    error = np.max(np.abs(_host(result) - reference)) / np.max(np.abs(reference))
    assert error < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_into_numpy_out(backend_name: str, dtype: str) -> None:
    data = _data()
    model = _wrap(backend_name, dtype)
    expected = _host(influx.compute_influences(model, data, hessian_regularization=0.5))
    out = np.full((16, 16), np.nan, dtype=np.float32)
    returned = influx.compute_influences(
        model, data, hessian_regularization=0.5, out=out
    )
    assert returned is out
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_bfloat16_to_numpy_is_float32(backend_name: str) -> None:
    model = _wrap(backend_name, "bfloat16")
    host = model.backend.to_numpy(model.parameters)
    assert host.dtype == np.float32


NO_X64_SCRIPT = """
import json, sys, warnings
sys.path.insert(0, {tests!r})
import jax
assert not jax.config.jax_enable_x64
import numpy as np
import influx
from test_half_precision import METHODS, _data, _host, _wrap

errors = {{}}
with warnings.catch_warnings():
    warnings.simplefilter("ignore", influx.NotConvergedWarning)
    for method, options in METHODS[1:3] + METHODS[4:5]:  # cg, lissa, krylov
        kwargs = dict(inversion_method=method, hessian_regularization=0.5, **options)
        model = _wrap("jax", "float32")
        reference = _host(influx.compute_influences(model, _data(), **kwargs))
        for dtype in ("float16", "bfloat16"):
            result = influx.compute_influences(_wrap("jax", dtype), _data(), **kwargs)
            assert str(result.dtype) == dtype, result.dtype
            error = np.abs(_host(result) - reference).max() / np.abs(reference).max()
            errors[method + "-" + dtype] = float(error)
print(json.dumps(errors))
"""


def test_jax_half_precision_without_x64() -> None:
    # Without float64, CG, LiSSA and block Krylov accumulate in float32.
    pytest.importorskip("jax")
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", NO_X64_SCRIPT.format(tests=tests)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_ENABLE_X64": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 6
    for name, error in errors.items():
        assert error < TOLERANCE[name.rsplit("-", 1)[1]], (name, error)
