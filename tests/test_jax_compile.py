"""JAX compile time: batches padded to buckets (exactly), shared compiled functions.

Ragged batches are padded with masked copies of a real sample; the results
must equal the unpadded computation to float64 rounding, and many distinct
batch sizes must compile only a few times. Counts, not timings.
"""

from __future__ import annotations

import gc
import itertools
import weakref

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from influx_jax import _cache, _compiled  # noqa: E402
from influx_jax._model import JaxTwiceDifferentiable  # noqa: E402

import influx  # noqa: E402

SIZES = [1, 6, 13]  # 20 points in ragged batches
LAMBDA = 2.0  # above the smallest eigenvalue of the (indefinite) MLP Hessian


def _apply(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(3, 4))),
        "b1": jnp.asarray(rng.normal(size=4) * 0.1),
        "w2": jnp.asarray(rng.normal(size=(4, 2))),
        "b2": jnp.asarray(rng.normal(size=2) * 0.1),
    }


def _data(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.integers(0, 2, size=n)


def _ragged(x: np.ndarray, y: np.ndarray, sizes: list[int]) -> list[tuple]:
    edges = np.cumsum([0, *sizes])
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(edges)]


def _reference(model: JaxTwiceDifferentiable):
    """Unpadded per-sample gradients, batch HVPs and the user's batch loss."""
    unravel = model._unravel

    def batch_loss(theta, x, y):
        return _loss(_apply(unravel(theta), x), y)

    def sample_loss(theta, x, y):
        return batch_loss(theta, x[None], y[None])

    per_sample = jax.jit(jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0)))

    @jax.jit
    def hvp(theta, x, y, vectors):
        grad = jax.grad(batch_loss)
        return jax.vmap(lambda v: jax.jvp(lambda t: grad(t, x, y), (theta,), (v,))[1])(
            vectors
        )

    return batch_loss, sample_loss, per_sample, hvp


def test_ragged_batches_equal_unpadded() -> None:
    model = JaxTwiceDifferentiable(_apply, _params(), _loss)
    theta = model.parameters
    batch_loss, _, per_sample, hvp = _reference(model)
    x, y = _data(sum(SIZES))
    vectors = jnp.asarray(np.random.default_rng(2).normal(size=(5, model.num_params)))
    for xb, yb in _ragged(jnp.asarray(x), jnp.asarray(y), SIZES):
        grads, losses = model.per_sample_grads(xb, yb)
        assert grads.shape == (xb.shape[0], model.num_params)
        np.testing.assert_allclose(grads, per_sample(theta, xb, yb), rtol=0, atol=1e-12)
        expected_losses = jax.jit(
            jax.vmap(lambda a, b: _loss(_apply(model.params, a[None]), b[None]))
        )(xb, yb)
        np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            model.grad(xb, yb),
            jax.jit(jax.grad(batch_loss))(theta, xb, yb),
            rtol=0,
            atol=1e-12,
        )
        np.testing.assert_allclose(
            model.hvp(xb, yb, vectors), hvp(theta, xb, yb, vectors), rtol=0, atol=1e-12
        )
        dense = jax.jit(jax.hessian(batch_loss))(theta, xb, yb)
        from_hvp = influx.HessianOperator(model, [(xb, yb)]).to_dense()
        np.testing.assert_allclose(from_hvp, dense, rtol=0, atol=1e-12)


def _dense_influences(model, x_train, y_train, x_test, y_test):
    """``G_test (H + lambda I)^{-1} G_train^T`` and the factors, float64."""
    batch_loss, _, per_sample, _ = _reference(model)
    theta = model.parameters
    hessian = np.array(jax.jit(jax.hessian(batch_loss))(theta, x_train, y_train))
    hessian += LAMBDA * np.eye(model.num_params)
    g_train = np.asarray(per_sample(theta, x_train, y_train))
    g_test = np.asarray(per_sample(theta, x_test, y_test))
    factors = np.linalg.solve(hessian, g_test.T).T
    return factors @ g_train.T, factors


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_ragged_influences_match_dense_reference(method: str) -> None:
    model = JaxTwiceDifferentiable(_apply, _params(), _loss)
    x, y = _data(sum(SIZES))
    x_test, y_test = _data(9, seed=3)
    expected, _ = _dense_influences(
        model, jnp.asarray(x), jnp.asarray(y), jnp.asarray(x_test), jnp.asarray(y_test)
    )
    options = {"cg": {"rtol": 1e-12, "atol": 1e-14, "preconditioner": None}}.get(
        method, {}
    )
    result = influx.compute_influences(
        model,
        _ragged(x, y, SIZES),
        test_data=_ragged(x_test, y_test, [2, 7]),
        inversion_method=method,
        hessian_regularization=LAMBDA,
        **options,
    )
    assert isinstance(result, jax.Array)
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-10, atol=1e-12)


