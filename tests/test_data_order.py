"""Influences do not depend on how the data is batched or ordered.

Rows (test points) and columns (input points) come back in dataset order;
a torch ``DataLoader`` that shuffles is read in its dataset's order, and data
whose order changes between passes is refused where the order matters.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import linear_weights, mlp_weights, to_backend, to_numpy, wrap_mlp

import influx
from influx.errors import InputError

N = 7
RTOL = 1e-8
REG = 2.0
KINDS = ("linear", "mlp")

property_settings = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _host_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return rng.standard_normal((N, 3)), rng.standard_normal((N, 1))


@functools.cache
def _model(backend_name: str, kind: str) -> influx.TwiceDifferentiable:
    """One wrapper per backend and kind, so that JAX compiles each shape once."""
    if kind == "linear":
        return wrap_mlp(backend_name, [linear_weights(3, 1, seed=2)])
    return wrap_mlp(backend_name, mlp_weights((3, 2, 1), seed=2))


@functools.cache
def _reference(backend_name: str, kind: str) -> np.ndarray:
    """``[N, N]`` influences from one sequential batch."""
    x, y = _host_data()
    data = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    result = influx.compute_influences(
        _model(backend_name, kind), data, hessian_regularization=REG
    )
    return to_numpy(result)


def _assert_reference(result: Any, backend_name: str, kind: str = "linear") -> None:
    expected = _reference(backend_name, kind)
    np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=0)


def _split(
    backend_name: str, order: np.ndarray, cuts: list[int]
) -> list[tuple[Any, Any]]:
    """The points ``order`` as a list of batches split at ``cuts``."""
    x, y = _host_data()
    bounds = [0, *sorted(cuts), len(order)]
    return [
        (
            to_backend(backend_name, x[order[a:b]]),
            to_backend(backend_name, y[order[a:b]]),
        )
        for a, b in itertools.pairwise(bounds)
    ]


cuts = st.lists(st.integers(1, N - 1), unique=True, max_size=4)


@property_settings
@given(
    kind=st.sampled_from(KINDS),
    train_order=st.permutations(range(N)),
    train_cuts=cuts,
    test_cuts=cuts,
    input_cuts=cuts,
)
def test_batches_and_training_order_do_not_matter(
    backend_name: str,
    kind: str,
    train_order: list[int],
    train_cuts: list[int],
    test_cuts: list[int],
    input_cuts: list[int],
) -> None:
    sequential = np.arange(N)
    result = influx.compute_influences(
        _model(backend_name, kind),
        _split(backend_name, np.array(train_order), train_cuts),
        test_data=_split(backend_name, sequential, test_cuts),
        input_data=_split(backend_name, sequential, input_cuts),
        hessian_regularization=REG,
    )
    _assert_reference(result, backend_name, kind)


def _loader(**options: Any) -> Any:
    torch = pytest.importorskip("torch")
    x, y = _host_data()
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    return torch.utils.data.DataLoader(dataset, **options)


def _generator(seed: int) -> Any:
    torch = pytest.importorskip("torch")
    return torch.Generator().manual_seed(seed)


@property_settings
@given(
    kind=st.sampled_from(KINDS),
    train_batch=st.integers(1, N),
    test_batch=st.integers(1, N),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shuffling_loaders_give_dataset_order(
    backend_name: str,
    kind: str,
    train_batch: int,
    test_batch: int,
    drop_last: bool,
    seed: int,
) -> None:
    # A torch DataLoader feeds a model of either backend.
    training = _loader(
        batch_size=train_batch,
        shuffle=True,
        drop_last=drop_last,
        generator=_generator(seed),
    )
    test = _loader(batch_size=test_batch, shuffle=True, generator=_generator(seed + 1))
    result = influx.compute_influences(
        _model(backend_name, kind), training, test_data=test, hessian_regularization=REG
    )
    _assert_reference(result, backend_name, kind)


def test_shuffled_loader_as_test_data(backend_name: str) -> None:
    x, y = _host_data()
    training = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    test = _loader(batch_size=4, shuffle=True, generator=_generator(0))
    result = influx.compute_influences(
        _model(backend_name, "linear"),
        training,
        test_data=test,
        hessian_regularization=REG,
    )
    _assert_reference(result, backend_name)


def test_shuffled_loader_as_default_input_data(backend_name: str) -> None:
    x, y = _host_data()
    test = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    training = _loader(batch_size=4, shuffle=True, generator=_generator(1))
    result = influx.compute_influences(
        _model(backend_name, "linear"),
        training,
        test_data=test,
        hessian_regularization=REG,
    )
    _assert_reference(result, backend_name)


def test_drop_last_keeps_every_point_and_cg_sees_one_operator(
    backend_name: str,
) -> None:
    # Shuffling with drop_last would change the operator between CG steps.
    training = _loader(batch_size=4, shuffle=True, drop_last=True)
    result = influx.compute_influences(
        _model(backend_name, "linear"),
        training,
        inversion_method="cg",
        hessian_regularization=REG,
        rtol=1e-12,
        atol=0.0,
    )
    _assert_reference(result, backend_name)


def test_subset_random_sampler_reads_its_indices_in_order(backend_name: str) -> None:
    torch = pytest.importorskip("torch")
    indices = [4, 0, 6, 2]
    sampler = torch.utils.data.SubsetRandomSampler(indices, generator=_generator(2))
    x, y = _host_data()
    training = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    result = influx.compute_influences(
        _model(backend_name, "linear"),
        training,
        input_data=_loader(batch_size=3, sampler=sampler),
        hessian_regularization=REG,
    )
    expected = _reference(backend_name, "linear")[:, indices]
    np.testing.assert_allclose(to_numpy(result), expected, rtol=RTOL, atol=0)


def test_sampler_with_replacement_is_refused(backend_name: str) -> None:
    torch = pytest.importorskip("torch")
    loader = _loader(batch_size=3)
    sampler = torch.utils.data.RandomSampler(loader.dataset, replacement=True)
    with pytest.raises(InputError, match=r"training_data.*with replacement"):
        influx.compute_influences(
            _model(backend_name, "linear"),
            _loader(batch_size=3, sampler=sampler),
            hessian_regularization=REG,
        )


class _ShufflingBatchSampler:
    """Batches of 3 indices over ``range(N)``, in a new order on every pass."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(4)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.rng.permutation(N).tolist()
        return iter([order[i : i + 3] for i in range(0, N, 3)])

    def __len__(self) -> int:
        return -(-N // 3)


def test_shuffling_custom_batch_sampler(backend_name: str) -> None:
    model = _model(backend_name, "linear")
    x, y = _host_data()
    sequential = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    # Only the Hessian reads it: the order is harmless.
    result = influx.compute_influences(
        model,
        _loader(batch_sampler=_ShufflingBatchSampler()),
        test_data=sequential,
        input_data=sequential,
        hessian_regularization=REG,
    )
    _assert_reference(result, backend_name)
    # A result axis: refused, with the fix.
    with pytest.raises(InputError, match=r"test_data.*batch_sampler.*shuffle=False"):
        influx.compute_influences(
            model,
            sequential,
            test_data=_loader(batch_sampler=_ShufflingBatchSampler()),
            hessian_regularization=REG,
        )


class _Reshuffling:
    """A re-iterable of three batches that shuffles its points on every pass."""

    def __init__(self, backend_name: str) -> None:
        self.backend_name = backend_name
        self.rng = np.random.default_rng(5)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        order = self.rng.permutation(N)
        return iter(_split(self.backend_name, order, [3, 5]))


@pytest.mark.parametrize("argument", ["input_data", "test_data"])
def test_reshuffling_iterable_as_result_axis_is_refused(
    backend_name: str, argument: str
) -> None:
    x, y = _host_data()
    sequential = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    with pytest.raises(InputError, match=f"{argument} yields different batches"):
        influx.compute_influences(
            _model(backend_name, "linear"),
            sequential,
            hessian_regularization=REG,
            **{argument: _Reshuffling(backend_name)},
        )


def test_reshuffling_training_data(backend_name: str) -> None:
    model = _model(backend_name, "linear")
    x, y = _host_data()
    sequential = [(to_backend(backend_name, x), to_backend(backend_name, y))]
    # Read only for the Hessian: fine.
    result = influx.compute_influences(
        model,
        _Reshuffling(backend_name),
        test_data=sequential,
        input_data=sequential,
        inversion_method="cg",
        hessian_regularization=REG,
        rtol=1e-12,
        atol=0.0,
    )
    _assert_reference(result, backend_name)
    # Also the default test and input data: refused, naming the argument.
    with pytest.raises(InputError, match="training_data yields different batches"):
        influx.compute_influences(
            model, _Reshuffling(backend_name), hessian_regularization=REG
        )
