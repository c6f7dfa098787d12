"""``influx.Influence``: fit once, query many.

Every result is checked against the functional API (``compute_influence_factors``,
``compute_influences``) run with the same options and seeds, to 1e-10 in float64;
self-influence against the diagonal of the full matrix, top-k against sorting
the full scores, measurements against a closed form.
"""

from __future__ import annotations

import functools
import pickle
import threading
from typing import Any

import numpy as np
import pytest
from models import mlp_weights, rel_err, to_backend, to_numpy, wrap_mlp

import influx
from influx.operators import HessianOperator

LAMBDA = 1.0
SIZES = (3, 4, 2)  # P = 3*4 + 4 + 4*2 + 2 = 26
BATCH = 8

#: Options per method, tight enough that the iterative solvers converge; the
#: functional reference runs with the same ones (and the same seeds).
OPTIONS: dict[str, dict[str, Any]] = {
    "direct": {},
    "cg": {"rtol": 1e-8, "atol": 0.0, "maxiter": 300},
    "lissa": {"maxiter": 200, "rtol": 1e-11, "seed": 3, "scale": 1.2},
    "arnoldi": {"rank_estimate": 8},
}
METHODS = list(OPTIONS)


@functools.cache
def problem(backend_name: str) -> tuple[Any, Any, Any, Any]:
    """``(model, train, test, inputs)``: a tanh MLP, 24 / 5 / 11 points."""
    rng = np.random.default_rng(0)
    model = wrap_mlp(backend_name, mlp_weights(SIZES, seed=1))

    def data(n: int, batch: int) -> Any:
        x = rng.standard_normal((n, SIZES[0]))
        y = rng.standard_normal((n, SIZES[-1]))
        xb, yb = to_backend(backend_name, x), to_backend(backend_name, y)
        return influx.batches(xb, yb, batch_size=batch)

    # One training batch: LiSSA's steps are then exact and converge in a few
    # dozen steps; the input data streams in batches.
    return model, data(24, 24), data(5, BATCH), data(11, BATCH)


@functools.cache
def fitted(backend_name: str, method: str) -> influx.Influence:
    model, train, _, _ = problem(backend_name)
    return influx.Influence(model, method, LAMBDA, **OPTIONS[method]).fit(train)


@functools.cache
def reference_factors(backend_name: str, method: str) -> np.ndarray:
    model, train, test, _ = problem(backend_name)
    factors = influx.compute_influence_factors(
        model, train, test, method, hessian_perturbation=LAMBDA, **OPTIONS[method]
    )
    return to_numpy(factors)


def functional(backend_name: str, method: str, **kwargs: Any) -> np.ndarray:
    model, train, test, _ = problem(backend_name)
    kwargs.setdefault("test_data", test)
    result = influx.compute_influences(
        model,
        train,
        inversion_method=method,
        hessian_regularization=LAMBDA,
        **OPTIONS[method],
        **kwargs,
    )
    return to_numpy(result)


# -- parity with the functional API ----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_factors_and_influences_equal_the_functional_api(backend_name, method):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, method)
    assert rel_err(inf.factors(test), reference_factors(backend_name, method)) < 1e-10
    assert inf.info is not None and inf.info.method == method
    up = inf.influences(test, inputs)
    assert rel_err(up, functional(backend_name, method, input_data=inputs)) < 1e-10


def test_input_data_defaults_to_the_training_data(backend_name):
    _, _, test, _ = problem(backend_name)
    inf = fitted(backend_name, "direct")
    assert rel_err(inf.influences(test), functional(backend_name, "direct")) < 1e-10


@pytest.mark.parametrize("method", ["direct", "arnoldi"])
def test_perturbation_influences_equal_the_functional_api(backend_name, method):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, method)
    pert = inf.influences(test, inputs, influence_type="perturbation")
    expected = functional(
        backend_name, method, input_data=inputs, influence_type="perturbation"
    )
    assert tuple(pert.shape) == (5, 11, SIZES[0])
    assert rel_err(pert, expected) < 1e-10


def test_out_takes_the_result(backend_name):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, "direct")
    out = np.zeros((5, 11))
    assert inf.influences(test, inputs, out=out) is out
    assert rel_err(out, functional(backend_name, "direct", input_data=inputs)) < 1e-12


