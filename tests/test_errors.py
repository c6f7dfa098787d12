"""Every bad input gets a clear error that names the argument and the fix.

Errors are :class:`influx.InputError` (a ``ValueError``) for bad values and
``TypeError`` for the wrong kind of object.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from models import (
    linear_weights,
    mse_loss,
    raw_model,
    to_backend,
    to_numpy,
    wrap_mlp,
)

import influx

IN_DIM, OUT_DIM = 3, 2
LAYERS = [linear_weights(IN_DIM, OUT_DIM)]
P = IN_DIM * OUT_DIM + OUT_DIM


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((10, IN_DIM)), rng.standard_normal((10, OUT_DIM))


@pytest.fixture
def model(backend_name: str) -> influx.TwiceDifferentiable:
    return wrap_mlp(backend_name, LAYERS)


def _batches(x: np.ndarray, y: np.ndarray, size: int = 4) -> list[tuple[Any, Any]]:
    """A user-made list of ``(x, y)`` batches."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# -- empty data and mismatched lengths -----------------------------------------


def test_empty_training_data(model: Any, arrays: Any) -> None:
    x, y = arrays
    with pytest.raises(influx.InputError, match=r"training_data is empty \(0 batches"):
        influx.compute_influences(model, [])
    with pytest.raises(influx.InputError, match=r"training_data is empty \(2 batches"):
        influx.compute_influences(model, [(x[:0], y[:0]), (x[:0], y[:0])])
    # Empty training data with non-empty test data: the Hessian step says so.
    with pytest.raises(influx.InputError, match="training_data is empty"):
        influx.compute_influences(model, [], test_data=_batches(x, y))
    with pytest.raises(influx.InputError, match="x and y are empty"):
        influx.batches(x[:0], y[:0])


def test_empty_batches_among_full_ones_are_skipped(model: Any, arrays: Any) -> None:
    x, y = arrays
    data = _batches(x, y)
    padded = [(x[:0], y[:0]), *data[:2], (x[:0], y[:0]), data[2]]
    np.testing.assert_allclose(
        to_numpy(influx.compute_influences(model, padded)),
        to_numpy(influx.compute_influences(model, data)),
        rtol=1e-12,
    )


def test_empty_test_and_input_data_name_their_argument(model: Any, arrays: Any) -> None:
    data = _batches(*arrays)
    with pytest.raises(influx.InputError, match="test_data is empty"):
        influx.compute_influences(model, data, test_data=[])
    with pytest.raises(influx.InputError, match="input_data is empty"):
        influx.compute_influences(model, data, input_data=[])


def test_x_and_y_of_different_lengths(model: Any, arrays: Any) -> None:
    x, y = arrays
    with pytest.raises(
        influx.InputError, match=r"x and y must have the same number.*10 inputs and 9"
    ):
        influx.batches(x, y[:9], batch_size=4)
    bad = [(x[:4], y[:4]), (x[4:8], y[4:7])]
    with pytest.raises(
        influx.InputError,
        match=r"training_data batch 1: x has 4 points but y has 3.*one target per",
    ):
        influx.compute_influences(model, bad)
    with pytest.raises(influx.InputError, match=r"test_data batch 1: x has 4"):
        influx.compute_influences(model, _batches(x, y), test_data=bad)
    with pytest.raises(influx.InputError, match=r"input_data batch 1: x has 4"):
        influx.compute_influences(model, _batches(x, y), input_data=bad)


