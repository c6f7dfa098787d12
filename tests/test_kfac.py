"""K-FAC and EK-FAC in the core, on numpy stubs: no framework at all.

A stub model serves fixed random layer inputs and output gradients per point
(``layer_batch``); every statistic and solve is compared with a dense numpy
float64 reference built from the same per-sample arrays at once (einsum over
all points, the Kronecker matrix written out in ``theta`` order).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import influx
from influx import _kronecker as kronecker
from influx.errors import InputError
from influx.layers import Layer, LayerBatch, LayerLayout, augmented_inputs
from influx.operators import DenseOperator
from influx.solvers import EkfacSolver, KfacSolver, make_solver
from influx.solvers import kfac as kfac_module

TOL = 1e-10


class _Backend:
    """The least of a backend the solvers' data reading needs (numpy arrays)."""

    name = "numpy_stub"

    def is_native_array(self, obj):
        return isinstance(obj, np.ndarray)

    def asarray(self, obj, like=None):
        array = np.asarray(obj)
        if like is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(like.dtype, copy=False)
        return array

    def to_numpy(self, array):
        return np.asarray(array)


class StubModel:
    """Fixed per-point layer statistics for ``C`` outputs.

    Point ``n`` has, per layer, inputs ``a[n]`` ``[T, d_in]`` and an output
    Jacobian-like ``U[n]`` ``[C, T, d_out]`` (and ``R[n]`` ``[C, P_rest]`` for
    the rest); a probe ``u`` (``[C]``) gives the output gradients ``u . U[n]``.
    ``"empirical"``: ``u = r[n]``; ``"ggn"``: the ``C`` unit vectors;
    ``"mc"``: the core's noise. ``x`` holds the points' indices.
    """

    backend = _Backend()

    def __init__(
        self,
        layers,
        positions,
        num_params,
        num_points,
        outputs=3,
        seed=0,
        dtype=np.float64,
    ):
        rng = np.random.default_rng(seed)
        self.layers = layers
        self.num_params = num_params
        self.parameters = np.zeros(num_params, dtype=dtype)
        self.dtype = self.parameters.dtype
        self.outputs = outputs
        self.rest = LayerLayout(layers, num_params).rest
        cast = lambda a: a.astype(dtype)  # noqa: E731
        self.a = [
            cast(rng.standard_normal((num_points, t, layer.d_in)))
            for layer, t in zip(layers, positions, strict=True)
        ]
        self.u = [
            cast(rng.standard_normal((num_points, outputs, t, layer.d_out)))
            for layer, t in zip(layers, positions, strict=True)
        ]
        self.r_rest = cast(rng.standard_normal((num_points, outputs, self.rest.size)))
        self.labels = cast(rng.standard_normal((num_points, outputs)))
        self.calls = []

    def probes(self, index, fisher, noise):
        """``[B, S, C]`` probes of the points ``index``."""
        count = len(index)
        if fisher == "empirical":
            return self.labels[index][:, None, :]
        if fisher == "ggn":
            return np.broadcast_to(np.eye(self.outputs), (count, *(2 * [self.outputs])))
        return noise(count, self.outputs)

    def layer_batch(self, x, y, *, fisher="empirical", noise=None):
        index = np.asarray(x[:, 0]).astype(np.int64)
        self.calls.append((fisher, index.tolist()))
        probes = self.probes(index, fisher, noise).astype(self.dtype)
        grads = tuple(np.einsum("bsc,bcto->bsto", probes, u[index]) for u in self.u)
        rest = np.einsum("bsc,bcp->bsp", probes, self.r_rest[index])
        losses = np.ones(len(index), dtype=self.dtype)
        return LayerBatch(tuple(a[index] for a in self.a), grads, rest, losses)


