"""influences(..., by_layer=True): per-group scores [N_test, M, L].

Each slice ``[:, :, l]`` is checked against ``factors[:, idx] @ grads[:, idx].T``
computed in numpy from the factors and the adapter's per-sample gradients; the
slices sum to ``influences()``. Models: an MLP without layer structure
(``FlatOnly``: groups are the parameter tensors, flat scoring), the same MLP
with the adapter's layers, and models with the layer structure of
``tests/layer_stub.py`` (layers, and a rest parameter; layer-wise scoring).
Batches are uneven (7 points in batches of 3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from layer_stub import CNN_INPUT, FlatOnly, cnn_ops, layered, mlp_ops, native_grads
from models import mlp_weights, to_numpy, wrap_mlp

import influx
from influx.layers import parameter_groups

N, T, BATCH = 7, 3, 3


def model_of(backend_name: str, kind: str, dtype: str = "float64") -> Any:
    if kind in ("mlp", "mlp_layers"):
        model = wrap_mlp(backend_name, mlp_weights((3, 4, 2), seed=1), dtype=dtype)
        return FlatOnly(model) if kind == "mlp" else model
    if kind == "mlp_rest":
        ops = mlp_ops((3, 4, 2), seed=1, scale=True)
        return layered(backend_name, ops, "mse", dtype)
    return layered(backend_name, cnn_ops(seed=1), "cross_entropy", dtype)


def data(kind: str, dtype: str = "float64") -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    shape = CNN_INPUT if kind == "cnn" else (3,)
    x = rng.standard_normal((N + T, *shape)).astype(dtype)
    if kind == "cnn":
        y = rng.integers(0, 3, N + T)
    else:
        y = rng.standard_normal((N + T, 2)).astype(dtype)
    return x[:N], y[:N], x[N:], y[N:]


def expected_names(backend_name: str, kind: str) -> list[str]:
    if kind == "mlp":
        if backend_name == "torch":
            return ["0.weight", "0.bias", "2.weight", "2.bias"]
        return ["[0]['b']", "[0]['w']", "[1]['b']", "[1]['w']"]
    if kind == "mlp_layers":  # the adapters' names of the two nn.Linear / dense
        return ["0", "2"] if backend_name == "torch" else ["[0]", "[1]"]
    if kind == "mlp_rest":
        return [
            "layer0",
            "layer2",
            "3.scale" if backend_name == "torch" else "[3]['s']",
        ]
    return ["layer0", "layer3"]


@pytest.mark.parametrize("kind", ["mlp", "mlp_layers", "mlp_rest", "cnn"])
def test_slices_are_the_groups_scores_and_sum_to_the_total(backend_name, kind):
    model = model_of(backend_name, kind)
    x, y, x_test, y_test = data(kind.replace("_layers", ""))
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(x_test, y_test, batch_size=2)
    inf = influx.Influence(model, "direct", 2.0).fit(train)
    factors = to_numpy(inf.factors(test))
    grads = native_grads(model, x, y)
    total = to_numpy(inf.influences(test))
    split = inf.influences(test, by_layer=True)
    assert type(split) is type(model.parameters)  # native, like influences()
    split = to_numpy(split)
    groups = parameter_groups(model)
    assert inf.layer_names == [name for name, _ in groups]
    assert inf.layer_names == expected_names(backend_name, kind)
    assert split.shape == (T, N, len(groups))
    scale = np.max(np.abs(total))
    assert np.max(np.abs(split.sum(axis=-1) - total)) < 1e-10 * scale
    for column, (_, index) in enumerate(groups):
        reference = factors[:, index] @ grads[:, index].T
        assert np.max(np.abs(split[:, :, column] - reference)) < 1e-10 * scale


def test_float32(backend_name):
    model = model_of(backend_name, "mlp_rest", "float32")
    x, y, x_test, y_test = data("mlp_rest", "float32")
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(x_test, y_test)
    inf = influx.Influence(model, "direct", 2.0).fit(train)
    total = to_numpy(inf.influences(test))
    split = inf.influences(test, by_layer=True)
    assert "float32" in str(split.dtype)
    error = np.max(np.abs(to_numpy(split).sum(axis=-1) - total))
    assert error < 1e-5 * np.max(np.abs(total))


def test_out_takes_the_three_dimensional_result(backend_name, monkeypatch):
    model = model_of(backend_name, "mlp_rest")
    x, y, x_test, y_test = data("mlp_rest")
    train = influx.batches(x, y, batch_size=BATCH)
    test = influx.batches(x_test, y_test)
    inf = influx.Influence(model, "direct", 2.0).fit(train)
    out = np.full((T, N, 3), np.nan)
    assert inf.influences(test, train, out=out, by_layer=True) is out
    assert np.allclose(out, to_numpy(inf.influences(test, by_layer=True)), 0, 1e-14)

    solves = []
    original = type(inf.solver).solve

    def counted(self_: Any, *args: Any, **kwargs: Any) -> Any:
        solves.append(1)
        return original(self_, *args, **kwargs)

    monkeypatch.setattr(type(inf.solver), "solve", counted)
    for shape in [(T, N), (T, N, 2), (T, N + 1, 3), (T + 1, N, 3)]:
        with pytest.raises(influx.InputError, match=r"\[N_test, M, L\] = \(3, 7, 3\)"):
            inf.influences(test, train, out=np.zeros(shape), by_layer=True)
    with pytest.raises(influx.InputError, match="'layer0', 'layer2'"):
        inf.influences(test, out=np.zeros((T, N)), by_layer=True)
    assert solves == []


def test_by_layer_is_up_weighting_only(backend_name):
    model = model_of(backend_name, "mlp")
    x, y, _, _ = data("mlp")
    train = influx.batches(x, y, batch_size=BATCH)
    inf = influx.Influence(model, "direct", 2.0).fit(train)
    with pytest.raises(influx.InputError, match="influence_type='up'"):
        inf.influences(train, influence_type="perturbation", by_layer=True)
    with pytest.raises(TypeError, match="by_layer must be True or False"):
        inf.influences(train, by_layer="yes")
    # The names need no fit.
    assert influx.Influence(model).layer_names == expected_names(backend_name, "mlp")
