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


def test_top_k_breaks_ties_by_index(backend_name):
    # Every input point appears three times: each score is tied three ways,
    # across batches; the smaller index comes first.
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
    inf = influx.Influence(model, "arnoldi", LAMBDA, rank_estimate=8, residuals=True)
    inf.fit(train)
    counter = Counting(monkeypatch)
    factors = inf.factors(test)
    assert counter.passes == 1
    # The reported residual is that of the low-rank solve against H + lambda I.
    hessian = HessianOperator(model, train).shift(LAMBDA)
    true = np.linalg.norm(to_numpy(hessian.mv(factors)) - grads_of(model, test), axis=1)
    np.testing.assert_allclose(inf.info.residual_norms, true, rtol=1e-8)


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