def test_ragged_perturbation_matches_reference() -> None:
    model = JaxTwiceDifferentiable(_apply, _params(), _loss)
    _, sample_loss, _, _ = _reference(model)
    theta = model.parameters
    x, y = _data(sum(SIZES))
    factors = jnp.asarray(np.random.default_rng(4).normal(size=(3, model.num_params)))

    def pert(xj, yj):
        return jax.jacobian(lambda a: jax.grad(sample_loss)(theta, a, yj) @ factors.T)(
            xj
        )

    for xb, yb in _ragged(jnp.asarray(x), jnp.asarray(y), SIZES):
        expected = jnp.moveaxis(jax.vmap(pert)(xb, yb), 1, 0)  # [K, B, 3]
        result = model.mixed_grads(xb, yb, factors)
        assert result.shape == (3, xb.shape[0], 3)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-12)


def test_distinct_batch_sizes_compile_a_few_times() -> None:
    """40 distinct sizes (10 to 49) meet three buckets: 16, 32, 64."""

    def apply(params, x):  # a function of its own: a fresh cache entry
        return _apply(params, x)

    model = JaxTwiceDifferentiable(apply, _params(), _loss)
    x, y = _data(49)
    vectors = jnp.ones((2, model.num_params))
    x, y = jnp.asarray(x), jnp.asarray(y)
    for size in range(10, 50):
        model.per_sample_grads(x[:size], y[:size])
        model.hvp(x[:size], y[:size], vectors)
    compiled = model._compiled
    assert compiled.per_sample._cache_size() == 3
    assert compiled.hvp._cache_size() == 3


def test_buckets() -> None:
    assert [_compiled.batch_bucket(n) for n in (1, 2, 3, 5, 100, 256)] == [
        1,
        2,
        4,
        8,
        128,
        256,
    ]
    assert [_compiled.batch_bucket(n) for n in (257, 384, 385, 512, 513)] == [
        384,
        384,
        512,
        512,
        768,
    ]
    assert len({_compiled.batch_bucket(n) for n in range(1, 2049)}) <= 16


def test_wrappers_share_compiled_functions_without_leaking() -> None:
    def apply(params, x):
        return _apply(params, x)

    first = JaxTwiceDifferentiable(apply, _params(0), _loss)
    second = JaxTwiceDifferentiable(apply, _params(5), _loss)
    assert first._compiled is second._compiled
    x, y = _data(6)
    first.per_sample_grads(jnp.asarray(x), jnp.asarray(y))
    grads, _ = second.per_sample_grads(jnp.asarray(x), jnp.asarray(y))
    assert first._compiled.per_sample._cache_size() == 1  # theta is an argument
    _, _, per_sample, _ = _reference(second)
    np.testing.assert_allclose(
        grads, per_sample(second.parameters, jnp.asarray(x), jnp.asarray(y)), atol=1e-12
    )
    entry = weakref.ref(first._compiled)
    assert any(value is entry() for value in _compiled._CACHE.values())
    del first, second, apply
    gc.collect()
    # the entry went with its apply function: nothing leaks
    assert not any(value is entry() for value in _compiled._CACHE.values())


def test_compilation_cache_is_opt_in(tmp_path, monkeypatch) -> None:
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    try:
        monkeypatch.delenv(_cache.ENV_VAR, raising=False)
        assert _cache.enable_from_environment() is None
        assert jax.config.jax_compilation_cache_dir == saved[names[0]]
        monkeypatch.setenv(_cache.ENV_VAR, str(tmp_path / "env"))
        assert _cache.enable_from_environment() == tmp_path / "env"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        folder = influx.enable_compilation_cache(tmp_path / "api")
        assert folder == tmp_path / "api" and folder.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(folder)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
