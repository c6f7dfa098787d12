"""method="block": the exact operator restricted to per-group diagonal blocks.

References are dense numpy float64: the full Hessian of the training loss (one
batch of all points, ``torch.func.hessian`` / ``jax.hessian``), restricted to
the blocks of :func:`influx.layers.parameter_groups` and solved with
``numpy.linalg.solve``. Models with the layer structure come from
``tests/layer_stub.py`` (a numpy layer structure, independent of the
adapters); training batches are uneven (3, 3, 1).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np
import pytest
from layer_stub import CNN_INPUT, Forwarding, cnn_ops, layered, mlp_ops
from models import batch_hessian, rel_err, spd_matrix, to_numpy, wrap_mlp

import influx
from influx.layers import parameter_groups
from influx.operators import DenseOperator
from influx.solvers import block as _block
from influx.solvers.block import BlockSolver

N, BATCH = 7, 3


def data(model_kind: str, dtype: str = "float64") -> tuple[Any, Any, Any, Any]:
    rng = np.random.default_rng(0)
    if model_kind == "cnn":
        x = rng.standard_normal((N, *CNN_INPUT)).astype(dtype)
        y = rng.integers(0, 3, N)
    else:
        x = rng.standard_normal((N, 3)).astype(dtype)
        y = rng.standard_normal((N, 2)).astype(dtype)
    return x, y, influx.batches(x, y, batch_size=BATCH), influx.batches(x, y)


def model_of(backend_name: str, kind: str, dtype: str = "float64") -> Any:
    if kind == "mlp":  # no layer structure: blocks are the parameter tensors
        return wrap_mlp(backend_name, _plain_layers(), dtype=dtype)
    if kind == "mlp_rest":  # layers and a rest parameter (an output scale)
        return layered(
            backend_name, mlp_ops((3, 4, 2), seed=1, scale=True), "mse", dtype
        )
    return layered(backend_name, cnn_ops(seed=1), "cross_entropy", dtype)


def _plain_layers() -> list[tuple[np.ndarray, np.ndarray]]:
    from models import mlp_weights

    return mlp_weights((3, 4, 2), seed=1)


def block_reference(
    model: Any, x: np.ndarray, y: np.ndarray, lam: float
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The regularised Hessian restricted to the groups' blocks, dense [P, P]."""
    hessian = batch_hessian(model, x, y) + lam * np.eye(model.num_params)
    groups = parameter_groups(model)
    reference = np.zeros_like(hessian)
    for _, index in groups:
        reference[np.ix_(index, index)] = hessian[np.ix_(index, index)]
    return reference, groups


