"""The loss must be the mean of per-sample losses; influx checks it up front.

A sum reduction, class weights, ``ignore_index`` targets or targets that
broadcast against the predictions give silently wrong influences, so each is
refused on the first batch of two points or more of every data argument, with
an error that names the loss, what was measured and the fix. A correct mean
loss passes in float32 and float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import mlp_weights, raw_model, to_numpy, wrap_mlp

import influx
from influx._loss_check import LossConventionCheck

IN_DIM, CLASSES = 3, 3
LAYERS = mlp_weights((IN_DIM, 5, CLASSES), seed=1)
REG = 0.1

# Non-converged or indefinite solves are beside the point here.
pytestmark = pytest.mark.filterwarnings("ignore::influx.InfluxWarning")


def _data(n: int = 12, seed: int = 0, classes: bool = False) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN_DIM))
    if classes:
        return x, rng.integers(0, CLASSES, size=n)
    return x, rng.standard_normal((n, CLASSES))


def _wrap(backend_name: str, loss: Any, dtype: str = "float64") -> Any:
    module, params = raw_model(backend_name, LAYERS, dtype)
    return influx.twice_differentiable(module, loss, params=params)


def _sum_loss(backend_name: str) -> Any:
    if backend_name == "torch":
        import torch

        return torch.nn.MSELoss(reduction="sum")
    import jax.numpy as jnp

    return lambda pred, y: jnp.sum((pred - y) ** 2) / CLASSES  # sums over the batch


def _weighted_ce(backend_name: str, weight: np.ndarray) -> Any:
    """Cross entropy normalised by the sum of the weights of the targets."""
    if backend_name == "torch":
        import torch

        return torch.nn.CrossEntropyLoss(weight=torch.as_tensor(weight))
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(weight)

    def loss(logits: Any, y: Any) -> Any:
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)
        return -jnp.sum(w[y] * logp[:, 0]) / jnp.sum(w[y])

    return loss


def _ignore_index_ce(backend_name: str) -> Any:
    """Cross entropy averaged over the targets that are not -100."""
    if backend_name == "torch":
        import torch

        return torch.nn.CrossEntropyLoss(ignore_index=-100)
    import jax
    import jax.numpy as jnp

    def loss(logits: Any, y: Any) -> Any:
        keep = y != -100
        safe = jnp.where(keep, y, 0)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), safe[:, None], axis=-1)
        return -jnp.sum(jnp.where(keep, logp[:, 0], 0.0)) / jnp.sum(keep)

    return loss


def _mse(backend_name: str) -> Any:
    if backend_name == "torch":
        import torch

        return torch.nn.MSELoss()
    import jax.numpy as jnp

    return lambda pred, y: jnp.mean((pred - y) ** 2)


def test_sum_reduction_is_refused_for_every_data_argument(backend_name: str) -> None:
    model = _wrap(backend_name, _sum_loss(backend_name))
    x, y = _data()
    data = influx.batches(x, y, batch_size=4)
    ones = influx.batches(x, y, batch_size=1)  # a sum over one point is its mean
    measured = r"are 4\.0x the mean of the per-sample ones: a sum reduction\?"
    fix = r"reduction='mean'"
    name = "MSELoss\\(reduction='sum'\\)" if backend_name == "torch" else "<lambda>"
    with pytest.raises(influx.InputError, match=rf"training_data batch 0: .*{name}"):
        influx.compute_influences(model, data, hessian_regularization=REG)
    # Test points one at a time: the Hessian's training data is refused.
    for method in ("direct", "cg"):
        with pytest.raises(
            influx.InputError, match=rf"training_data batch 0: .*{measured}.*{fix}"
        ):
            influx.compute_influence_factors(
                model, data, ones, method, hessian_perturbation=REG
            )
    factors = np.zeros((2, model.num_params))
    for kind, fn in (
        ("up", influx.compute_influences_up),
        ("pert", influx.compute_influences_pert),
    ):
        with pytest.raises(influx.InputError, match=rf"input_data batch 0: .*{kind}?"):
            fn(model, data, factors)
    with pytest.raises(influx.InputError, match=rf"test_data batch 0: .*{measured}"):
        influx.compute_influences(
            model, ones, test_data=data, hessian_regularization=REG
        )


def test_class_weighted_cross_entropy_is_refused(backend_name: str) -> None:
    model = _wrap(backend_name, _weighted_ce(backend_name, np.array([1.0, 4.0, 0.5])))
    x, y = _data(classes=True)
    data = influx.batches(x, y, batch_size=6)
    with pytest.raises(
        influx.InputError,
        match=r"training_data batch 0: for the loss .* the batch loss differs from "
        r"the mean of the per-sample losses: the loss by .* and its gradient by "
        r".*class weights.*reduction='none'",
    ):
        influx.compute_influences(model, data, hessian_regularization=REG)
    # Equal weights are a plain mean: accepted, and equal to the unweighted loss.
    equal = _wrap(backend_name, _weighted_ce(backend_name, np.full(CLASSES, 2.0)))
    plain = wrap_mlp(backend_name, LAYERS, loss="cross_entropy")
    factors = np.linspace(-1.0, 1.0, 2 * plain.num_params).reshape(2, -1)
    np.testing.assert_allclose(
        to_numpy(influx.compute_influences_up(equal, data, factors)),
        to_numpy(influx.compute_influences_up(plain, data, factors)),
        rtol=1e-10,
    )


def test_targets_that_broadcast_are_refused(backend_name: str) -> None:
    layers = mlp_weights((IN_DIM, 4, 1), seed=2)
    module, params = raw_model(backend_name, layers)
    model = influx.twice_differentiable(module, _mse(backend_name), params=params)
    x, y = _data()
    flat = influx.batches(x, y[:, 0], batch_size=4)  # y [B] against predictions [B, 1]
    with pytest.warns(UserWarning) if backend_name == "torch" else _nothing():
        with pytest.raises(
            influx.InputError,
            match=r"loss differs from the mean .*targets of shape \(4,\).*reshape "
            r"y to the predictions' shape",
        ):
            influx.compute_influences(model, flat, hessian_regularization=REG)
    column = influx.batches(x, y[:, :1], batch_size=4)
    influx.compute_influences_up(model, column, np.ones((1, model.num_params)))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def test_ignore_index_targets_are_refused(backend_name: str) -> None:
    model = _wrap(backend_name, _ignore_index_ce(backend_name))
    x, y = _data(classes=True)
    y_first, y_later = y.copy(), y.copy()
    y_first[2] = -100  # in the checked batch 0
    y_later[9] = -100  # in batch 2, after the check
    first = influx.batches(x, y_first, batch_size=4)
    later = influx.batches(x, y_later, batch_size=4)
    with pytest.raises(
        influx.InputError,
        match=r"training_data batch 0: .* NaN or inf on 1 of 4 points taken one at a "
        r"time \(points 2 of the batch\).*ignore_index.*Drop those points",
    ):
        influx.compute_influences(model, first, hessian_regularization=REG)
    with pytest.raises(
        influx.InputError,
        match=r"training_data batch 2: the loss is not finite: 1 NaN and 0 inf "
        r"values out of 4\..*ignore_index.*drop such points",
    ):
        influx.compute_influences(model, later, hessian_regularization=REG)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_mean_loss_passes(backend_name: str, dtype: str, loss: str) -> None:
    """No false alarm: a wider tanh MLP, batches of 32, in float32 and float64."""
    layers = mlp_weights((8, 16, 16, CLASSES), seed=3)
    model = wrap_mlp(backend_name, layers, loss=loss, dtype=dtype)
    rng = np.random.default_rng(4)
    x = (3 * rng.standard_normal((64, 8))).astype(dtype)
    if loss == "mse":
        y = rng.standard_normal((64, CLASSES)).astype(dtype)
    else:
        y = rng.integers(0, CLASSES, size=64)
    data = influx.batches(x, y, batch_size=32)
    check = LossConventionCheck(model, "training_data")
    for index, (xb, yb) in enumerate(data):
        native = model.backend.asarray(xb, like=model.parameters)
        target = model.backend.asarray(yb, like=model.parameters)
        check.done = False
        check(index, native, target)
    factors = np.ones((1, model.num_params))
    result = influx.compute_influences_up(model, data, factors)
    assert np.all(np.isfinite(to_numpy(result)))


def test_a_backend_without_the_optional_methods_is_not_checked() -> None:
    """``value_and_grad`` and ``grad`` are optional: without them, no check."""

    class Neither:
        pass

    class GradOnly:
        def grad(self, x: Any, y: Any) -> Any:
            raise AssertionError

    assert LossConventionCheck(Neither(), "training_data").done  # type: ignore[arg-type]
    assert not LossConventionCheck(GradOnly(), "training_data").done  # type: ignore[arg-type]


class _GradOnly:
    """A wrapper exposing the protocol and ``grad`` but no ``value_and_grad``."""

    def __init__(self, model: Any) -> None:
        self._model = model
        for name in ("backend", "num_params", "dtype", "parameters"):
            setattr(self, name, getattr(model, name))
        self.loss = model.loss

    def per_sample_grads(self, x: Any, y: Any) -> Any:
        return self._model.per_sample_grads(x, y)

    def grad(self, x: Any, y: Any) -> Any:
        return self._model.value_and_grad(x, y)[1]

    def hvp(self, x: Any, y: Any, vectors: Any) -> Any:
        return self._model.hvp(x, y, vectors)

    def mixed_grads(self, x: Any, y: Any, vectors: Any) -> Any:
        return self._model.mixed_grads(x, y, vectors)


def test_gradient_alone_detects_a_sum(backend_name: str) -> None:
    model = _GradOnly(_wrap(backend_name, _sum_loss(backend_name)))
    assert isinstance(model, influx.TwiceDifferentiable)
    x, y = _data()
    with pytest.raises(
        influx.InputError,
        match=r"the gradient of the batch loss is 6\.0x the mean of the per-sample "
        r"ones: a sum reduction\?",
    ):
        influx.compute_influences(model, influx.batches(x, y, batch_size=6))
    fine = _GradOnly(_wrap(backend_name, _mse(backend_name)))
    influx.compute_influences_up(
        fine, influx.batches(x, y, batch_size=6), np.ones((1, fine.num_params))
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_compared_in_float32(dtype: str) -> None:
    """A half-precision mean passes at the half dtype's tolerance; a sum does not."""
    torch = pytest.importorskip("torch")
    x, y = _data(n=8)
    half = getattr(torch, dtype)
    xs, ys = torch.tensor(x, dtype=half), torch.tensor(y, dtype=half)
    for reduction in ("mean", "sum"):
        module = raw_model("torch", LAYERS, "float32")[0].to(half)
        model = influx.twice_differentiable(
            module, torch.nn.MSELoss(reduction=reduction)
        )
        check = LossConventionCheck(model, "training_data")
        if reduction == "mean":
            check(0, xs, ys)
        else:
            with pytest.raises(influx.InputError, match=r"8\.0x .*a sum reduction"):
                check(0, xs, ys)
