"""The architecture's contracts (issue 8, item 3).

- ``src/influx`` imports no framework, not even inside a function: dense
  solves go through the backend (``cholesky_solve``, ``solve_triangular``).
- The core builds dense Hessians from batched ``hvp`` (no ``hessian`` in the
  protocol): checked against the framework's own full-Hessian transform.
- The solver registry is open: a registered solver is used by name and gets
  the model and the training data in ``init``.
- Default seeds are deterministic (LiSSA's is 0, ARPACK's start vector comes
  from the seed); initial guesses are per solve; ``maxiter`` is the one name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from models import batch_hessian, mlp_weights, rel_err, to_numpy, wrap_mlp

import influx
import influx.solvers
from influx.demo import demo_trainer
from influx.operators import DenseOperator, HessianOperator, identity_chunks
from influx.solvers import CgSolver, DirectSolver, LissaSolver, make_solver

SRC = Path(__file__).resolve().parents[1] / "src" / "influx"
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "equinox", "tensorflow")
LAMBDA = 1.0  # the MLP's Hessian has eigenvalues down to -0.26


def _problem(backend_name: str, sizes: tuple[int, ...] = (3, 4, 2), n: int = 23):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, sizes[0])), rng.standard_normal((n, sizes[-1]))
    model = wrap_mlp(backend_name, mlp_weights(sizes, seed=1))
    return model, x, y, influx.batches(x, y, batch_size=7)  # 7, 7, 7, 2


# -- no framework in the core ------------------------------------------------------


def test_core_source_imports_no_framework() -> None:
    """Every import statement of src/influx, at any depth (functions too)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [
                f"{path.relative_to(SRC)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in FRAMEWORKS
            ]
    assert found == []


def test_importing_every_core_module_loads_no_framework() -> None:
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import influx
        for info in pkgutil.walk_packages(influx.__path__, "influx."):
            importlib.import_module(info.name)
        print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_backend_dense_solves_match_numpy(backend_name: str) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 6))
    factor = np.linalg.cholesky(a @ a.T + 6 * np.eye(6))
    rhs = rng.standard_normal((6, 4))
    backend = influx.get_backend(backend_name)
    assert isinstance(backend, influx.protocols.DenseLinearAlgebra)
    native = backend.asarray
    solved = backend.cholesky_solve(native(factor), native(rhs))
    np.testing.assert_allclose(
        to_numpy(solved), np.linalg.solve(factor @ factor.T, rhs), rtol=1e-12
    )
    lower = backend.solve_triangular(native(factor), native(rhs), lower=True)
    np.testing.assert_allclose(
        to_numpy(lower), np.linalg.solve(factor, rhs), rtol=1e-12
    )
    upper = backend.solve_triangular(native(factor.T), native(rhs), lower=False)
    np.testing.assert_allclose(
        to_numpy(upper), np.linalg.solve(factor.T, rhs), rtol=1e-12
    )


# -- the protocol carries what the core uses -----------------------------------------


@pytest.mark.parametrize("host", [False, True])
def test_dense_hessian_from_hvp_equals_the_full_hessian(
    backend_name: str, host: bool
) -> None:
    # P = 3*40 + 40 + 40*3 + 3 = 283: two chunks of 142 rows, the last padded.
    model, x, y, train = _problem(backend_name, sizes=(3, 40, 3))
    if host and backend_name != "jax":
        pytest.skip("host mode is for JAX on the CPU")
    operator = HessianOperator(model, train, host=host)
    dense = operator.to_dense()
    assert operator.num_passes == 1  # one pass over the data for all chunks
    reference = batch_hessian(model, x, y)  # the mean loss over all 23 points
    assert tuple(dense.shape) == (283, 283)
    assert rel_err(dense, reference) < 1e-12
    # A wider accumulation dtype on request (the half-precision path).
    shifted = operator.shift(LAMBDA).to_dense(dtype=operator.dtype)
    assert rel_err(shifted, reference + LAMBDA * np.eye(283)) < 1e-12


def test_identity_chunks_have_one_shape() -> None:
    like = np.zeros(3)
    for size in (1, 5, 256, 257, 600, 1000):
        chunks = list(identity_chunks(size, like, np.float64))
        assert len({c.shape for c in chunks}) == 1
        assert chunks[0].shape[0] <= 256
        np.testing.assert_array_equal(np.concatenate(chunks)[:size], np.eye(size))
        assert not np.concatenate(chunks)[size:].any()  # padding rows are zero


