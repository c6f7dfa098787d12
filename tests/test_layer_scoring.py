"""Scoring from layer inputs and output gradients equals the flat scoring.

The same wrapped model is scored twice: through a layer structure
(``LayerScorer``: no per-sample gradients ``[B, P]``) and without it
(``FlatOnly``: per-sample gradients of the adapter). The layer structure is
the adapter's own (``"adapter"``) or ``tests/layer_stub.py``'s numpy one
(``"stub"``, independent of the adapters). Models: a tanh MLP with
cross-entropy, an MLP with a rest parameter (an output scale) and MSE, and a
1-D CNN (conv weight sharing over 5 positions); one and four test factors, so
both contractions run (``S a`` for ``K T <= K + T``, per-sample layer
gradients otherwise). Uneven batches (7 points in batches of 3). Tolerances:
1e-10 (float64), 1e-5 (float32), relative to the largest score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from layer_stub import (
    CNN_INPUT,
    FlatOnly,
    LayeredModel,
    cnn_ops,
    layered,
    mlp_ops,
    torch_network,
)
from models import rel_err, to_numpy

import influx
from influx import _loss_check, _scoring
from influx._scoring import score
from influx.methods import InfluenceType

N, BATCH = 7, 3
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
KINDS = ["mlp", "mlp_rest", "cnn"]
SOURCES = ["adapter", "stub"]


def model_of(
    backend_name: str, kind: str, dtype: str = "float64", source: str = "stub"
) -> Any:
    """The network of ``kind`` with the stub's layer structure, or the adapter's."""
    if kind == "mlp":
        ops, loss = mlp_ops((3, 5, 3), seed=2), "cross_entropy"
    elif kind == "mlp_rest":
        ops, loss = mlp_ops((3, 4, 2), seed=1, scale=True), "mse"
    else:
        ops, loss = cnn_ops(seed=1), "cross_entropy"
    model = layered(backend_name, ops, loss, dtype)
    return model if source == "stub" else model._model


def flat(model: Any) -> FlatOnly:
    """The same wrapped model without layer structure."""
    return FlatOnly(model._model if isinstance(model, LayeredModel) else model)


def data(kind: str, dtype: str = "float64", count: int = N) -> tuple[Any, Any]:
    rng = np.random.default_rng(3)
    shape = CNN_INPUT if kind == "cnn" else (3,)
    x = rng.standard_normal((count, *shape)).astype(dtype)
    if kind == "mlp_rest":
        return x, rng.standard_normal((count, 2)).astype(dtype)
    return x, rng.integers(0, 3, count)


def both(model: Any, train: Any, factors: Any) -> Any:
    """(layer-wise, flat) scores of ``train``, float64 numpy."""
    layer = score(InfluenceType.Up, model, train, factors, False, "data")
    reference = score(InfluenceType.Up, flat(model), train, factors, False, "data")
    return to_numpy(layer), to_numpy(reference)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_layer_scoring_equals_the_flat_scoring(
    backend_name, source, kind, count, dtype
):
    model = model_of(backend_name, kind, dtype, source)
    x, y = data(kind, dtype)
    train = influx.batches(x, y, batch_size=BATCH)
    factors = np.random.default_rng(4).standard_normal((count, model.num_params))
    factors = model.backend.asarray(factors, like=model.parameters)
    layer, flat = both(model, train, factors)
    assert layer.shape == (count, N)
    assert rel_err(layer, flat) < TOLERANCE[dtype]
    split = score(InfluenceType.Up, model, train, factors, False, "d", by_layer=True)
    assert rel_err(to_numpy(split).sum(axis=-1), flat) < TOLERANCE[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_native_jax_path(backend_name, kind, monkeypatch):
    # JAX on the CPU scores on the host (numpy); with the host mode off the
    # same code runs on JAX arrays, as on an accelerator.
    if backend_name != "jax":
        pytest.skip("the host mode is JAX's")
    model = model_of(backend_name, kind, source="adapter")
    x, y = data(kind)
    train = influx.batches(x, y, batch_size=BATCH)
    factors = np.random.default_rng(4).standard_normal((4, model.num_params))
    factors = model.backend.asarray(factors, like=model.parameters)
    host, _ = both(model, train, factors)
    seen = []
    original = _scoring.LayerScorer.score

    def spy(self_: Any, *arrays: Any) -> Any:
        seen.append(type(arrays[0][0]))
        return original(self_, *arrays)

    monkeypatch.setattr(_scoring.LayerScorer, "score", spy)
    monkeypatch.setattr(
        _scoring, "host_view", lambda a: a if isinstance(a, np.ndarray) else None
    )
    native, flat = both(model, train, factors)
    assert seen and all(kind is not np.ndarray for kind in seen)
    assert rel_err(native, flat) < 1e-10
    assert rel_err(native, host) < 1e-10


@pytest.mark.parametrize("method", ["direct", "block"])
@pytest.mark.parametrize("source", SOURCES)
def test_influence_queries_use_the_layers(backend_name, source, method):
    # influences and top_k of Influence through the layers equal the flat
    # scoring of the same factors (block's groups are the layers here).
    model = model_of(backend_name, "mlp_rest", source=source)
    x, y = data("mlp_rest", count=N + 3)
    train = influx.batches(x[:N], y[:N], batch_size=BATCH)
    test = influx.batches(x[N:], y[N:])
    inf = influx.Influence(model, method, 3.0).fit(train)
    factors = inf.factors(test)
    expected = to_numpy(influx.compute_influences_up(flat(model), train, factors))
    assert rel_err(inf.influences(test), expected) < 1e-10
    assert (
        rel_err(influx.compute_influences_up(model, train, factors), expected) < 1e-10
    )
    values, indices = inf.top_k(test, train, 3)
    order = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    assert np.array_equal(to_numpy(indices), order)
    assert rel_err(values, np.take_along_axis(expected, order, 1)) < 1e-10


@pytest.mark.parametrize("source", SOURCES)
def test_no_per_sample_gradients_of_whole_batches(backend_name, source, monkeypatch):
    # Only the loss convention check takes per-sample gradients, of at most
    # LOSS_CHECK_ENTRIES // P points of the first batch.
    model = model_of(backend_name, "mlp", source=source)
    x, y = data("mlp")
    train = influx.batches(x, y, batch_size=BATCH)
    calls: list[int] = []
    original = model.per_sample_grads

    def counted(xb: Any, yb: Any) -> Any:
        calls.append(int(xb.shape[0]))
        return original(xb, yb)

    model.per_sample_grads = counted  # type: ignore[method-assign]
    monkeypatch.setattr(_loss_check, "LOSS_CHECK_ENTRIES", 2 * model.num_params)
    factors = np.ones((2, model.num_params))
    score(InfluenceType.Up, model, train, factors, False, "data")
    assert calls == [2]


def test_checks_as_the_flat_scoring(backend_name):
    model = model_of(backend_name, "mlp_rest")
    x, y = data("mlp_rest")
    x[4, 1] = np.nan  # batch 1
    factors = np.ones((1, model.num_params))
    bad = influx.batches(x, y, batch_size=BATCH)
    with pytest.raises(influx.InputError, match="data batch 1: the loss is not finite"):
        score(InfluenceType.Up, model, bad, factors, False, "data")


def test_loss_convention_is_checked(backend_name):
    ops = mlp_ops((3, 4, 2), seed=1)
    if backend_name == "torch":
        import torch

        network = torch_network(ops, "float64")
        wrapped = influx.twice_differentiable(
            network, torch.nn.MSELoss(reduction="sum")
        )
    else:
        import jax.numpy as jnp
        from layer_stub import jax_network

        apply_fn, params = jax_network(ops, "float64")
        wrapped = influx.twice_differentiable(
            apply_fn, lambda p, t: jnp.sum((p - t) ** 2), params=params
        )
    model = LayeredModel(wrapped, ops, backend_name, "mse")
    x, y = data("mlp_rest")
    train = influx.batches(x, y, batch_size=BATCH)
    with pytest.raises(influx.InputError, match="mean"):
        score(
            InfluenceType.Up, model, train, np.ones((1, model.num_params)), False, "d"
        )


@pytest.mark.parametrize(
    ("count", "positions", "outputs"),
    [(1, 4, True), (3, 4, False), (2, 1, True), (8, 1, False), (1, 9, False)],
)
def test_both_contractions_against_einsum(count, positions, outputs):
    # One layer (d_out 5, d_in 6, bias): <S_k, sum_t g_t a_t^T> by einsum.
    assert _scoring.contract_outputs(count, positions, 6) is outputs
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, positions, 6))
    g = rng.standard_normal((4, 1, positions, 5))
    weight, bias = rng.standard_normal((count, 5, 6)), rng.standard_normal((count, 5))
    scorer = _scoring.LayerScorer(None, np.zeros((count, 1)))
    got = scorer._layer(weight.reshape(-1, 6), bias.reshape(-1), a, g)
    grads = np.einsum("bto,bti->boi", g[:, 0], a)
    expected = np.einsum("koi,boi->kb", weight, grads)
    expected += np.einsum("ko,bo->kb", bias, g[:, 0].sum(axis=1))
    assert rel_err(got, expected) < 1e-13