# -- self-influence --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_self_influence_is_the_diagonal_of_the_full_matrix(backend_name, method):
    _, _, _, inputs = problem(backend_name)
    inf = fitted(backend_name, method)
    values = inf.self_influence(inputs)
    assert tuple(values.shape) == (11,)
    full = to_numpy(inf.influences(inputs, inputs))
    assert rel_err(values, np.diag(full)) < 1e-10


def test_self_influence_direct_eigen_fallback(backend_name):
    # Unregularised, this MLP's Hessian is indefinite: Cholesky fails and the
    # direct solver inverts through its eigendecomposition.
    model, train, _, inputs = problem(backend_name)
    with pytest.warns(influx.NotPositiveDefiniteWarning):
        inf = influx.Influence(model, "direct").fit(train)
    assert not inf._fitted.state.positive_definite
    values = inf.self_influence(inputs)
    full = to_numpy(inf.influences(inputs, inputs))
    assert rel_err(values, np.diag(full)) < 1e-10


def test_self_influence_arnoldi_drop_remainder(backend_name):
    model, train, _, inputs = problem(backend_name)
    inf = influx.Influence(model, "arnoldi", LAMBDA, rank_estimate=5, remainder="drop")
    inf.fit(train)
    full = to_numpy(inf.influences(inputs, inputs))
    assert rel_err(inf.self_influence(inputs), np.diag(full)) < 1e-10


# -- top-k -----------------------------------------------------------------------------


def sorted_reference(scores: np.ndarray, k: int, largest: bool) -> tuple[Any, Any]:
    """Sort the full matrix: by value, ties to the smaller index."""
    columns = np.arange(scores.shape[1])
    key = -scores if largest else scores
    order = np.stack([np.lexsort((columns, row)) for row in key])[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_sorting_the_full_scores(backend_name, largest):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, "direct")
    full = to_numpy(inf.influences(test, inputs))
    values, indices = inf.top_k(test, inputs, 4, largest=largest)
    expected_values, expected_indices = sorted_reference(full, 4, largest)
    assert tuple(values.shape) == tuple(indices.shape) == (5, 4)
    assert str(values.dtype).endswith("float64")
    assert str(indices.dtype).endswith("int64")
    np.testing.assert_array_equal(to_numpy(indices), expected_indices)
    np.testing.assert_allclose(to_numpy(values), expected_values, rtol=1e-12)


def test_top_k_equals_sorting_with_duplicated_points(backend_name):
    # Every input point appears three times, across batches: near-ties. They
    # need not be bitwise ties (a BLAS product may round a column differently
    # by its position in a block), but top_k scores with the same loop as
    # influences(), so it equals sorting that result, ties to the smaller index.
    _, _, test, _ = problem(backend_name)
    rng = np.random.default_rng(5)
    x = np.repeat(rng.standard_normal((4, SIZES[0])), 3, axis=0)
    y = np.repeat(rng.standard_normal((4, SIZES[-1])), 3, axis=0)
    inputs = influx.batches(
        to_backend(backend_name, x), to_backend(backend_name, y), batch_size=5
    )
    inf = fitted(backend_name, "direct")
    full = to_numpy(inf.influences(test, inputs))
    for largest in (True, False):
        values, indices = inf.top_k(test, inputs, 7, largest=largest)
        expected_values, expected_indices = sorted_reference(full, 7, largest)
        np.testing.assert_array_equal(to_numpy(indices), expected_indices)
        np.testing.assert_array_equal(to_numpy(values), expected_values)


def test_top_k_breaks_exact_ties_by_index(backend_name):
    # Exact ties by construction, whatever the rounding: the measurement of the
    # test points with a target below the median is multiplied by 0, so their gradient,
    # influence factor and every score are exactly zero (+-0): all tied, and
    # the first k input indices win, across the input batches of 8.
    _, _, test, inputs = problem(backend_name)
    targets = np.concatenate([to_numpy(y)[:, 0] for _, y in test])
    middle = float(np.median(targets))
    zero = targets < middle
    assert 0 < zero.sum() < len(targets)

    def masked(pred: Any, y: Any) -> Any:
        return pred[:, 0] * (y[:, 0] >= middle)

    inf = fitted(backend_name, "direct")
    full = to_numpy(inf.influences(test, inputs, measurement=masked))
    assert np.all(full[zero] == 0) and np.all(full[~zero] != 0)
    for largest in (True, False):
        values, indices = inf.top_k(
            test, inputs, 10, largest=largest, measurement=masked
        )
        expected_values, expected_indices = sorted_reference(full, 10, largest)
        np.testing.assert_array_equal(to_numpy(indices), expected_indices)
        np.testing.assert_array_equal(to_numpy(values), expected_values)
        assert np.all(to_numpy(indices)[zero] == np.arange(10))