def per_sample(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    backend, theta = model.backend, model.parameters
    grads, _ = model.per_sample_grads(
        backend.asarray(x, like=theta), backend.asarray(y)
    )
    return to_numpy(grads)


@pytest.mark.parametrize("kind", ["mlp", "mlp_rest", "cnn"])
def test_block_equals_the_dense_block_diagonal_reference(backend_name, kind):
    model = model_of(backend_name, kind)
    x, y, train, _ = data(kind)
    lam = 2.0  # every block positive definite
    # Fitted first: a fresh JAX wrapper finds its layers on the first batch.
    inf = influx.Influence(model, "block", lam).fit(train)
    reference, groups = block_reference(model, x, y, lam)
    grads = per_sample(model, x, y)
    expected = np.linalg.solve(reference, grads.T).T
    assert rel_err(inf.factors(train), expected) < 1e-10
    assert rel_err(inf.self_influence(train), np.sum(expected * grads, 1)) < 1e-10
    state = inf._fitted.state
    assert state.names == tuple(name for name, _ in groups)
    assert state.positive_definite and inf.info.extra["blocks"] == list(state.names)
    assert np.all(inf.info.relative_residuals < 1e-12)
    if kind != "mlp":  # the layers' weight and bias share one block
        assert len(groups) < len(model.parameter_blocks)


def test_block_float32(backend_name):
    # Against the float64 reference of the same weights (rounded to float32).
    model = model_of(backend_name, "mlp_rest", "float32")
    x, y, train, _ = data("mlp_rest", "float32")
    wide = model_of(backend_name, "mlp_rest")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    reference, _ = block_reference(wide, x64, y64, 2.0)
    grads = per_sample(wide, x64, y64)
    factors = influx.Influence(model, "block", 2.0).fit(train).factors(train)
    assert "float32" in str(factors.dtype)
    assert rel_err(factors, np.linalg.solve(reference, grads.T).T) < 1e-5


class _OneGroup(Forwarding):
    """A wrapped model whose parameters form a single group ("all").

    Without layer structure and parameter blocks.
    """

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        if name in ("parameter_blocks", "layers", "layer_batch"):
            raise AttributeError(name)
        return getattr(self._model, name)


def test_one_group_is_the_direct_solve(backend_name):
    model = _OneGroup(model_of(backend_name, "mlp"))
    _, _, train, _ = data("mlp")
    assert [name for name, _ in parameter_groups(model)] == ["all"]
    block = influx.Influence(model, "block", 0.5).fit(train).factors(train)
    direct = influx.Influence(model, "direct", 0.5).fit(train).factors(train)
    assert rel_err(block, to_numpy(direct)) < 1e-12


class _Groups:
    """A stand-in model: ``num_params`` and ``parameter_blocks`` only."""

    def __init__(self, sizes: list[int]) -> None:
        self.num_params = sum(sizes)
        self.parameter_blocks = [(f"p{i}", n) for i, n in enumerate(sizes)]


def _block_diagonal(sizes: list[int], eigenvalues: list[list[float]]) -> np.ndarray:
    matrix = np.zeros((sum(sizes), sum(sizes)))
    start = 0
    for seed, (size, values) in enumerate(zip(sizes, eigenvalues, strict=True)):
        stop = start + size
        matrix[start:stop, start:stop] = spd_matrix(values, seed=seed)
        start = stop
    return matrix


def test_non_positive_definite_block_falls_back_as_direct():
    # Block p1 is indefinite but nonsingular: its eigen fallback inverts it
    # exactly; the warning names it and says what to raise.
    sizes = [3, 4, 2]
    eigenvalues = [[1.0, 2.0, 3.0], [-2.0, -0.5, 1.0, 2.0], [0.5, 4.0]]
    exact = _block_diagonal(sizes, eigenvalues)
    rng = np.random.default_rng(1)
    coupling = 0.1 * rng.standard_normal((9, 9))  # dropped between the blocks
    matrix = exact.copy()
    mask = exact == 0
    matrix[mask] = (coupling + coupling.T)[mask]
    operator = DenseOperator(matrix, frozenset({"symmetric"}))
    with pytest.warns(influx.NotPositiveDefiniteWarning, match="block 'p1'") as rec:
        state = BlockSolver().init(operator, model=_Groups(sizes))
    assert len(rec) == 1 and "hessian_regularization" in str(rec[0].message)
    assert [b.positive_definite for b in state.blocks] == [True, False, True]
    assert state.min_eigenvalue == pytest.approx(-2.0, rel=1e-12)
    rhs = rng.standard_normal((5, 9))
    x, info = BlockSolver().solve(state, rhs)
    assert rel_err(x, np.linalg.solve(exact, rhs.T).T) < 1e-12
    assert info.extra["positive_definite"] is False
    assert np.all(info.relative_residuals < 1e-12)
    quadratic = _block.quadratic_form(state, rhs)
    assert rel_err(quadratic, np.sum(np.linalg.solve(exact, rhs.T).T * rhs, 1)) < 1e-12


@pytest.mark.parametrize("sizes", [[300, 5, 1, 260], [1] * 300, [600]])
def test_products_pack_and_split_blocks_by_256_columns(sizes):
    # Many small blocks share one product; a large block spans several.
    rng = np.random.default_rng(2)
    eigenvalues = [list(rng.uniform(1.0, 2.0, n)) for n in sizes]
    exact = _block_diagonal(sizes, eigenvalues)
    matrix = exact + np.triu(0.01 * (exact == 0), 1) + np.tril(0.01 * (exact == 0), -1)
    products = []

    class Counted(DenseOperator):
        def mv(self, vectors: Any) -> Any:
            products.append(vectors.shape[0])
            return super().mv(vectors)

    state = BlockSolver().init(Counted(matrix), model=_Groups(sizes))
    assert max(products) <= 256 and sum(products) == sum(sizes)
    assert len(products) == -(-sum(sizes) // 256)
    rhs = rng.standard_normal((2, sum(sizes)))
    x, _ = BlockSolver().solve(state, rhs)
    assert rel_err(x, np.linalg.solve(exact, rhs.T).T) < 1e-10


def test_save_and_load_round_trip(backend_name, tmp_path):
    model = model_of(backend_name, "mlp_rest")
    train = data("mlp_rest")[2]
    inf = influx.Influence(model, "block", 1.0).fit(train)
    path = tmp_path / "block.npz"
    inf.save(path)
    loaded = influx.Influence.load(path, model)  # no training data needed
    assert loaded.method == "block"
    assert rel_err(loaded.factors(train), to_numpy(inf.factors(train))) < 1e-14
    assert (
        rel_err(loaded.self_influence(train), to_numpy(inf.self_influence(train)))
        < 1e-14
    )
    assert loaded._fitted.state.names == inf._fitted.state.names


def test_block_needs_the_model_and_a_partition():
    operator = DenseOperator(np.eye(3))
    with pytest.raises(influx.InputError, match="model="):
        BlockSolver().init(operator)
    with pytest.raises(influx.InputError, match="parameters but the operator"):
        BlockSolver().init(operator, model=_Groups([2]))
    overlapping = [("a", np.array([0, 1])), ("b", np.array([1, 2]))]
    with pytest.raises(influx.InputError, match="partition"):
        _block.factorise_blocks(operator, overlapping)


def test_memory_guard_names_the_blocks(monkeypatch):
    monkeypatch.setattr(_block, "available_memory", lambda: 1000)
    with pytest.raises(influx.InputError, match=r"sum \|b\|\^2 = 13"):
        BlockSolver().init(DenseOperator(np.eye(5)), model=_Groups([2, 3]))


def test_functional_api_and_host_mode(backend_name):
    model = model_of(backend_name, "mlp")
    train = data("mlp")[2]
    inf = influx.Influence(model, "block", 1.0).fit(train)
    assert inf.layer_names == list(inf._fitted.state.names)
    if backend_name == "jax":  # host mode: the blocks are numpy
        assert inf._fitted.host
        assert all(isinstance(b.matrix, np.ndarray) for b in inf._fitted.state.blocks)
    factors = influx.compute_influence_factors(
        model, train, train, "block", hessian_regularization=1.0
    )
    assert rel_err(factors, to_numpy(inf.factors(train))) < 1e-14


def test_ggn_curvature(backend_name):
    # The dense reference: J^T H_out J from the frameworks' jacrev
    # (tests/models.py's batch_ggn), restricted to the blocks.
    import models

    batch_ggn = getattr(models, "batch_ggn", None)
    if "curvature" not in inspect.signature(influx.Influence).parameters:
        pytest.skip("curvature= has not landed on this branch")
    assert batch_ggn is not None
    model = model_of(backend_name, "mlp")
    x, y, train, _ = data("mlp")
    lam = 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", influx.NotPositiveDefiniteWarning)
        inf = influx.Influence(model, "block", lam, curvature="ggn").fit(train)
    dense = batch_ggn(model, x, "mse") + lam * np.eye(model.num_params)
    reference = np.zeros_like(dense)
    for _, index in parameter_groups(model):
        reference[np.ix_(index, index)] = dense[np.ix_(index, index)]
    grads = per_sample(model, x, y)
    expected = np.linalg.solve(reference, grads.T).T
    assert rel_err(inf.factors(train), expected) < 1e-8
