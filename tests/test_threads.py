"""Concurrent calls on one model are exact and leave the model untouched.

``torch.func.functional_call`` swaps a module's parameters and buffers in place
for a call, and each call switches the module to evaluation mode: without a
lock per module two threads see each other's tensors. Here several threads
compute influences and Hessian-vector products on one torch module (in train
mode, with dropout and batch-norm) through one wrapper and through separate
wrappers, with a tiny interpreter switch interval so that the threads
interleave inside every call. Each result must equal the single-threaded one,
and afterwards the module must still hold ``nn.Parameter``s with their
``requires_grad``, be in its own train/eval modes, and train. JAX is pure:
the same result-equality test runs on one JAX wrapper.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from models import mse_loss, to_backend, to_numpy

import influx

IN_DIM, HIDDEN, OUT_DIM = 3, 4, 2
N_TRAIN = 8
THREADS = 4
ROUNDS = 2
REG = 5.0
#: float64 throughout; the serialised computation is the same computation.
TOL = 1e-12


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond, so that races show up every run."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((N_TRAIN, IN_DIM)), rng.standard_normal(
        (N_TRAIN, OUT_DIM)
    )


def _run_threads(work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in ``THREADS`` threads started together; results or errors."""
    barrier = threading.Barrier(THREADS)
    results: list[Any] = [None] * THREADS

    def target(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except BaseException as error:  # reported by the caller
            results[index] = error

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _work(
    model: influx.TwiceDifferentiable, data: Any, vectors: Any, rounds: int = ROUNDS
) -> Any:
    """Influences and batched HVPs, ``rounds`` times, as numpy."""
    outputs = []
    for _ in range(rounds):
        influences = influx.compute_influences(model, data, hessian_regularization=REG)
        x, y = data[0]
        outputs.append((to_numpy(influences), to_numpy(model.hvp(x, y, vectors))))
    return outputs


def _assert_same(results: list[Any], reference: Any) -> None:
    ref_inf, ref_hvp = reference
    for outputs in results:
        for influences, products in outputs:
            np.testing.assert_allclose(influences, ref_inf, rtol=TOL, atol=TOL)
            np.testing.assert_allclose(products, ref_hvp, rtol=TOL, atol=TOL)


# -- torch -----------------------------------------------------------------------


def _torch_net() -> Any:
    """Linear -> BatchNorm1d -> tanh -> Dropout -> Linear, float64, train mode,
    except the output layer (eval mode), with warmed-up running statistics."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(IN_DIM, HIDDEN, dtype=torch.float64),
        torch.nn.BatchNorm1d(HIDDEN, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(HIDDEN, OUT_DIM, dtype=torch.float64),
    )
    with torch.no_grad():
        net(torch.randn(16, IN_DIM, dtype=torch.float64))
    net[0].bias.requires_grad_(False)
    net.train()
    net[4].eval()
    return net


def _torch_state(net: Any) -> tuple[Any, ...]:
    parameters = [
        (name, type(p).__name__, p.requires_grad, p.detach().clone())
        for name, p in net.named_parameters()
    ]
    buffers = [(name, b.clone()) for name, b in net.named_buffers()]
    modes = [m.training for m in net.modules()]
    return parameters, buffers, modes


def _assert_torch_untouched(net: Any, before: tuple[Any, ...]) -> None:
    import torch

    parameters, buffers, modes = _torch_state(net)
    assert len(parameters) == len(before[0])
    for (name, kind, flag, value), (name0, kind0, flag0, value0) in zip(
        parameters, before[0], strict=True
    ):
        assert (name, kind, flag) == (name0, kind0, flag0)
        assert torch.equal(value, value0)
    for (name, value), (name0, value0) in zip(buffers, before[1], strict=True):
        assert name == name0
        assert torch.equal(value, value0)
    assert modes == before[2]
    for module in net.modules():
        for p in module._parameters.values():
            assert p is None or isinstance(p, torch.nn.Parameter)


def _assert_trains(net: Any) -> None:
    """One optimiser step changes every trainable parameter."""
    import torch

    trainable = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimiser = torch.optim.SGD(trainable, lr=0.1)
    x = torch.randn(8, IN_DIM, dtype=torch.float64)
    loss = net(x).pow(2).mean()
    loss.backward()
    optimiser.step()
    for p, p0 in zip(trainable, before, strict=True):
        assert not torch.equal(p.detach(), p0)


@pytest.mark.parametrize("shared_wrapper", [True, False])
def test_torch_threads_exact_and_model_untouched(
    fast_switching: None, shared_wrapper: bool
) -> None:
    torch = pytest.importorskip("torch")
    net = _torch_net()
    x, y = _arrays()
    data = [
        (to_backend("torch", x[:4]), to_backend("torch", y[:4])),
        (to_backend("torch", x[4:]), to_backend("torch", y[4:])),
    ]
    before = _torch_state(net)
    loss = mse_loss("torch")
    model = influx.twice_differentiable(net, loss)
    vectors = torch.linspace(-1.0, 1.0, 3 * model.num_params, dtype=torch.float64)
    vectors = vectors.reshape(3, model.num_params)
    reference = _work(model, data, vectors)[0]

    def work(index: int) -> Any:
        if shared_wrapper:
            return _work(model, data, vectors)
        # Each thread wraps the module itself, while the others compute on it.
        return [
            _work(influx.twice_differentiable(net, loss), data, vectors, 1)[0]
            for _ in range(ROUNDS)
        ]

    results = _run_threads(work)

    _assert_same(results, reference)
    _assert_torch_untouched(net, before)
    _assert_trains(net)


# -- JAX -------------------------------------------------------------------------


def test_jax_threads_exact(fast_switching: None) -> None:
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(1)
    params = {
        "hidden": {"w": jnp.asarray(rng.standard_normal((IN_DIM, HIDDEN)))},
        "out": {
            "w": jnp.asarray(rng.standard_normal((HIDDEN, OUT_DIM))),
            "b": jnp.asarray(rng.standard_normal(OUT_DIM)),
        },
    }

    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p["hidden"]["w"]) @ p["out"]["w"] + p["out"]["b"]

    x, y = _arrays()
    data = [
        (to_backend("jax", x[:4]), to_backend("jax", y[:4])),
        (to_backend("jax", x[4:]), to_backend("jax", y[4:])),
    ]
    model = influx.twice_differentiable(apply_fn, mse_loss("jax"), params=params)
    size = model.num_params
    vectors = jnp.linspace(-1.0, 1.0, 3 * size, dtype=jnp.float64).reshape(3, size)
    leaves_before = [np.array(leaf) for leaf in _leaves(params)]
    reference = _work(model, data, vectors)[0]

    results = _run_threads(lambda i: _work(model, data, vectors))

    _assert_same(results, reference)
    for leaf, leaf0 in zip(_leaves(params), leaves_before, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), leaf0)


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("library", ["equinox", "flax.nnx"])
def test_jax_library_modules_threads_exact(fast_switching: None, library: str) -> None:
    """Library modules are split and merged inside the traced functions."""
    pytest.importorskip("jax")
    pytest.importorskip(library)
    import jax
    import jax.numpy as jnp

    if library == "equinox":
        import equinox as eqx

        module = eqx.nn.MLP(IN_DIM, OUT_DIM, HIDDEN, 1, key=jax.random.PRNGKey(0))
    else:
        from flax import nnx

        module = nnx.Sequential(
            nnx.Linear(IN_DIM, HIDDEN, rngs=nnx.Rngs(0)),
            nnx.BatchNorm(HIDDEN, rngs=nnx.Rngs(0)),
            nnx.Linear(HIDDEN, OUT_DIM, rngs=nnx.Rngs(1)),
        )
    x, y = _arrays()
    data = [
        (jnp.asarray(x[:4], jnp.float32), jnp.asarray(y[:4], jnp.float32)),
        (jnp.asarray(x[4:], jnp.float32), jnp.asarray(y[4:], jnp.float32)),
    ]
    model = influx.twice_differentiable(module, mse_loss("jax"))
    vectors = jnp.ones((2, model.num_params), model.dtype)
    xb, yb = data[0]

    def products(wrapped: influx.TwiceDifferentiable) -> Any:
        grads, _ = wrapped.per_sample_grads(xb, yb)
        return to_numpy(grads), to_numpy(wrapped.hvp(xb, yb, vectors))

    reference = products(model)
    # A fresh wrapper, not compiled yet: the threads trace it concurrently.
    fresh = influx.twice_differentiable(module, mse_loss("jax"))
    results = _run_threads(lambda i: products(fresh))
    for grads, hvps in results:
        np.testing.assert_allclose(grads, reference[0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(hvps, reference[1], rtol=1e-6, atol=1e-9)