def test_bad_batch_size(arrays: Any) -> None:
    x, y = arrays
    with pytest.raises(influx.InputError, match="batch_size must be at least 1"):
        influx.batches(x, y, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be a positive int"):
        influx.batches(x, y, batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x must be an array with a leading batch"):
        influx.batches([[1.0, 2.0]], y[:1])


# -- data that does not fit the model ------------------------------------------


def _raised_with_context(
    call: Any, where: str, shape: tuple[int, ...]
) -> BaseException:
    """The framework's own error of ``call``, with influx's note of ``where``.

    influx does not relabel it (no InputError, no guessed cause); on Python
    3.11+ it adds a note naming the data argument, the batch and the shape.
    """
    with pytest.raises((RuntimeError, TypeError, ValueError)) as info:
        call()
    error = info.value
    assert not isinstance(error, influx.InputError), error
    assert "influx" not in str(error)
    if sys.version_info >= (3, 11):
        notes = getattr(error, "__notes__", [])
        assert f"{where} (inputs of shape {shape})" in " ".join(notes), notes
    return error


def test_inputs_that_do_not_fit_the_model(model: Any, arrays: Any) -> None:
    # Changed on purpose (issue 7): the framework's error keeps its type and
    # message; influx adds the argument, batch and shape as a note.
    x, y = arrays
    wide = np.ones((2, IN_DIM + 2))
    bad = [*_batches(x, y), (wide, y[:2])]  # batch 3 of 4 does not fit
    good = _batches(x, y)
    shape = (2, IN_DIM + 2)
    _raised_with_context(
        lambda: influx.compute_influences(model, bad), "training_data batch 3", shape
    )
    # Bad training data behind good test data: raised by the Hessian step.
    _raised_with_context(
        lambda: influx.compute_influences(model, bad, test_data=good),
        "training_data batch 3",
        shape,
    )
    _raised_with_context(
        lambda: influx.compute_influences(model, good, test_data=bad),
        "test_data batch 3",
        shape,
    )
    for kind in ("up", "perturbation"):
        _raised_with_context(
            lambda kind=kind: influx.compute_influences(
                model, good, input_data=bad, influence_type=kind
            ),
            "input_data batch 3",
            shape,
        )


def test_errors_of_the_users_code_keep_their_type(backend_name: str) -> None:
    """An exception from the user's loss is neither relabelled nor guessed at."""
    module, params = raw_model(backend_name, LAYERS)
    base = mse_loss(backend_name)

    class LossBug(Exception):
        pass

    def loss(pred: Any, y: Any) -> Any:
        # Both backends evaluate the loss on a batch of one for the per-sample
        # losses (JAX pads batches to buckets, so no other shape is certain).
        if pred.shape[0] == 1:
            raise LossBug("bug in the user's loss")
        return base(pred, y)

    model = influx.twice_differentiable(module, loss, params=params)
    rng = np.random.default_rng(0)
    data = _batches(rng.standard_normal((7, IN_DIM)), rng.standard_normal((7, 2)))
    with pytest.raises(LossBug) as info:
        influx.compute_influences(model, data)
    assert str(info.value) == "bug in the user's loss"
    if sys.version_info >= (3, 11):
        assert "training_data batch 0 (inputs of shape (4, 3))" in " ".join(
            info.value.__notes__
        )


def test_each_batch_must_be_an_x_y_pair(model: Any, arrays: Any) -> None:
    x, y = arrays
    # A bare (x, y) tuple iterates over x's rows: batch 0 is an array, not a pair.
    with pytest.raises(TypeError, match=r"batch 0 is a ndarray.*influx\.batches"):
        influx.compute_influences(model, (x, y))
    with pytest.raises(TypeError, match=r"training_data batch 0 is a tuple.*pair"):
        influx.compute_influences(model, [(x, y, y)])
    with pytest.raises(TypeError, match=r"training_data batch 0 is a dict"):
        influx.compute_influences(model, [{"x": x, "y": y}])


def test_one_shot_iterators_are_rejected(model: Any, arrays: Any) -> None:
    data = influx.batches(*arrays, batch_size=4)
    fix = r"Pass a list of \(x, y\) batches, a DataLoader or influx\.batches"
    with pytest.raises(
        TypeError, match=rf"training_data is a one-shot iterator.*{fix}"
    ):
        influx.compute_influences(model, (batch for batch in data))
    with pytest.raises(TypeError, match=rf"test_data is a one-shot iterator.*{fix}"):
        influx.compute_influences(model, data, test_data=iter(list(data)))
    with pytest.raises(TypeError, match=rf"input_data is a one-shot iterator.*{fix}"):
        influx.compute_influences(model, data, input_data=map(tuple, data))
    with pytest.raises(TypeError, match="training_data must be a re-iterable"):
        influx.compute_influences(model, 3)


def test_other_framework_data_is_converted(backend_name: str, arrays: Any) -> None:
    # DESIGN.md: data is converted to the model's framework (a torch DataLoader
    # may feed a JAX model); only the model itself is tied to its framework.
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    model = wrap_mlp(backend_name, LAYERS)
    other = "jax" if backend_name == "torch" else "torch"
    x, y = arrays
    expected = to_numpy(influx.compute_influences(model, _batches(x, y)))
    foreign = influx.batches(to_backend(other, x), to_backend(other, y), batch_size=4)
    np.testing.assert_allclose(
        to_numpy(influx.compute_influences(model, foreign)), expected, rtol=1e-12
    )
    # Only y foreign, in a later batch of the input data.
    mixed = [(x[:4], y[:4]), (x[4:], to_backend(other, y[4:]))]
    result = influx.compute_influences(model, _batches(x, y), input_data=mixed)
    np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-12)


def test_own_framework_arrays_are_accepted(backend_name: str, arrays: Any) -> None:
    model = wrap_mlp(backend_name, LAYERS)
    x, y = arrays
    native = influx.batches(to_backend(backend_name, x), to_backend(backend_name, y))
    np.testing.assert_allclose(
        to_numpy(influx.compute_influences(model, native)),
        to_numpy(influx.compute_influences(model, influx.batches(x, y))),
        rtol=1e-12,
    )


# -- options -------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")])
def test_bad_hessian_regularization(model: Any, arrays: Any, value: float) -> None:
    data = _batches(*arrays)
    fix = r"must be a finite number >= 0.*Use 0 for no regularisation"
    with pytest.raises(influx.InputError, match=rf"hessian_regularization {fix}"):
        influx.compute_influences(model, data, hessian_regularization=value)
    with pytest.raises(influx.InputError, match=rf"hessian_perturbation {fix}"):
        influx.compute_influence_factors(
            model, data, data, "direct", hessian_perturbation=value
        )


def test_hessian_regularization_must_be_a_number(model: Any, arrays: Any) -> None:
    with pytest.raises(TypeError, match="hessian_regularization must be a number"):
        influx.compute_influences(
            model,
            _batches(*arrays),
            hessian_regularization="small",  # type: ignore[arg-type]
        )


def test_unknown_inversion_method_and_influence_type(model: Any, arrays: Any) -> None:
    data = _batches(*arrays)
    with pytest.raises(
        influx.InputError,
        match=r"Unknown inversion_method 'newton'\. Valid values: 'direct', 'cg', "
        r"'lissa', 'arnoldi'",
    ):
        influx.compute_influences(model, data, inversion_method="newton")
    with pytest.raises(
        influx.InputError,
        match=r"Unknown influence_type 'down'\. Valid values: 'up', 'perturbation'",
    ):
        influx.compute_influences(model, data, influence_type="down")
    with pytest.raises(influx.InputError, match="Unknown inversion_method 'newton'"):
        influx.compute_influence_factors(model, data, data, "newton")
    # Case and surrounding spaces do not matter; enum members work too.
    np.testing.assert_allclose(
        to_numpy(influx.compute_influences(model, data, inversion_method=" DIRECT ")),
        to_numpy(
            influx.compute_influences(
                model, data, inversion_method=influx.InversionMethod.Direct
            )
        ),
    )


def test_unknown_solver_option(model: Any, arrays: Any) -> None:
    data = _batches(*arrays)
    with pytest.raises(
        TypeError,
        match=r"Unknown option 'maxiters' for inversion method 'cg'\. "
        r"Valid options: rtol, atol, maxiter, x0",
    ):
        influx.compute_influences(model, data, inversion_method="cg", maxiters=5)
    with pytest.raises(
        TypeError, match=r"Unknown options 'rtol', 'tol' for inversion method 'direct'"
    ):
        influx.compute_influences(model, data, rtol=1e-3, tol=1e-3)
    with pytest.raises(TypeError, match=r"'direct'\. Valid options: none"):
        influx.compute_influences(model, data, rtol=1e-3)


# -- the model and its loss ----------------------------------------------------


def test_non_finite_model_parameters(backend_name: str) -> None:
    weight, bias = LAYERS[0]
    weight = weight.copy()
    weight[1, 0] = np.nan
    module, params = raw_model(backend_name, [(weight, bias)])
    # The core names the parameter, by the adapter's parameter_blocks.
    name = r"0\.weight" if backend_name == "torch" else r"\[0\]\['w'\]"
    match = rf"model parameters {name} hold NaN or inf values \(1 of 8 entries\)"
    with pytest.raises(influx.InputError, match=match + ".*Check the training"):
        influx.twice_differentiable(module, mse_loss(backend_name), params=params)


def test_loss_that_is_nan_on_some_batch(model: Any, arrays: Any) -> None:
    x, y = arrays
    y_nan = y.copy()
    y_nan[6, 1] = np.nan  # batch 1 of [0:4], [4:8], [8:10]
    bad = _batches(x, y_nan)
    fix = "Check the inputs and targets of this batch"
    with pytest.raises(
        influx.InputError,
        match=rf"training_data batch 1: the loss is not finite.*{fix}",
    ):
        influx.compute_influences(model, bad)
    with pytest.raises(influx.InputError, match=r"test_data batch 1: the loss is not"):
        influx.compute_influences(model, _batches(x, y), test_data=bad)
    with pytest.raises(influx.InputError, match=r"input_data batch 1: the loss is not"):
        influx.compute_influences(model, _batches(x, y), input_data=bad)
    with pytest.raises(
        influx.InputError,
        match=r"input_data batch 1: the perturbation influence is not finite",
    ):
        influx.compute_influences(
            model, _batches(x, y), input_data=bad, influence_type="perturbation"
        )
    factors = influx.compute_influence_factors(model, _batches(x, y), bad[:1], "cg")
    with pytest.raises(influx.InputError, match=r"input_data batch 1: the perturb"):
        influx.compute_influences_pert(model, bad, factors)
    # NaN inputs also poison the Hessian, which is read before good test points.
    x_nan = x.copy()
    x_nan[9, 0] = np.nan
    bad_inputs = _batches(x_nan, y)
    good = _batches(x, y)
    with pytest.raises(
        influx.InputError, match=r"training_data batch 2: the Hessian is not finite"
    ):
        influx.compute_influences(model, bad_inputs, test_data=good, input_data=good)
    with pytest.raises(
        influx.InputError,
        match=r"training_data batch 2: the Hessian-vector product is not finite",
    ):
        influx.compute_influences(
            model, bad_inputs, test_data=good, input_data=good, inversion_method="cg"
        )


def test_non_scalar_loss(backend_name: str, arrays: Any) -> None:
    module, params = raw_model(backend_name, LAYERS)
    if backend_name == "torch":
        import torch

        loss = torch.nn.MSELoss(reduction="none")
    else:

        def loss(pred: Any, y: Any) -> Any:
            return (pred - y) ** 2  # forgot the mean

    model = influx.twice_differentiable(module, loss, params=params)
    with pytest.raises(
        influx.InputError, match=r"loss must return a scalar \(the mean over the batch"
    ):
        influx.compute_influences(model, _batches(*arrays))


def test_loss_must_be_callable(backend_name: str) -> None:
    module, params = raw_model(backend_name, LAYERS)
    with pytest.raises(TypeError, match=r"loss must be a callable loss\(predictions"):
        influx.twice_differentiable(module, "mse", params=params)  # type: ignore[arg-type]


def test_unwrapped_model_is_rejected(backend_name: str, arrays: Any) -> None:
    module, _ = raw_model(backend_name, LAYERS)
    data = _batches(*arrays)
    fix = r"Wrap it first: influx\.twice_differentiable\(model, loss\)"
    with pytest.raises(
        TypeError, match=rf"model must be a twice-differentiable.*{fix}"
    ):
        influx.compute_influences(module, data)
    with pytest.raises(TypeError, match=fix):
        influx.compute_influence_factors(module, data, data, "cg")
    with pytest.raises(TypeError, match=fix):
        influx.compute_influences_up(module, data, np.zeros((1, P)))
    with pytest.raises(TypeError, match=fix):
        influx.compute_influences_pert(module, data, np.zeros((1, P)))


def test_params_belong_to_jax_only(backend_name: str) -> None:
    module, _ = raw_model(backend_name, LAYERS)
    loss = mse_loss(backend_name)
    if backend_name == "torch":
        with pytest.raises(
            TypeError, match=r"params is for JAX.*twice_differentiable\(module, loss\)"
        ):
            influx.twice_differentiable(module, loss, params={"w": np.ones(2)})
        return
    fix = r"twice_differentiable\(apply_fn, loss, params=params\)"
    with pytest.raises(TypeError, match=rf"Cannot tell which framework.*{fix}"):
        influx.twice_differentiable(module, loss)
    with pytest.raises(TypeError, match=rf"The JAX backend needs params=.*{fix}"):
        influx.twice_differentiable(module, loss, backend="jax")
    with influx.use_backend("jax"):
        with pytest.raises(TypeError, match=rf"needs params=.*{fix}"):
            influx.twice_differentiable(module, loss)


def test_influence_factors_of_the_wrong_shape(model: Any, arrays: Any) -> None:
    data = _batches(*arrays)
    fix = r"Compute them with compute_influence_factors for this model"
    for factors in (np.zeros((2, P + 1)), np.zeros(P), np.zeros((2, P, 1))):
        shape = str(factors.shape).replace("(", r"\(").replace(")", r"\)")
        message = (
            rf"influence_factors must have shape \[N, P\] with P={P}.*{shape}.*{fix}"
        )
        with pytest.raises(influx.InputError, match=message):
            influx.compute_influences_up(model, data, factors)
        with pytest.raises(influx.InputError, match=message):
            influx.compute_influences_pert(model, data, factors)


def test_numpy_influence_factors_are_accepted(model: Any, arrays: Any) -> None:
    data = _batches(*arrays)
    factors = influx.compute_influence_factors(model, data, data[:1], "direct")
    as_numpy = to_numpy(factors)
    np.testing.assert_allclose(
        to_numpy(influx.compute_influences_up(model, data, as_numpy)),
        to_numpy(influx.compute_influences_up(model, data, factors)),
        rtol=1e-12,
    )


# -- a torch DataLoader is data like any other ---------------------------------


@pytest.mark.parametrize("kind", ["up", "perturbation"])
def test_torch_dataloader_gives_the_same_values_as_batches(
    arrays: Any, kind: str
) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    model = wrap_mlp("torch", LAYERS)
    x, y = arrays
    loader = DataLoader(
        TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=4
    )
    assert [len(xb) for xb, _ in loader] == [4, 4, 2]  # uneven last batch
    test = influx.batches(x[:3], y[:3], batch_size=2)
    results = [
        to_numpy(
            influx.compute_influences(
                model,
                data,
                test_data=test,
                influence_type=kind,
                inversion_method=method,
                hessian_regularization=0.01,
            )
        )
        for data in (loader, influx.batches(x, y, batch_size=4))
        for method in ("direct", "cg")
    ]
    expected_shape = (3, 10) if kind == "up" else (3, 10, IN_DIM)
    assert results[0].shape == expected_shape
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-12)  # loader vs batches