def dense_arrays(model, sizes, fisher, seed=0, mc_samples=1):
    """All points' probes as the solver sees them, batch by batch: (a, g, rest)."""
    a_all = [[] for _ in model.layers]
    g_all = [[] for _ in model.layers]
    rest_all, start = [], 0
    for batch_index, size in enumerate(sizes):
        index = np.arange(start, start + size)
        start += size

        def noise(count, outputs, b=batch_index):
            rng = np.random.default_rng([seed, b])
            draws = rng.standard_normal((count, mc_samples, outputs))
            return draws / math.sqrt(mc_samples)

        probes = model.probes(index, fisher, noise).astype(np.float64)
        for i, layer in enumerate(model.layers):
            a_all[i].append(augmented_inputs(model.a[i][index].astype(float), layer))
            g_all[i].append(np.einsum("bsc,bcto->bsto", probes, model.u[i][index]))
        rest_all.append(np.einsum("bsc,bcp->bsp", probes, model.r_rest[index]))
    return (
        [np.concatenate(a) for a in a_all],
        [np.concatenate(g) for g in g_all],
        np.concatenate(rest_all),
    )


def reference(model, sizes, fisher, state, **kwargs):
    """Dense float64 (A, G, Lambda_ekfac per layer; rest d; C matrix) of a state."""
    a_all, g_all, rest = dense_arrays(model, sizes, fisher, **kwargs)
    n = sum(sizes)
    factors_a, factors_g, corrected = [], [], []
    for i, (a, g) in enumerate(zip(a_all, g_all, strict=True)):
        positions = a.shape[1]
        factors_a.append(np.einsum("nti,ntj->ij", a, a) / (n * positions))
        factors_g.append(np.einsum("nsto,nstp->op", g, g) / n)
        per_sample = np.einsum("nsto,nti->nsoi", g, a)
        q_a, q_g = state.a_eigenvectors[i], state.g_eigenvectors[i]
        rotated = np.einsum("op,nsoi,ij->nspj", q_g, per_sample, q_a)
        corrected.append(np.sum(rotated**2, axis=(0, 1)) / n)
    diagonal = np.sum(rest**2, axis=(0, 1)) / n
    return factors_a, factors_g, corrected, diagonal


def dense_matrix(state, eigenvalues, diagonal, num_params):
    """``C`` ``[P, P]`` in theta order from per-layer eigenbases and Lambda."""
    matrix = np.zeros((num_params, num_params))
    for layer, q_a, q_g, values in zip(
        state.layout.layers,
        state.a_eigenvectors,
        state.g_eigenvectors,
        eigenvalues,
        strict=True,
    ):
        basis = np.kron(q_g, q_a)
        index = layer.index().ravel()
        matrix[np.ix_(index, index)] = (basis * values.ravel()) @ basis.T
    rest = LayerLayout(state.layout.layers, num_params).rest
    matrix[rest, rest] = diagonal
    return matrix


def layers_and_size(seed=0):
    """A dense layer with bias (3x4), a shared layer without (2x3), 2 rest, shuffled."""
    sizes = [(3, 4, True), (2, 3, False)]
    total = sum(o * i + (o if b else 0) for o, i, b in sizes) + 2
    order = np.random.default_rng(seed).permutation(total)
    layers, start = [], 0
    for k, (d_out, d_in, bias) in enumerate(sizes):
        weight = order[start : start + d_out * d_in].reshape(d_out, d_in)
        start += d_out * d_in
        bias_index = None
        if bias:
            bias_index = order[start : start + d_out]
            start += d_out
        layers.append(Layer(f"layer{k}", "linear", weight, bias_index))
    return layers, total


def batches_of(sizes):
    data, start = [], 0
    for size in sizes:
        index = np.arange(start, start + size, dtype=np.float64)[:, None]
        data.append((index, np.zeros((size, 1))))
        start += size
    return data


SIZES = [3, 5, 2, 4]  # uneven batches, N = 14


def fit(solver, model, lam, sizes=SIZES):
    operator = DenseOperator(np.zeros((model.num_params,) * 2)).shift(lam)
    return solver.init(operator, model=model, training_data=batches_of(sizes))


def rel(actual, expected):
    expected = np.asarray(expected)
    return float(
        np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))
    )


@pytest.mark.parametrize("fisher", ["empirical", "ggn", "mc"])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_statistics_and_solve_match_dense_reference(method, fisher):
    layers, num_params = layers_and_size()
    model = StubModel(layers, positions=[1, 3], num_params=num_params, num_points=14)
    options = {"mc_samples": 2, "seed": 5} if fisher == "mc" else {}
    solver = make_solver(method, fisher=fisher, **options)
    lam = 0.1
    state = fit(solver, model, lam)
    extra = {"seed": 5, "mc_samples": 2} if fisher == "mc" else {}
    factors_a, factors_g, corrected, diagonal = reference(
        model, SIZES, fisher, state, **extra
    )
    for i in range(len(layers)):
        a, g = state.factors(i)
        assert rel(a, factors_a[i]) < TOL
        assert rel(g, factors_g[i]) < TOL
        assert rel(state.a_eigenvalues[i], np.linalg.eigvalsh(factors_a[i])) < TOL
        assert rel(state.g_eigenvalues[i], np.linalg.eigvalsh(factors_g[i])) < TOL
        if method == "ekfac":
            assert rel(state.eigenvalues[i], corrected[i]) < TOL
        else:
            kron = np.kron(factors_g[i], factors_a[i])  # row-major vec of G V A
            q = np.kron(state.g_eigenvectors[i], state.a_eigenvectors[i])
            assert rel((q * state.eigenvalues[i].ravel()) @ q.T, kron) < TOL
    assert rel(state.rest_diagonal, diagonal) < TOL
    assert state.num_samples == 14 and state.fisher == fisher
    assert state.rest_parameters == ("rest",)

    matrix = dense_matrix(state, state.eigenvalues, diagonal, num_params)
    if method == "kfac":
        for i, layer in enumerate(layers):
            index = layer.index().ravel()
            block = np.kron(factors_g[i], factors_a[i])
            assert rel(matrix[np.ix_(index, index)], block) < TOL
    rhs = np.random.default_rng(3).standard_normal((4, num_params))
    expected = np.linalg.solve(matrix + lam * np.eye(num_params), rhs.T).T
    x, info = solver.solve(state, rhs)
    assert rel(x, expected) < TOL
    assert info.all_converged and info.method == method
    assert np.all(info.iterations == 0)
    assert info.extra["layers"] == ("layer0", "layer1")
    assert info.extra["rest_parameters"] == ("rest",)
    quadratic = kfac_module.quadratic_form(state, rhs)
    assert rel(quadratic, np.sum(expected * rhs, axis=1)) < TOL


def test_mc_noise_is_per_batch_and_same_in_both_passes():
    layers, num_params = layers_and_size()
    model = StubModel(layers, positions=[1, 2], num_params=num_params, num_points=14)
    solver = EkfacSolver(fisher="mc", seed=3)
    first = fit(solver, model, 0.1)
    assert [f for f, _ in model.calls] == ["mc"] * 8  # two passes of four batches
    again = fit(solver, model, 0.1)
    for one, two in zip(first.eigenvalues, again.eigenvalues, strict=True):
        np.testing.assert_array_equal(one, two)
    other = fit(EkfacSolver(fisher="mc", seed=4), model, 0.1)
    assert rel(other.eigenvalues[0], first.eigenvalues[0]) > 1e-3
    fresh = [fit(EkfacSolver(fisher="mc", seed=None), model, 0.1) for _ in range(2)]
    assert rel(fresh[0].eigenvalues[0], fresh[1].eigenvalues[0]) > 1e-3


def test_large_positions_are_chunked(monkeypatch):
    """EK-FAC's T > 1 pass gives the same sums in chunks of one point."""
    layers, num_params = layers_and_size()
    model = StubModel(layers, positions=[2, 5], num_params=num_params, num_points=14)
    whole = fit(EkfacSolver(fisher="ggn"), model, 0.1)
    monkeypatch.setattr(kronecker, "CHUNK_ELEMENTS", 1)
    chunked = fit(EkfacSolver(fisher="ggn"), model, 0.1)
    for one, two in zip(whole.eigenvalues, chunked.eigenvalues, strict=True):
        assert rel(two, one) < 1e-13


def test_float32_model_accumulates_in_float64():
    layers, num_params = layers_and_size()
    model = StubModel(
        layers, [1, 3], num_params=num_params, num_points=14, dtype=np.float32
    )
    operator = DenseOperator(np.zeros((num_params,) * 2, dtype=np.float32)).shift(0.1)
    solver = EkfacSolver(fisher="ggn")
    state = solver.init(operator, model=model, training_data=batches_of(SIZES))
    assert state.rest_diagonal.dtype == np.float64
    # the reference from the same float32 arrays, widened
    _, _, corrected, diagonal = reference(model, SIZES, "ggn", state)
    for i in range(len(layers)):
        assert rel(state.eigenvalues[i], corrected[i]) < TOL
    rhs = np.random.default_rng(0).standard_normal((3, num_params)).astype(np.float32)
    x, _ = solver.solve(state, rhs)
    assert x.dtype == np.float32
    matrix = dense_matrix(state, state.eigenvalues, diagonal, num_params)
    expected = np.linalg.solve(matrix + 0.1 * np.eye(num_params), rhs.T).T
    assert rel(x, expected) < 1e-6


def test_export_import_round_trip():
    layers, num_params = layers_and_size()
    model = StubModel(layers, [1, 3], num_params=num_params, num_points=14)
    solver = EkfacSolver(fisher="empirical")
    state = fit(solver, model, 0.2)
    arrays, meta = kfac_module.export_state(state)
    import json

    meta = json.loads(json.dumps(meta))
    operator = DenseOperator(np.zeros((num_params,) * 2)).shift(0.2)
    loaded = kfac_module.import_state(arrays, meta, operator)
    rhs = np.random.default_rng(1).standard_normal((2, num_params))
    np.testing.assert_array_equal(
        solver.solve(loaded, rhs)[0], solver.solve(state, rhs)[0]
    )
    assert loaded.layer_names == state.layer_names
    assert loaded.rest_parameters == state.rest_parameters
    assert loaded.num_samples == 14 and loaded.method == "ekfac"


def test_no_layers_is_an_error():
    class Flat:
        backend = _Backend()
        num_params = 3
        parameters = np.zeros(3)

    operator = DenseOperator(np.eye(3)).shift(0.1)
    with pytest.raises(InputError, match=r"layer structure.*'block', 'cg'"):
        KfacSolver().init(operator, model=Flat(), training_data=batches_of([2]))
    with pytest.raises(InputError, match="pass both"):
        KfacSolver().init(operator, model=None, training_data=None)


def test_singular_without_regularization():
    # d_a = 5 > N * T = 3 points: A is singular.
    layers = [Layer("wide", "linear", np.arange(8).reshape(2, 4), np.array([8, 9]))]
    model = StubModel(layers, [1], num_params=10, num_points=3)
    with pytest.raises(InputError, match=r"hessian_regularization > 0, e\.g\. \d"):
        fit(KfacSolver(fisher="ggn"), model, 0.0, sizes=[3])
    with pytest.raises(InputError, match="hessian_regularization"):
        fit(EkfacSolver(fisher="ggn"), model, 0.0, sizes=[3])
    fit(KfacSolver(fisher="ggn"), model, 1e-3, sizes=[3])  # regularised: fine


def test_options_are_checked():
    with pytest.raises(InputError, match="fisher must be one of 'mc', 'empirical'"):
        KfacSolver(fisher="true")
    with pytest.raises(InputError, match="mc_samples"):
        EkfacSolver(mc_samples=0)
    with pytest.raises(TypeError, match="seed"):
        KfacSolver(seed=1.5)
    assert KfacSolver.option_names() == ["fisher", "mc_samples", "seed"]
    assert KfacSolver.curvature == EkfacSolver.curvature == "ggn"
    assert isinstance(make_solver(influx.InversionMethod.Ekfac), EkfacSolver)
    assert make_solver("KFAC", fisher="GGN").fisher == "ggn"


def test_bad_layer_batch_shapes_name_the_layer():
    layers, num_params = layers_and_size()
    model = StubModel(layers, [1, 3], num_params=num_params, num_points=14)
    original = model.layer_batch

    def broken(x, y, **kwargs):
        batch = original(x, y, **kwargs)
        return LayerBatch(
            batch.inputs,
            (batch.output_grads[0][:, :, :, :-1], batch.output_grads[1]),
            batch.rest_grads,
            batch.losses,
        )

    model.layer_batch = broken
    with pytest.raises(InputError, match=r"layer 'layer0'.*adapter"):
        fit(KfacSolver(fisher="ggn"), model, 0.1)


def test_non_finite_statistics_name_the_batch():
    layers, num_params = layers_and_size()
    model = StubModel(layers, [1, 3], num_params=num_params, num_points=14)
    model.a[1][6, 0, 0] = np.nan  # point 6 is in batch 1
    with pytest.raises(InputError, match="batch 1: the inputs of layer 'layer1'"):
        fit(KfacSolver(fisher="ggn"), model, 0.1)


# -- through influx.Influence, on the plain-numpy linear backend ----------------


def _fake_backend():
    path = Path(__file__).parent / "fake_backend" / "fake_influx_backend.py"
    spec = importlib.util.spec_from_file_location("fake_influx_backend_kfac", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _layered_linear(seed=0, outputs=2, inputs=3):
    fake = _fake_backend()

    class LayeredLinear(fake.LinearMSE):
        """The fake backend's linear MSE model with its one layer exposed."""

        @property
        def layers(self):
            o, d = self._out, self._in
            weight = np.arange(o * d).reshape(o, d)
            return [Layer("linear", "linear", weight, o * d + np.arange(o))]

        def layer_batch(self, x, y, *, fisher="empirical", noise=None):
            x, r = self._check(x, y)
            count, o = len(x), self._out
            if fisher == "empirical":
                probes = (2.0 / o) * r[:, None, :]
            elif fisher == "ggn":  # H_out = (2/O) I
                probes = np.broadcast_to(math.sqrt(2.0 / o) * np.eye(o), (count, o, o))
            else:
                probes = math.sqrt(2.0 / o) * noise(count, o)
            return LayerBatch(
                (x[:, None, :],),
                (probes[:, :, None, :],),
                np.zeros((count, probes.shape[1], 0)),
                np.mean(r**2, axis=1),
            )

    rng = np.random.default_rng(seed)
    model = fake.LinearModel(
        rng.standard_normal((outputs, inputs)), rng.standard_normal(outputs)
    )
    wrapped = LayeredLinear(model)
    x = rng.standard_normal((11, inputs))
    y = rng.standard_normal((11, outputs))
    return wrapped, influx.batches(x, y, batch_size=4)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_linear_mse_ggn_equals_the_exact_hessian(method, tmp_path):
    model, data = _layered_linear()
    exact = influx.Influence(model, "direct", 0.05).fit(data)
    approx = influx.Influence(model, method, 0.05, fisher="ggn").fit(data)
    expected = np.asarray(exact.influences(data, data))
    assert rel(approx.influences(data, data), expected) < 1e-10
    self_influence = np.asarray(approx.self_influence(data))
    assert rel(self_influence, np.asarray(exact.self_influence(data))) < 1e-10
    path = tmp_path / "fit.npz"
    approx.save(path)
    loaded = influx.Influence.load(path, model)
    assert loaded.method == method and loaded.solver.fisher == "ggn"
    assert rel(loaded.influences(data, data), expected) < 1e-10


def test_layers_found_on_the_first_batch():
    """An adapter whose ``layers`` raise until it saw a batch (JAX traces one)."""
    layers, num_params = layers_and_size()

    class Lazy(StubModel):
        seen = False

        @property
        def layers(self):
            if not self.seen:
                raise InputError("no batch seen yet")
            return self._layers

        @layers.setter
        def layers(self, value):
            self._layers = value

        def layer_batch(self, x, y, **kwargs):
            self.seen = True
            return super().layer_batch(x, y, **kwargs)

    lazy = Lazy(layers, [1, 3], num_params=num_params, num_points=14)
    eager = StubModel(layers, [1, 3], num_params=num_params, num_points=14)
    state = fit(EkfacSolver(fisher="ggn"), lazy, 0.1)
    expected = fit(EkfacSolver(fisher="ggn"), eager, 0.1)
    assert state.layer_names == ("layer0", "layer1")
    for one, two in zip(state.eigenvalues, expected.eigenvalues, strict=True):
        np.testing.assert_array_equal(one, two)