@pytest.mark.parametrize("block", [1, 2, 3, 7])
def test_running_top_k_ties_go_to_the_smaller_index(block):
    # Small integers: every comparison exact, many ties within and across blocks.
    scores = np.random.default_rng(9).integers(-3, 4, size=(6, 20)).astype(float)
    for largest in (True, False):
        best = influx.attribution._RunningTopK(5, largest)
        for start in range(0, 20, block):
            best.add(scores[:, start : start + block])
        values, indices = best.result()
        expected_values, expected_indices = sorted_reference(scores, 5, largest)
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(values, expected_values)


def test_top_k_checks_k(backend_name):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, "direct")
    with pytest.raises(influx.InputError, match="k=12 is larger than the 11 points"):
        inf.top_k(test, inputs, 12)
    with pytest.raises(influx.InputError, match="k must be at least 1"):
        inf.top_k(test, inputs, 0)
    with pytest.raises(TypeError, match="k must be a positive int"):
        inf.top_k(test, inputs, 2.0)


# -- the fit happens once --------------------------------------------------------------


class Counting:
    """Counts ``init`` calls of a solver class and passes of the Hessian."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes = 0
        for name in ("mv", "to_dense"):
            original = getattr(HessianOperator, name)

            def counted(self_: Any, *args: Any, _original: Any = original) -> Any:
                self.passes += 1
                return _original(self_, *args)

            monkeypatch.setattr(HessianOperator, name, counted)


@pytest.mark.parametrize(
    ("method", "query_passes"), [("direct", 0), ("arnoldi", 0), ("cg", None)]
)
def test_fit_runs_once_and_queries_reuse_it(
    backend_name, method, query_passes, monkeypatch
):
    model, train, test, inputs = problem(backend_name)
    counter = Counting(monkeypatch)
    solver_class = type(influx.make_solver(method))
    inits = []

    class CountingSolver(solver_class):  # type: ignore[misc, valid-type]
        def init(self, operator: Any, **kwargs: Any) -> Any:
            inits.append(operator)
            return super().init(operator, **kwargs)

    inf = influx.Influence(model, CountingSolver(**OPTIONS[method]), LAMBDA)
    inf.fit(train)
    fit_passes = counter.passes
    assert len(inits) == 1 and fit_passes >= 1
    for _ in range(2 if query_passes is not None else 1):
        inf.factors(test)
        inf.influences(test, inputs)
        inf.self_influence(inputs)
        inf.top_k(test, inputs, 3)
    assert len(inits) == 1
    if query_passes is not None:
        assert counter.passes == fit_passes + query_passes
    with pytest.raises(RuntimeError, match="already fitted"):
        inf.fit(train)


def test_arnoldi_residuals_are_opt_in(backend_name, monkeypatch):
    model, train, test, _ = problem(backend_name)
    plain = fitted(backend_name, "arnoldi")
    plain.factors(test)
    assert np.all(np.isnan(plain.info.residual_norms))
    assert "not computed" in plain.info.extra["residual"]
    assert "max relative residual not computed" in str(plain.info)
    assert "nan" not in str(plain.info)
    inf = influx.Influence(model, "arnoldi", LAMBDA, rank_estimate=8, residuals=True)
    inf.fit(train)
    counter = Counting(monkeypatch)
    factors = inf.factors(test)
    assert counter.passes == 1
    # The reported residual is that of the low-rank solve against H + lambda I.
    hessian = HessianOperator(model, train).shift(LAMBDA)
    true = np.linalg.norm(to_numpy(hessian.mv(factors)) - grads_of(model, test), axis=1)
    np.testing.assert_allclose(inf.info.residual_norms, true, rtol=1e-8)
    assert "max relative residual not computed" not in str(inf.info)


def grads_of(model: Any, data: Any) -> np.ndarray:
    return np.concatenate([to_numpy(model.per_sample_grads(x, y)[0]) for x, y in data])


def test_not_fitted_and_bad_arguments(backend_name):
    model, _, test, _ = problem(backend_name)
    inf = influx.Influence(model, "cg")
    assert inf.info is None and not inf.is_fitted
    with pytest.raises(RuntimeError, match="fit"):
        inf.factors(test)
    with pytest.raises(TypeError, match="options"):
        influx.Influence(model, influx.CgSolver(), rtol=1e-3)
    with pytest.raises(TypeError, match="Unknown option"):
        influx.Influence(model, "direct", rtol=1e-3)
    with pytest.raises(influx.InputError, match="hessian_regularization"):
        influx.Influence(model, "direct", -1.0)


# -- the protections of the functional API ------------------------------------------


class Reshuffling:
    """The 11 input points in batches of 4, in a new order on every pass."""

    def __init__(self, backend_name: str) -> None:
        _, _, _, inputs = problem(backend_name)
        self.x = np.concatenate([to_numpy(x) for x, _ in inputs])
        self.y = np.concatenate([to_numpy(y) for _, y in inputs])
        self.backend_name, self.rng = backend_name, np.random.default_rng(4)

    def __iter__(self) -> Any:
        order = self.rng.permutation(len(self.x))
        for start in range(0, len(order), 4):
            rows = order[start : start + 4]
            yield (
                to_backend(self.backend_name, self.x[rows]),
                to_backend(self.backend_name, self.y[rows]),
            )


def test_queries_refuse_data_whose_order_changes(backend_name):
    # Test points are the rows and input points the columns (or the entries)
    # of every result: data that reorders itself between passes is refused.
    _, _, test, _ = problem(backend_name)
    inf = fitted(backend_name, "direct")
    match = "yields different batches on each pass"
    with pytest.raises(influx.InputError, match=f"test_data {match}"):
        inf.factors(Reshuffling(backend_name))
    with pytest.raises(influx.InputError, match=f"input_data {match}"):
        inf.influences(test, Reshuffling(backend_name))
    with pytest.raises(influx.InputError, match=f"input_data {match}"):
        inf.top_k(test, Reshuffling(backend_name), 3)
    with pytest.raises(influx.InputError, match=f"data {match}"):
        inf.self_influence(Reshuffling(backend_name))


def sum_loss(backend_name: str) -> Any:
    if backend_name == "torch":
        import torch

        return torch.nn.MSELoss(reduction="sum")
    import jax.numpy as jnp

    return lambda pred, y: jnp.sum((pred - y) ** 2) / SIZES[-1]


def test_queries_check_the_loss_convention(backend_name):
    # A sum reduction: on batches of one it is the mean, so the fit passes on
    # one-point batches; every query then refuses its batches of several.
    _, _, test, inputs = problem(backend_name)
    layers = mlp_weights(SIZES, seed=1)
    if backend_name == "torch":
        from models import torch_mlp

        model = influx.twice_differentiable(
            torch_mlp(layers, "float64"), sum_loss(backend_name)
        )
    else:
        from models import jax_mlp

        apply_fn, params = jax_mlp(layers, "float64")
        model = influx.twice_differentiable(
            apply_fn, sum_loss(backend_name), params=params
        )
    x, y = next(iter(problem(backend_name)[1]))
    ones = influx.batches(x, y, batch_size=1)
    with pytest.raises(influx.InputError, match="training_data batch 0"):
        influx.Influence(model, "direct", LAMBDA).fit(influx.batches(x, y))
    inf = influx.Influence(model, "direct", LAMBDA).fit(ones)
    sum_found = "a sum reduction"
    with pytest.raises(influx.InputError, match=f"test_data batch 0: .*{sum_found}"):
        inf.factors(test)
    single = influx.batches(*next(iter(test)), batch_size=1)
    with pytest.raises(influx.InputError, match=f"input_data batch 0: .*{sum_found}"):
        inf.top_k(single, inputs, 2)
    with pytest.raises(influx.InputError, match=f"input_data batch 0: .*{sum_found}"):
        inf.influences(single, inputs)
    with pytest.raises(influx.InputError, match=f"data batch 0: .*{sum_found}"):
        inf.self_influence(inputs)


def test_out_is_checked_before_the_solve(backend_name, monkeypatch):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, "direct")
    solves = []
    original = type(inf.solver).solve

    def counted(self_: Any, *args: Any, **kwargs: Any) -> Any:
        solves.append(1)
        return original(self_, *args, **kwargs)

    monkeypatch.setattr(type(inf.solver), "solve", counted)
    with pytest.raises(influx.InputError, match=r"out has shape \(5, 10\)"):
        inf.influences(test, inputs, out=np.zeros((5, 10)))
    with pytest.raises(influx.InputError, match="floating dtype"):
        inf.influences(test, inputs, out=np.zeros((5, 11), dtype=np.int64))
    with pytest.raises(TypeError, match="host array"):
        inf.influences(test, inputs, out=to_backend(backend_name, np.zeros((5, 11))))
    with pytest.raises(influx.InputError, match=r"\[N_test, M, \*S\]"):
        inf.influences(
            test, inputs, influence_type="perturbation", out=np.zeros((5, 11))
        )
    assert solves == []


@pytest.mark.parametrize("method", ["direct", "cg", "arnoldi"])
def test_jax_on_the_cpu_fits_and_solves_on_the_host(backend_name, method):
    # Host mode (influx._host): the solver's state and steps are numpy, only
    # the model's derivatives run in JAX; results come back as JAX arrays.
    if backend_name != "jax":
        pytest.skip("host mode is for JAX on the CPU")
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, method)
    assert inf._fitted.host and isinstance(inf._fitted.operator.like, np.ndarray)
    for result in (
        inf.factors(test),
        inf.influences(test, inputs),
        inf.self_influence(inputs),
        *inf.top_k(test, inputs, 2),
    ):
        assert not isinstance(result, np.ndarray) and hasattr(result, "devices")


def test_query_arguments_are_checked(backend_name):
    _, _, test, inputs = problem(backend_name)
    inf = fitted(backend_name, "direct")
    with pytest.raises(ValueError, match="influence_type"):
        inf.influences(test, inputs, influence_type="sideways")
    with pytest.raises(TypeError, match="data is a one-shot iterator"):
        inf.self_influence(iter(list(inputs)))
    with pytest.raises(TypeError, match="test_data is a one-shot iterator"):
        inf.factors(x for x in test)
    with pytest.raises(TypeError, match="input_data is a one-shot iterator"):
        inf.top_k(test, iter(list(inputs)), 2)
    with pytest.raises(TypeError, match="twice-differentiable"):
        influx.Influence(object())
    with pytest.raises(TypeError, match="method must be a name or a solver instance"):
        influx.Influence(problem(backend_name)[0], influx.CgSolver)


# -- measurements ----------------------------------------------------------------------


def test_measurement_matches_the_linear_regression_closed_form(backend_name):
    # f(x) = w.x + b, squared loss: H = (2/N) sum phi phi^T with phi = [x, 1];
    # measuring the prediction, grad f(z_test) = phi_test, and
    # I(z_test, z) = phi_test^T (H + lambda I)^{-1} grad l(z).
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((1, 3)), rng.standard_normal(1)
    model = wrap_mlp(backend_name, [(w, b)])
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 1))
    xt, yt = rng.standard_normal((4, 3)), rng.standard_normal((4, 1))
    train = influx.batches(to_backend(backend_name, x), to_backend(backend_name, y))
    test = influx.batches(to_backend(backend_name, xt), to_backend(backend_name, yt))

    def prediction(pred: Any, targets: Any) -> Any:
        return pred[:, 0]

    inf = influx.Influence(model, "direct", LAMBDA).fit(train)
    scores = inf.influences(test, measurement=prediction)

    phi = np.hstack([x, np.ones((20, 1))])
    phi_test = np.hstack([xt, np.ones((4, 1))])
    hessian = 2 * phi.T @ phi / 20 + LAMBDA * np.eye(4)
    residual = phi @ np.concatenate([w[0], b]) - y[:, 0]
    train_grads = 2 * residual[:, None] * phi
    expected = phi_test @ np.linalg.solve(hessian, train_grads.T)
    assert rel_err(scores, expected) < 1e-10
    # The loss is still the default, and the measurement changes the answer.
    assert rel_err(inf.influences(test), expected) > 1e-2
    _, indices = inf.top_k(test, train, 3, measurement=prediction)
    np.testing.assert_array_equal(
        to_numpy(indices), sorted_reference(expected, 3, True)[1]
    )


def test_measurement_must_return_one_value_per_point(backend_name):
    _, _, test, _ = problem(backend_name)
    inf = fitted(backend_name, "direct")
    with pytest.raises(influx.InputError, match="one value per point"):
        inf.factors(test, measurement=lambda pred, y: pred)
    with pytest.raises(TypeError, match="measurement must be a callable"):
        inf.factors(test, measurement=3)


# -- save and load ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(backend_name, method, tmp_path, monkeypatch):
    model, train, test, inputs = problem(backend_name)
    inf = fitted(backend_name, method)
    path = tmp_path / "fitted.npz"

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, no_pickle)
    inf.save(path)
    data = training = train if method in ("cg", "lissa") else None
    loaded = influx.Influence.load(path, model, training)
    monkeypatch.undo()
    assert loaded.method == method and loaded.hessian_regularization == LAMBDA
    # The same numbers (up to the memory layout of the reloaded arrays).
    assert rel_err(loaded.factors(test), to_numpy(inf.factors(test))) < 1e-12
    if method in ("direct", "arnoldi"):  # the iterative ones: factors suffice
        before, after = inf.influences(test, inputs), loaded.influences(test, inputs)
        assert rel_err(after, to_numpy(before)) < 1e-12
        before, after = inf.self_influence(inputs), loaded.self_influence(inputs)
        assert rel_err(after, to_numpy(before)) < 1e-12
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
    if data is None:
        with pytest.raises(influx.InputError, match="pass input_data"):
            loaded.influences(test)


def test_load_refuses_another_model_and_missing_data(backend_name, tmp_path):
    model, train, _, _ = problem(backend_name)
    path = tmp_path / "fitted.npz"
    fitted(backend_name, "cg").save(path)
    with pytest.raises(influx.InputError, match="pass the training data"):
        influx.Influence.load(path, model)
    x, y = next(iter(train))
    short = influx.batches(x[:8], y[:8], batch_size=4)
    with pytest.raises(influx.InputError, match="has 8 points but"):
        influx.Influence.load(path, model, short)
    layers = mlp_weights(SIZES, seed=1)
    layers[0][0][0, 0] += 1e-9
    changed = wrap_mlp(backend_name, layers)
    with pytest.raises(influx.InputError, match=r"parameters \(SHA-256\)") as error:
        influx.Influence.load(path, changed, train)
    hashes = [influx.attribution._parameter_hash(m) for m in (changed, model)]
    assert all(h in str(error.value) for h in hashes)
    (tmp_path / "other.npz").write_bytes(b"not an archive")
    with pytest.raises(Exception):  # noqa: B017 - numpy's own error
        influx.Influence.load(tmp_path / "other.npz", model)
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(influx.InputError, match="not a file written by"):
        influx.Influence.load(tmp_path / "plain.npz", model)


def test_save_keeps_solver_instances_and_array_options(backend_name, tmp_path):
    model, train, test, _ = problem(backend_name)
    solver = influx.CgSolver(
        rtol=1e-12,
        atol=1e-14,
        x0=np.full(26, 0.01),
        preconditioner=influx.NystromPreconditioner(rank=5, seed=4),
    )
    inf = influx.Influence(model, solver, LAMBDA).fit(train)
    inf.save(tmp_path / "cg.npz")
    loaded = influx.Influence.load(tmp_path / "cg.npz", model, train)
    assert loaded.solver.preconditioner.rank == 5
    np.testing.assert_array_equal(to_numpy(loaded.solver.x0), np.full(26, 0.01))
    assert rel_err(loaded.factors(test), to_numpy(inf.factors(test))) < 1e-12


# -- threads ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["direct", "cg"])
def test_concurrent_queries_give_identical_results(backend_name, method):
    model, train, test, inputs = problem(backend_name)
    inf = influx.Influence(model, method, LAMBDA, **OPTIONS[method]).fit(train)

    def query() -> list[np.ndarray]:
        if method == "cg":  # products with the Hessian from every thread
            return [to_numpy(inf.factors(test))]
        values, indices = inf.top_k(test, inputs, 3)
        return [
            to_numpy(inf.influences(test, inputs)),
            to_numpy(inf.self_influence(inputs)),
            to_numpy(values),
            to_numpy(indices),
        ]

    expected = query()
    results: list[Any] = [None] * 4
    barrier = threading.Barrier(4)

    def work(slot: int) -> None:
        barrier.wait()
        try:
            results[slot] = query()
        except BaseException as error:
            results[slot] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
        for actual, wanted in zip(result, expected, strict=True):
            np.testing.assert_allclose(actual, wanted, rtol=1e-12, atol=1e-14)
    # The model is untouched: still trainable parameters in place.
    if backend_name == "torch":
        import torch

        assert all(isinstance(p, torch.nn.Parameter) for p in model.model.parameters())