def test_adapters_have_no_hessian_and_backends_no_demo(backend_name: str) -> None:
    model, *_ = _problem(backend_name)
    assert not hasattr(model, "hessian")
    assert not hasattr(model.backend, "train_demo_model")
    trainer = demo_trainer(model.backend)
    assert trainer.__module__ == f"influx_{backend_name}._demo"


def test_demo_trainer_of_a_backend_without_demo() -> None:
    class Plugin:  # a backend class in a package that ships no _demo
        name = "plugin"

    Plugin.__module__ = "influx_no_such_package._backend"
    with pytest.raises(ValueError, match="'plugin' backend has no demo model"):
        demo_trainer(Plugin())


def test_core_checks_the_parameters(backend_name: str) -> None:
    model, *_ = _problem(backend_name)

    class Wrapper:  # a third-party wrapper without parameter_blocks
        def __init__(self, parameters: Any) -> None:
            self.parameters, self.num_params = parameters, 26
            self.backend = model.backend

    theta = to_numpy(model.parameters).copy()
    theta[[3, 20]] = [np.nan, np.inf]
    bad = Wrapper(model.backend.asarray(theta))
    with pytest.raises(influx.InputError, match=r"flat indices 3, 20 hold NaN or inf"):
        HessianOperator(bad, [])
    integer = Wrapper(model.backend.asarray(np.arange(26)))
    with pytest.raises(TypeError, match="real floating dtype"):
        HessianOperator(integer, [])


def test_jax_integer_parameters_are_refused_by_the_core() -> None:
    jnp = pytest.importorskip("jax.numpy")
    params = {"w": jnp.arange(3)}
    with pytest.raises(TypeError, match="real floating dtype"):
        influx.twice_differentiable(
            lambda p, x: x @ p["w"], lambda p, y: jnp.mean((p - y) ** 2), params=params
        )


# -- the solver registry --------------------------------------------------------------


