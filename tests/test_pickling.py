"""Wrapped models survive cloudpickle (what dask uses) and compute the same numbers.

Each wrapper is pickled after use (caches and compiled functions filled),
unpickled, and its per-sample gradients, Hessian-vector products and layer
arrays compared with the original's to 1e-12 (float64). A float64 JAX model
unpickled in a process without ``jax_enable_x64`` switches it on (with a
RuntimeWarning) instead of silently computing in float32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from models import mlp_weights, mse_loss, to_numpy, wrap_mlp

import influx

cloudpickle = pytest.importorskip("cloudpickle")

ROOT = Path(__file__).resolve().parents[1]


def _batch(model: Any, seed: int = 0, inputs: int = 3, outputs: int = 2) -> Any:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, inputs))
    y = rng.standard_normal((5, outputs))
    like = model.parameters
    return model.backend.asarray(x, like=like), model.backend.asarray(y, like=like)


def _assert_same(model: Any, copy: Any, inputs: int = 3, outputs: int = 2) -> None:
    x, y = _batch(model, inputs=inputs, outputs=outputs)
    assert copy.num_params == model.num_params
    assert str(copy.dtype) == str(model.dtype)
    np.testing.assert_array_equal(to_numpy(copy.parameters), to_numpy(model.parameters))
    grads, losses = model.per_sample_grads(x, y)
    grads2, losses2 = copy.per_sample_grads(x, y)
    np.testing.assert_allclose(to_numpy(grads2), to_numpy(grads), rtol=0, atol=1e-12)
    np.testing.assert_allclose(to_numpy(losses2), to_numpy(losses), rtol=0, atol=1e-12)
    rng = np.random.default_rng(1)
    vectors = model.backend.asarray(
        rng.standard_normal((2, model.num_params)), like=model.parameters
    )
    products = to_numpy(model.hvp(x, y, vectors))
    products2 = to_numpy(copy.hvp(x, y, vectors))
    np.testing.assert_allclose(products2, products, rtol=0, atol=1e-12)


def _roundtrip(model: Any) -> Any:
    return cloudpickle.loads(cloudpickle.dumps(model))


def test_mlp_roundtrip(backend_name: str) -> None:
    model = wrap_mlp(backend_name, mlp_weights((3, 4, 2)))
    x, y = _batch(model)
    model.per_sample_grads(x, y)  # fill the caches and compiled functions
    copy = _roundtrip(model)
    _assert_same(model, copy)
    # the layer structure is found again, and gives the same arrays
    batch, batch2 = model.layer_batch(x, y), copy.layer_batch(x, y)
    assert [layer.name for layer in copy.layers] == [
        layer.name for layer in model.layers
    ]
    for a, b in zip(batch.output_grads, batch2.output_grads, strict=True):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=0, atol=1e-12)


def test_fitted_influence_of_unpickled_model(backend_name: str) -> None:
    """An Influence on the unpickled wrapper gives the original's influences."""
    model = wrap_mlp(backend_name, mlp_weights((3, 4, 2), seed=2))
    rng = np.random.default_rng(3)
    data = influx.batches(
        rng.standard_normal((12, 3)), rng.standard_normal((12, 2)), batch_size=5
    )
    expected = influx.Influence(model, "direct", 2.0).fit(data).influences(data)
    copy = _roundtrip(model)
    got = influx.Influence(copy, "direct", 2.0).fit(data).influences(data)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=0, atol=1e-12)


def _jax_library_models() -> list[tuple[str, Any]]:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    loss = mse_loss("jax")
    found: list[tuple[str, Any]] = []
    try:
        import flax.linen as nn

        class Dense(nn.Module):
            @nn.compact
            def __call__(self, x: Any) -> Any:
                return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(x))

        module = Dense()
        variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
        found.append(
            ("flax", influx.twice_differentiable(module.apply, loss, params=variables))
        )
    except ImportError:
        pass
    try:
        import equinox as eqx

        linear = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(1), dtype=jnp.float64)
        found.append(("equinox", influx.twice_differentiable(linear, loss)))
    except ImportError:
        pass
    try:
        from flax import nnx

        layer = nnx.Linear(3, 2, rngs=nnx.Rngs(2), param_dtype=jnp.float64)
        found.append(("nnx", influx.twice_differentiable(layer, loss)))
    except ImportError:
        pass
    return found


def test_jax_library_models_roundtrip() -> None:
    models = _jax_library_models()
    if not models:
        pytest.skip("no JAX model library installed")
    for name, model in models:
        x, y = _batch(model)
        model.per_sample_grads(x, y)
        copy = _roundtrip(model)
        assert str(copy.dtype) == "float64", name
        _assert_same(model, copy)


def test_float64_jax_model_in_a_32_bit_process(tmp_path: Path) -> None:
    """A float64 JAX model unpickled without jax_enable_x64 stays float64."""
    pytest.importorskip("jax")
    model = wrap_mlp("jax", mlp_weights((3, 4, 2), seed=5))
    x, y = _batch(model)
    grads = to_numpy(model.per_sample_grads(x, y)[0])
    (tmp_path / "model.pkl").write_bytes(cloudpickle.dumps(model))
    np.save(tmp_path / "x.npy", to_numpy(x))
    np.save(tmp_path / "y.npy", to_numpy(y))
    np.save(tmp_path / "grads.npy", grads)
    script = """
import sys, warnings
import cloudpickle, numpy as np, jax
assert not jax.config.read("jax_enable_x64")
folder = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with open(folder + "/model.pkl", "rb") as handle:
        model = cloudpickle.load(handle)
assert any("jax_enable_x64" in str(w.message) for w in caught), caught
assert jax.config.read("jax_enable_x64")
assert str(model.dtype) == "float64", model.dtype
x = model.backend.asarray(np.load(folder + "/x.npy"), like=model.parameters)
y = model.backend.asarray(np.load(folder + "/y.npy"), like=model.parameters)
grads = np.asarray(model.per_sample_grads(x, y)[0])
assert grads.dtype == np.float64, grads.dtype
np.testing.assert_allclose(grads, np.load(folder + "/grads.npy"), rtol=0, atol=1e-12)
print("OK")
"""
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    paths = [str(ROOT / "src"), str(ROOT / "backends"), str(ROOT / "tests")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout
