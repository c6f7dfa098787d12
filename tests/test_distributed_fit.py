"""``Influence.fit(source, client=...)`` on the session's 2-worker LocalCluster.

Reference: the same Influence fitted in this process without a client, on the
same source. The distributed fit adds the partitions' sums in another order,
so the fitted state and the queries agree up to rounding: checked to 1e-10
(float64) and 1e-5 relative (float32). The source has 37 points in partitions
of 12 (12, 12, 12, 1) and batches of 4 (the last of 1): an uneven last
partition and batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from models import mlp_weights, to_numpy, wrap_mlp

import influx
from influx._executor import LocalExecutor
from influx.solvers.preconditioners import NystromPreconditioner

pytest.importorskip("distributed")

N_TRAIN, N_TEST, BATCH, PARTITION = 37, 5, 4, 12
REG = 0.5
TOL = {"float64": 1e-10, "float32": 1e-5}

#: (method, options, curvature) fitted in both ways.
CASES = [
    ("direct", {}, None),
    ("direct", {}, "ggn"),
    ("cg", {"preconditioner": None}, None),
    ("cg", {"preconditioner": NystromPreconditioner(rank=6, seed=1)}, "ggn"),
    ("arnoldi", {"rank_estimate": 8, "seed": 2}, None),
    ("block", {}, None),
    ("kfac", {"fisher": "mc", "mc_samples": 2}, None),
    ("kfac", {"fisher": "empirical"}, None),
    ("kfac", {"fisher": "ggn"}, None),
    ("ekfac", {"fisher": "mc"}, None),
    ("ekfac", {"fisher": "empirical"}, None),
    ("ekfac", {"fisher": "ggn"}, None),
    ("lissa", {"seed": 3, "maxiter": 40, "rtol": 0.05}, "ggn"),
]


def training_arrays(dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """The training points (also read by a FactorySource on the workers)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_TRAIN, 3)).astype(dtype)
    y = rng.integers(0, 2, N_TRAIN)
    return x, y


def _problem(backend_name: str, dtype: str = "float64") -> tuple[Any, Any, Any]:
    x, y = training_arrays(dtype)
    model = wrap_mlp(
        backend_name, mlp_weights((3, 5, 2), seed=1), "cross_entropy", dtype
    )
    train = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    rng = np.random.default_rng(5)
    xt = rng.standard_normal((N_TEST, 3)).astype(dtype)
    test = influx.batches(xt, rng.integers(0, 2, N_TEST), batch_size=N_TEST)
    return model, train, test


def _close(actual: Any, expected: Any, dtype: str = "float64") -> None:
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape
    scale = max(1e-300, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * scale)


def _state_arrays(inf: influx.Influence) -> list[Any]:
    """Arrays of the fitted state that do not depend on eigenvector signs."""
    state = inf._fitted.state
    method = inf.method
    if method == "direct":
        return [state.matrix]
    if method == "block":
        return [block.matrix for block in state.blocks]
    if method in ("kfac", "ekfac"):
        found = [state.rest_diagonal, *state.eigenvalues]
        for index in range(len(state.layer_names)):
            found.extend(state.factors(index))
        return found
    if method == "arnoldi":
        return [state.eigenvalues]
    return []


def _fit_both(
    model: Any, train: Any, method: str, options: dict, curvature: Any, client: Any
):
    kwargs = dict(curvature=curvature, **options)
    here = influx.Influence(model, method, REG, **kwargs).fit(train)
    there = influx.Influence(model, method, REG, **kwargs).fit(train, client=client)
    return here, there


@pytest.mark.parametrize(
    ("method", "options", "curvature"),
    CASES,
    ids=[f"{m}-{o.get('fisher', 'preconditioner' in o)}-{c}" for m, o, c in CASES],
)
def test_fit_equals_single_process(
    backend_name: str,
    method: str,
    options: dict,
    curvature: Any,
    dask_client: Any,
) -> None:
    model, train, test = _problem(backend_name)
    here, there = _fit_both(model, train, method, options, curvature, dask_client)
    assert there.num_training_samples == N_TRAIN
    for actual, expected in zip(_state_arrays(there), _state_arrays(here), strict=True):
        _close(actual, expected)
    _close(there.factors(test), here.factors(test))
    train_batches = list(train)  # the query itself runs here, without a client
    _close(there.influences(test, train_batches), here.influences(test, train_batches))


@pytest.mark.parametrize("method", ["direct", "kfac"])
def test_float32_fit_equals_single_process(
    backend_name: str, method: str, dask_client: Any
) -> None:
    model, train, test = _problem(backend_name, "float32")
    here, there = _fit_both(model, train, method, {}, None, dask_client)
    for actual, expected in zip(_state_arrays(there), _state_arrays(here), strict=True):
        _close(actual, expected, "float32")
    _close(there.factors(test), here.factors(test), "float32")


def test_factory_source_and_work_on_both_workers(
    backend_name: str, dask_client: Any
) -> None:
    from distributed import get_task_stream

    model, _, test = _problem(backend_name)
    train = influx.FactorySource(
        "test_distributed_fit:training_arrays",
        batch_size=BATCH,
        partition_size=PARTITION,
    )
    here = influx.Influence(model, "direct", REG).fit(train)
    with get_task_stream(dask_client) as stream:
        there = influx.Influence(model, "direct", REG).fit(train, client=dask_client)
    dense = [t for t in stream.data if t["key"].startswith("_dense_task")]
    assert len(dense) == train.num_partitions == 4
    _close(there.factors(test), here.factors(test))
    _close(_state_arrays(there)[0], _state_arrays(here)[0])


def test_in_process_executor_takes_the_same_path(backend_name: str) -> None:
    model, train, test = _problem(backend_name)
    here, there = _fit_both(model, train, "ekfac", {}, None, LocalExecutor())
    for actual, expected in zip(_state_arrays(there), _state_arrays(here), strict=True):
        _close(actual, expected)
    _close(there.factors(test), here.factors(test))


def test_lissa_same_seed_same_result(backend_name: str, dask_client: Any) -> None:
    model, train, test = _problem(backend_name)
    options = {"seed": 7, "maxiter": 30, "rtol": 0.05}
    first = influx.Influence(model, "lissa", 1.0, **options).fit(
        train, client=dask_client
    )
    second = influx.Influence(model, "lissa", 1.0, **options).fit(
        train, client=dask_client
    )
    np.testing.assert_array_equal(
        to_numpy(first.factors(test)), to_numpy(second.factors(test))
    )


def test_error_in_a_partition_names_its_global_batch(
    backend_name: str, dask_client: Any
) -> None:
    model, _, _ = _problem(backend_name)
    x, y = training_arrays()
    x[29, 1] = np.nan  # partition 2, global batch 7
    train = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    with pytest.raises(influx.InputError, match="training_data batch 7"):
        influx.Influence(model, "direct", REG).fit(train, client=dask_client)
    with pytest.raises(influx.InputError, match="training_data batch 7"):
        influx.Influence(model, "kfac", REG).fit(train, client=dask_client)


def test_loss_convention_checked_on_the_client() -> None:
    torch = pytest.importorskip("torch")

    x, y = training_arrays()
    network = torch.nn.Linear(3, 2, dtype=torch.float64)
    model = influx.twice_differentiable(
        network, torch.nn.CrossEntropyLoss(reduction="sum")
    )
    train = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    for method in ("direct", "kfac"):
        with pytest.raises(influx.InputError, match="mean"):
            influx.Influence(model, method, REG).fit(train, client=LocalExecutor())


def test_client_needs_a_source(backend_name: str) -> None:
    model, train, _ = _problem(backend_name)
    with pytest.raises(influx.InputError, match=r"influx\.ArraySource"):
        influx.Influence(model, "direct", REG).fit(list(train), client=LocalExecutor())
    with pytest.raises(TypeError, match=r"dask\.distributed\.Client"):
        influx.Influence(model, "direct", REG).fit(train, client="tcp://nowhere:8786")


def test_block_sums_each_partition_once(backend_name: str, dask_client: Any) -> None:
    from distributed import get_task_stream

    x, y = training_arrays()
    # 602 parameters: blocks of 400 and 202 over three chunks of columns
    model = wrap_mlp(backend_name, mlp_weights((3, 100, 2), seed=2), "cross_entropy")
    train = influx.ArraySource(x, y, batch_size=BATCH, partition_size=PARTITION)
    here = influx.Influence(model, "block", REG).fit(train)
    with get_task_stream(dask_client) as stream:
        there = influx.Influence(model, "block", REG).fit(train, client=dask_client)
    keys = [task["key"] for task in stream.data]
    assert sum(key.startswith("_block_task") for key in keys) == train.num_partitions
    assert not any(key.startswith("_product_task") for key in keys)
    assert there._fitted.operator.base.num_passes == 1
    for actual, expected in zip(_state_arrays(there), _state_arrays(here), strict=True):
        _close(actual, expected)