class RecordingSolver(influx.Solver):
    """The direct solve, recording what ``init`` receives."""

    name = "recording"
    seen: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, *, factor: float = 1.0) -> None:
        self.factor = factor
        self._direct = DirectSolver()

    def init(
        self,
        operator: Any,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> Any:
        RecordingSolver.seen = {"model": model, "training_data": training_data}
        return self._direct.init(operator)

    def solve(
        self, state: Any, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> Any:
        x, info = self._direct.solve(state, rhs)
        return self.factor * x, info


@pytest.fixture
def registered() -> Any:
    influx.register_solver("Mine", RecordingSolver)
    yield RecordingSolver
    influx.solvers.SOLVERS.pop("mine")


def test_registered_solver_is_used_by_name_and_gets_the_model(
    backend_name: str, registered: Any
) -> None:
    model, _, _, train = _problem(backend_name)
    inf = influx.Influence(model, method="MINE", hessian_regularization=LAMBDA)
    assert isinstance(inf.solver, registered) and inf.solver.factor == 1.0
    inf.fit(train)
    assert registered.seen["model"] is model
    assert registered.seen["training_data"] is train
    doubled = influx.Influence(model, "mine", LAMBDA, factor=2.0).fit(train)
    direct = influx.Influence(model, "direct", LAMBDA).fit(train)
    np.testing.assert_allclose(
        to_numpy(doubled.factors(train)),
        2 * to_numpy(direct.factors(train)),
        rtol=1e-12,
    )
    with pytest.raises(
        TypeError, match=r"Unknown option 'rtol'.*Valid options: factor"
    ):
        influx.Influence(model, "mine", rtol=1e-3)


def test_registry_errors(registered: Any) -> None:
    with pytest.raises(influx.InputError, match=r"'arnoldi',.*'mine'.*register_solver"):
        make_solver("newton")
    with pytest.raises(ValueError, match="'mine' is taken by RecordingSolver"):
        influx.register_solver("mine", LissaSolver)
    influx.register_solver("mine", RecordingSolver)  # the same class again: fine
    with pytest.raises(TypeError, match=r"subclass of influx\.Solver"):
        influx.register_solver("other", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is taken by DirectSolver"):
        influx.register_solver("direct", RecordingSolver)
    solver = CgSolver()
    assert make_solver(solver) is solver
    with pytest.raises(TypeError, match="options are set on it"):
        make_solver(solver, rtol=1e-3)
    with pytest.raises(TypeError, match=r"instantiate it, e.g. CgSolver\(\)"):
        make_solver(CgSolver)


# -- one name per concept, deterministic seeds, per-solve guesses ---------------------


def test_arnoldi_max_iter_is_a_deprecated_alias_of_maxiter() -> None:
    assert "maxiter" in influx.ArnoldiSolver.option_names()
    assert "max_iter" not in influx.ArnoldiSolver.option_names()
    with pytest.warns(DeprecationWarning, match=r"use maxiter=7"):
        solver = make_solver("arnoldi", max_iter=7)
    assert solver.maxiter == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_solver("arnoldi", maxiter=7).maxiter == 7
    with pytest.raises(TypeError, match="pass only maxiter=7"):
        make_solver("arnoldi", max_iter=7, maxiter=8)


def test_default_lissa_is_deterministic(backend_name: str) -> None:
    model, _, _, train = _problem(backend_name)
    assert LissaSolver().seed == 0
    runs = [
        to_numpy(influx.Influence(model, "lissa", LAMBDA).fit(train).factors(train))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    other = influx.Influence(model, "lissa", LAMBDA, seed=1).fit(train)
    assert not np.array_equal(to_numpy(other.factors(train)), runs[0])


def test_arpack_start_vector_comes_from_the_seed(
    backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scipy.sparse.linalg

    model, _, _, train = _problem(backend_name)
    starts: list[np.ndarray] = []
    eigsh = scipy.sparse.linalg.eigsh

    def recording(*args: Any, **kwargs: Any) -> Any:
        starts.append(kwargs["v0"])
        return eigsh(*args, **kwargs)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", recording)
    options = {"eigensolver": "arpack", "rank_estimate": 3}
    runs = [
        to_numpy(
            influx.Influence(model, "arnoldi", LAMBDA, **options, **seed)
            .fit(train)
            .factors(train)
        )
        for seed in ({}, {}, {"seed": 5})
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    size = model.num_params
    np.testing.assert_array_equal(starts[0], starts[1])
    np.testing.assert_array_equal(
        starts[0], np.random.default_rng(0).standard_normal(size)
    )
    np.testing.assert_array_equal(
        starts[2], np.random.default_rng(5).standard_normal(size)
    )


def _spd(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return (q * np.geomspace(1.0, 100.0, size)) @ q.T


def test_cg_initial_guess_per_solve() -> None:
    matrix = _spd(30, seed=1)
    rhs = np.random.default_rng(2).standard_normal((3, 30))
    exact = np.linalg.solve(matrix, rhs.T).T
    # One CG per column (block=False): a warm start then saves iterations in
    # every column, which the shared Krylov space of block CG need not show.
    solver = CgSolver(
        preconditioner=None, rtol=1e-10, atol=0.0, x0=np.zeros(30), block=False
    )
    state = solver.init(DenseOperator(matrix))
    cold, cold_info = solver.solve(state, rhs)
    guess = exact + 1e-6 * np.random.default_rng(3).standard_normal(exact.shape)
    warm, warm_info = solver.solve(state, rhs, x0=guess)  # over the option's x0
    assert rel_err(warm, exact) < 1e-8 and rel_err(cold, exact) < 1e-8
    assert warm_info.iterations.max() < cold_info.iterations.min()
    _, exact_info = solver.solve(state, rhs, x0=exact[0])  # [P]: shared by rows
    assert exact_info.iterations[0] == 0 < exact_info.iterations[1:].min()


def test_lissa_initial_guess_per_solve(backend_name: str) -> None:
    model, _, _, train = _problem(backend_name)
    operator = HessianOperator(model, train).shift(LAMBDA)
    solver = LissaSolver(rtol=1e-8)
    state = solver.init(operator, model=model, training_data=train)
    rhs = model.per_sample_grads(*[model.backend.asarray(a) for a in train[0]])[0]
    cold, cold_info = solver.solve(state, rhs)
    warm, warm_info = solver.solve(state, rhs, x0=cold)
    assert warm_info.all_converged and cold_info.all_converged
    assert warm_info.iterations.max() < cold_info.iterations.min()
    assert rel_err(warm, to_numpy(cold)) < 1e-6


def test_optional_dependencies_are_imported_lazily() -> None:
    """``import influx`` (and its public modules) loads no optional extra.

    dask, distributed and zarr (the ``dask`` extra), matplotlib (``plot``)
    and the docs tools are imported only by the calls that use them.
    """
    optional = ["dask", "distributed", "zarr", "matplotlib", "mkdocs", "cloudpickle"]
    code = textwrap.dedent(
        f"""
        import sys
        import influx, influx.job, influx.metrics, influx.plot, influx.sources
        print(sorted(m for m in {optional!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
