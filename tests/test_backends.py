"""Backend selection, the plugin registry and a third-party backend.

Selection order: an explicit ``backend=`` argument, then ``influx.use_backend``,
then the ``INFLUX_BACKEND`` environment variable (read at call time), then
detection from the model or array type.

This module imports neither torch nor JAX at module level: the tests that need
no framework (stub backends, the numpy plugin, subprocess checks) also run in a
session with neither installed. Framework tests take ``backend_name`` or call
``pytest.importorskip``.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from models import linear_weights, to_numpy, wrap_mlp

import influx
import influx.backends
from influx.backends import BackendNotInstalledError, resolve_backend

FAKE_BACKEND_SOURCE = Path(__file__).parent / "fake_backend" / "fake_influx_backend.py"
PLUGIN = "numpy_linear"


class StubBackend:
    """A minimal Backend object that owns nothing (no framework needed)."""

    framework_module = "numpy"

    def __init__(self, name: str) -> None:
        self.name = name

    def owns(self, obj: Any) -> bool:
        return False

    def is_native_array(self, obj: Any) -> bool:
        return False

    def asarray(self, obj: Any, like: Any | None = None) -> Any:
        return obj

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def twice_differentiable(self, model: Any, loss: Any, *, params: Any = None) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"StubBackend({self.name!r})"


def _selected() -> Any:
    """The backend a call on a framework-neutral numpy array resolves to."""
    return resolve_backend(np.ones(3))


def _nothing_selected() -> bool:
    try:
        _selected()
    except TypeError as error:
        return "Cannot tell which framework" in str(error)
    return False


# -- a third-party distribution in a temporary folder ---------------------------


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install ``fake_influx_backend`` as a distribution on ``sys.path``.

    Yields the folder that holds the module and its ``.dist-info``.
    """
    shutil.copy(FAKE_BACKEND_SOURCE, tmp_path / "fake_influx_backend.py")
    info = tmp_path / "fake_influx_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake_influx_backend\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        f"[influx.backends]\n{PLUGIN} = fake_influx_backend:NumpyBackend\n"
    )
    sys.modules.pop("fake_influx_backend", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    influx.backends._clear_caches()
    yield tmp_path
    influx.backends._clear_caches()
    sys.modules.pop("fake_influx_backend", None)


def _plugin_module() -> ModuleType:
    """Load the plugin through influx (not by importing it) and return its module."""
    influx.get_backend(PLUGIN)
    return sys.modules["fake_influx_backend"]


# -- selection order -------------------------------------------------------------


def test_unknown_backend_is_a_value_error_listing_the_available_ones() -> None:
    assert {"torch", "jax"} <= set(influx.available_backends())
    available = ", ".join(influx.available_backends())
    message = rf"Unknown backend 'tensorflow'\. Available backends: {available}\."
    with pytest.raises(ValueError, match=message):
        influx.get_backend("tensorflow")
    with pytest.raises(ValueError, match=message):
        with influx.use_backend("tensorflow"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match=message):
        resolve_backend(np.ones(3), backend="tensorflow")


def test_unknown_backend_in_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFLUX_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match=r"Unknown backend 'tensorflow'.*jax, torch"):
        _selected()


def test_backend_must_be_a_name_or_a_backend_object() -> None:
    with pytest.raises(TypeError, match="backend must be a backend name or object"):
        influx.get_backend(3)  # type: ignore[arg-type]


def test_explicit_beats_context_beats_environment(
    fake_dist: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit, context = StubBackend("explicit"), StubBackend("context")
    assert _nothing_selected()
    # The variable is read at call time: setting it after import takes effect.
    monkeypatch.setenv("INFLUX_BACKEND", f"  {PLUGIN.upper()} ")
    plugin = _selected()
    assert plugin.name == PLUGIN
    assert plugin is influx.get_backend(PLUGIN)
    with influx.use_backend(context) as yielded:
        assert yielded is context
        assert _selected() is context
        assert resolve_backend(np.ones(3), backend=explicit) is explicit
        assert resolve_backend(np.ones(3), backend=PLUGIN) is plugin
    assert _selected() is plugin
    monkeypatch.delenv("INFLUX_BACKEND")
    assert _nothing_selected()
    assert resolve_backend(np.ones(3), backend=explicit) is explicit


def test_use_backend_restores_on_exit_on_error_and_when_nested() -> None:
    outer, inner = StubBackend("outer"), StubBackend("inner")
    assert _nothing_selected()
    with influx.use_backend(outer):
        with influx.use_backend(inner):
            assert _selected() is inner
            with influx.use_backend(outer):
                assert _selected() is outer
            assert _selected() is inner
        assert _selected() is outer
        with pytest.raises(RuntimeError, match="boom"):
            with influx.use_backend(inner):
                assert _selected() is inner
                raise RuntimeError("boom")
        assert _selected() is outer
    assert _nothing_selected()


def test_failed_use_backend_leaves_the_selection_alone() -> None:
    outer = StubBackend("outer")
    with influx.use_backend(outer):
        with pytest.raises(ValueError, match="Unknown backend"):
            with influx.use_backend("no-such-backend"):
                pass  # pragma: no cover
        assert _selected() is outer


def test_use_backend_is_thread_local() -> None:
    """A thread has its own selection and does not see or change the caller's.

    ``threading.Thread`` starts in a fresh context (contextvars are not inherited,
    unless the interpreter runs with ``thread_inherit_context``), so a worker
    started inside ``use_backend`` begins with no selection and falls back to
    ``INFLUX_BACKEND`` and detection. ``contextvars.copy_context().run`` hands the
    caller's selection over explicitly.
    """
    main_choice, worker_choice = StubBackend("main"), StubBackend("worker")
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, Any] = {}

    def worker() -> None:
        try:
            seen["inherited_nothing"] = _nothing_selected()
            seen["inherited"] = None if seen["inherited_nothing"] else _selected()
            with influx.use_backend(worker_choice):
                barrier.wait()  # both threads are inside their own block
                seen["inside"] = _selected()
                barrier.wait()
            seen["after"] = _nothing_selected()
        except BaseException as error:  # surfaced in the main thread
            seen["error"] = error
            barrier.abort()

    with influx.use_backend(main_choice):
        thread = threading.Thread(target=worker)
        thread.start()
        barrier.wait()
        main_inside = _selected()
        barrier.wait()
        thread.join(timeout=30)
        main_after = _selected()
        copied = contextvars.copy_context()
    assert "error" not in seen, seen.get("error")
    if getattr(sys.flags, "thread_inherit_context", 0):
        assert seen["inherited"] is main_choice
    else:
        assert seen["inherited_nothing"]
    assert seen["inside"] is worker_choice
    assert seen["after"]
    assert main_inside is main_choice
    assert main_after is main_choice
    assert _nothing_selected()

    # Propagating the caller's context on purpose works as contextvars promise.
    handed_over: list[Any] = []
    thread = threading.Thread(target=lambda: handed_over.append(copied.run(_selected)))
    thread.start()
    thread.join(timeout=30)
    assert handed_over == [main_choice]


def test_use_backend_is_task_local() -> None:
    first, second = StubBackend("first"), StubBackend("second")

    async def task(choice: StubBackend) -> list[Any]:
        seen = []
        with influx.use_backend(choice):
            for _ in range(3):
                await asyncio.sleep(0)  # let the other task run inside its block
                seen.append(_selected())
        return seen

    async def main() -> tuple[list[Any], list[Any]]:
        return await asyncio.gather(task(first), task(second))

    seen_first, seen_second = asyncio.run(main())
    assert seen_first == [first] * 3
    assert seen_second == [second] * 3
    assert _nothing_selected()


def test_selection_order_with_the_builtin_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    torch_backend, jax_backend = influx.get_backend("torch"), influx.get_backend("jax")
    # Detection from the array type.
    assert resolve_backend(torch.ones(2)) == torch_backend
    assert resolve_backend(jnp.ones(2)) == jax_backend
    assert resolve_backend(np.ones(2), {"w": jnp.ones(2)}) == jax_backend
    # The environment variable, set after import.
    monkeypatch.setenv("INFLUX_BACKEND", "jax")
    assert _selected() == jax_backend
    monkeypatch.setenv("INFLUX_BACKEND", "torch")
    assert _selected() == torch_backend
    # The context beats the variable; the argument beats both.
    with influx.use_backend("jax"):
        assert _selected() == jax_backend
        assert resolve_backend(np.ones(2), backend="torch") == torch_backend
        assert resolve_backend(torch.ones(2), backend=torch_backend) == torch_backend
    assert _selected() == torch_backend


# -- known but not installed ---------------------------------------------------


def test_known_backend_without_its_framework_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The adapter is shipped with influx; its framework is what is missing.
    (tmp_path / "influx_fakefw_adapter.py").write_text(
        "import influx_fakefw_framework  # not installed\nclass FakeFwBackend: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        influx.backends._BUILTINS,
        "fakefw",
        (
            "influx_fakefw_adapter",
            "FakeFwBackend",
            "influx_fakefw_framework",
            "influx[fakefw]",
        ),
    )
    influx.backends._clear_caches()
    try:
        assert "fakefw" in influx.available_backends()
        hint = r'pip install "influx\[fakefw\]"'
        with pytest.raises(ImportError, match=hint) as info:
            influx.get_backend("fakefw")
        assert isinstance(info.value, BackendNotInstalledError)
        assert "influx_fakefw_framework" in str(info.value)
        with pytest.raises(ImportError, match=hint):
            with influx.use_backend("fakefw"):
                pass  # pragma: no cover
        monkeypatch.setenv("INFLUX_BACKEND", "fakefw")
        with pytest.raises(ImportError, match=hint):
            _selected()
        monkeypatch.delenv("INFLUX_BACKEND")
        # Detection skips a backend whose framework was never imported.
        assert _nothing_selected()
        assert "influx_fakefw_adapter" not in sys.modules
    finally:
        influx.backends._clear_caches()


def test_missing_adapter_is_a_broken_installation_not_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        influx.backends._BUILTINS,
        "ghost",
        ("influx_ghost_adapter", "GhostBackend", "numpy", "influx[ghost]"),
    )
    influx.backends._clear_caches()
    try:
        with pytest.raises(ImportError, match="influx_ghost_adapter") as info:
            influx.get_backend("ghost")
        assert not isinstance(info.value, BackendNotInstalledError)
    finally:
        influx.backends._clear_caches()


def _run_clean(code: str) -> str:
    """Run ``code`` in a fresh interpreter without INFLUX_BACKEND; return stdout."""
    env = {k: v for k, v in os.environ.items() if k != "INFLUX_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_builtin_backends_without_their_framework_name_the_extra() -> None:
    out = _run_clean(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        sys.modules["jax"] = None
        import influx
        for name in ("torch", "jax"):
            try:
                influx.get_backend(name)
            except ImportError as error:
                print(name, "|", error)
            else:
                print(name, "| loaded")
        """
    )
    lines = dict(line.split(" | ", 1) for line in out.strip().splitlines())
    assert 'pip install "influx[torch]"' in lines["torch"]
    assert 'pip install "influx[jax]"' in lines["jax"]


# -- detection never imports a framework ---------------------------------------


FRAMEWORK_MODULES = ("torch", "jax", "jaxlib", "influx_torch", "influx_jax")


def test_import_influx_imports_no_framework() -> None:
    out = _run_clean(
        f"""
        import sys
        import influx
        print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_data_and_detection_on_numpy_import_no_framework() -> None:
    out = _run_clean(
        f"""
        import sys
        import numpy as np
        import influx
        from influx.backends import detect_backend, resolve_backend

        data = influx.batches(np.zeros((5, 2)), np.zeros(5), batch_size=2)
        sizes = [len(x) for x, _ in data] + [len(x) for x, _ in data]
        names = influx.available_backends()
        owner = detect_backend(np.zeros(3), [np.zeros(2)])
        try:
            resolve_backend(np.zeros(3))
        except TypeError as error:
            message = str(error)
        print(sizes, names, owner, "Cannot tell" in message)
        print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))
        """
    )
    first, second = out.strip().splitlines()
    assert first == "[2, 2, 1, 2, 2, 1] ['jax', 'torch'] None True"
    assert second == "[]"


# -- the wrong framework for a model -------------------------------------------


def _torch_and_jax() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("jax")


def test_torch_module_under_a_jax_selection_is_a_type_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _torch_and_jax()
    import torch

    module = torch.nn.Linear(2, 1, dtype=torch.float64)
    loss = torch.nn.MSELoss()
    both = r"(?=.*\btorch\b)(?=.*\bjax\b)"
    with pytest.raises(TypeError, match=both + r".*the backend argument"):
        influx.twice_differentiable(module, loss, backend="jax")
    with influx.use_backend("jax"):
        with pytest.raises(TypeError, match=both + r".*use_backend"):
            influx.twice_differentiable(module, loss)
    monkeypatch.setenv("INFLUX_BACKEND", "jax")
    with pytest.raises(TypeError, match=both + r".*INFLUX_BACKEND"):
        influx.twice_differentiable(module, loss)
    # The explicit argument still wins over the variable.
    wrapped = influx.twice_differentiable(module, loss, backend="torch")
    assert wrapped.backend.name == "torch"


def test_jax_params_under_a_torch_selection_is_a_type_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _torch_and_jax()
    import jax.numpy as jnp

    params = {"w": jnp.ones(2)}
    monkeypatch.setenv("INFLUX_BACKEND", "torch")
    with pytest.raises(TypeError, match=r"is a jax object.*selects the torch backend"):
        influx.twice_differentiable(lambda p, x: x @ p["w"], jnp.mean, params=params)


def test_wrapped_torch_model_under_a_jax_selection_is_a_type_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _torch_and_jax()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 2)), rng.standard_normal((6, 1))
    model = wrap_mlp("torch", [linear_weights(2, 1)])
    data = influx.batches(x, y, batch_size=3)
    reference = influx.compute_influences(model, data)
    with influx.use_backend("jax"):
        with pytest.raises(TypeError, match=r"wrapped for the torch backend.*jax"):
            influx.compute_influences(model, data)
        with pytest.raises(TypeError, match=r"wrapped for the torch backend.*jax"):
            influx.compute_influences_up(model, data, np.zeros((1, 3)))
    monkeypatch.setenv("INFLUX_BACKEND", "jax")
    with pytest.raises(TypeError, match=r"wrapped for the torch backend.*jax"):
        influx.compute_influences(model, data)
    monkeypatch.setenv("INFLUX_BACKEND", "torch")
    np.testing.assert_array_equal(
        to_numpy(influx.compute_influences(model, data)), to_numpy(reference)
    )


def test_jax_model_detected_from_its_params() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    params = {"w": jnp.arange(3.0), "b": [jnp.zeros(())]}
    model = influx.twice_differentiable(
        lambda p, x: x @ p["w"] + p["b"][0],
        lambda pred, y: jnp.mean((pred - y) ** 2),
        params=params,
    )
    assert model.backend.name == "jax"
    assert model.num_params == 4
    assert isinstance(model.parameters, jax.Array)
    assert resolve_backend(model.parameters).name == "jax"


def test_apply_function_without_params_cannot_be_detected() -> None:
    with pytest.raises(TypeError, match=r"Cannot tell.*params=params"):
        influx.twice_differentiable(lambda p, x: x, lambda a, b: 0.0)


# -- a third-party backend through entry points --------------------------------


def test_plugin_is_registered_through_entry_points(fake_dist: Any) -> None:
    assert PLUGIN in influx.available_backends()
    assert {"torch", "jax"} <= set(influx.available_backends())
    assert "fake_influx_backend" not in sys.modules  # listing loads nothing
    backend = influx.get_backend(PLUGIN)
    module = sys.modules["fake_influx_backend"]
    assert Path(module.__file__).parent == fake_dist  # loaded from the distribution
    assert isinstance(backend, module.NumpyBackend)
    assert isinstance(backend, influx.Backend)
    assert influx.get_backend(PLUGIN.upper()) is backend  # loaded once, cached
    with influx.use_backend(PLUGIN) as selected:
        assert selected is backend
        assert _selected() is backend


def test_plugin_disappears_with_its_distribution(
    fake_dist: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert PLUGIN in influx.available_backends()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    influx.backends._clear_caches()
    assert PLUGIN not in influx.available_backends()
    with pytest.raises(ValueError, match=f"Unknown backend '{PLUGIN}'"):
        influx.get_backend(PLUGIN)


def test_plugin_model_is_detected_by_type_but_numpy_arrays_are_not(
    fake_dist: Any,
) -> None:
    module = _plugin_module()
    influx.backends._clear_caches()  # detection must find the plugin by itself
    model = module.LinearModel(*linear_weights(3, 2))
    wrapped = influx.twice_differentiable(model, module.mean_squared_error)
    assert isinstance(wrapped, module.LinearMSE)
    assert isinstance(wrapped, influx.TwiceDifferentiable)
    assert wrapped.backend.name == PLUGIN
    assert wrapped.num_params == 3 * 2 + 2
    # The plugin's framework module is numpy, yet it does not claim plain arrays.
    assert _nothing_selected()


def _linear_problem(seed: int = 0) -> dict[str, Any]:
    """A linear least-squares problem with separate train, test and input points."""
    rng = np.random.default_rng(seed)
    in_dim, out_dim = 3, 2
    weight, bias = linear_weights(in_dim, out_dim, seed=seed)
    x_train = rng.standard_normal((13, in_dim))
    y_train = rng.standard_normal((13, out_dim))
    return {
        "weight": weight,
        "bias": bias,
        "train": (x_train, y_train),
        "test": (rng.standard_normal((4, in_dim)), rng.standard_normal((4, out_dim))),
        "input": (rng.standard_normal((6, in_dim)), rng.standard_normal((6, out_dim))),
        "lam": 0.05,
    }


def _augment(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1))])


def closed_form(problem: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """I_up ``[T, M]`` and I_pert ``[T, M, D]`` of the linear MSE model.

    With ``x~ = [x; 1]``, ``C = X~^T X~ / N``, ``A = (2/O) C + lam I``,
    ``r = W x + b - y`` and ``u_t = A^{-1} x~_t = [u_x; u_1]``:

    - ``I_up(t, z) = (4/O^2) (r_t . r_z) (u_t . x~_z)``;
    - ``I_pert(t, z) = (4/O^2) [(r_t . r_z) u_x + (u_t . x~_z) W^T r_t]``.
    """
    weight, bias, lam = problem["weight"], problem["bias"], problem["lam"]
    out_dim, in_dim = weight.shape
    x_train = _augment(problem["train"][0])
    matrix = 2 / out_dim * x_train.T @ x_train / len(x_train) + lam * np.eye(in_dim + 1)
    (x_t, y_t), (x_z, y_z) = problem["test"], problem["input"]
    r_t, r_z = x_t @ weight.T + bias - y_t, x_z @ weight.T + bias - y_z
    u_t = np.linalg.solve(matrix, _augment(x_t).T).T  # [T, D+1]
    rr = r_t @ r_z.T  # [T, M]
    ux = u_t @ _augment(x_z).T  # [T, M]
    scale = 4 / out_dim**2
    up = scale * rr * ux
    pert = scale * (
        rr[:, :, None] * u_t[:, None, :in_dim]
        + ux[:, :, None] * (r_t @ weight)[:, None]
    )
    return up, pert


def _jacobian(x: np.ndarray, out_dim: int) -> np.ndarray:
    """``d pred / d theta`` for one input, ``[O, P]``, theta = [vec(W), b]."""
    in_dim = x.size
    jac = np.zeros((out_dim, out_dim * in_dim + out_dim))
    for o in range(out_dim):
        jac[o, o * in_dim : (o + 1) * in_dim] = x
        jac[o, out_dim * in_dim + o] = 1.0
    return jac


def test_closed_form_matches_a_brute_force_computation() -> None:
    """The reference itself, against explicit Jacobians and finite differences."""
    problem = _linear_problem()
    weight, bias, lam = problem["weight"], problem["bias"], problem["lam"]
    out_dim = weight.shape[0]
    theta = np.concatenate([weight.ravel(), bias])

    def grad(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        jac = _jacobian(x, out_dim)
        return 2 / out_dim * jac.T @ (jac @ theta - y)

    x_train = problem["train"][0]
    jacobians = [_jacobian(x, out_dim) for x in x_train]
    hessian = 2 / out_dim * sum(j.T @ j for j in jacobians) / len(x_train)
    hessian = hessian + lam * np.eye(theta.size)
    x_test, y_test = problem["test"]
    g_test = np.stack([grad(x, y) for x, y in zip(x_test, y_test, strict=True)])
    factors = np.linalg.solve(hessian, g_test.T).T
    x_in, y_in = problem["input"]
    up = factors @ np.stack([grad(x, y) for x, y in zip(x_in, y_in, strict=True)]).T
    step = 1e-3  # <s, grad l(x, y)> is quadratic in x: central differences are exact
    pert = np.zeros((len(factors), len(x_in), x_in.shape[1]))
    for m, (x, y) in enumerate(zip(x_in, y_in, strict=True)):
        for d in range(x.size):
            e = np.zeros_like(x)
            e[d] = step
            pert[:, m, d] = factors @ (grad(x + e, y) - grad(x - e, y)) / (2 * step)
    expected_up, expected_pert = closed_form(problem)
    np.testing.assert_allclose(expected_up, up, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(expected_pert, pert, rtol=1e-7, atol=1e-9)
    assert np.abs(expected_up).max() > 1e-2  # not trivially zero


def test_plugin_derivatives_match_finite_differences(fake_dist: Any) -> None:
    module = _plugin_module()
    problem = _linear_problem(seed=1)
    weight, bias = problem["weight"], problem["bias"]
    x, y = problem["train"][0][:5], problem["train"][1][:5]
    model = module.LinearMSE(module.LinearModel(weight, bias))
    p = model.num_params
    cut = weight.size

    def wrapper(theta: np.ndarray) -> Any:
        w, b = theta[:cut].reshape(weight.shape), theta[cut:]
        return module.LinearMSE(module.LinearModel(w, b))

    def sample_losses(theta: np.ndarray, x_: np.ndarray = x) -> np.ndarray:
        w, b = theta[:cut].reshape(weight.shape), theta[cut:]
        return np.mean((x_ @ w.T + b - y) ** 2, axis=1)

    theta = model.parameters
    grads, losses = model.per_sample_grads(x, y)
    np.testing.assert_allclose(losses, sample_losses(theta), rtol=1e-12)
    eye, step = np.eye(p), 1e-3  # the loss is quadratic: central differences are exact
    fd_grads = np.stack(
        [
            (sample_losses(theta + step * e) - sample_losses(theta - step * e))
            / (2 * step)
            for e in eye
        ],
        axis=1,
    )
    np.testing.assert_allclose(grads, fd_grads, rtol=1e-9, atol=1e-11)

    def batch_grad(theta_: np.ndarray) -> np.ndarray:
        return wrapper(theta_).per_sample_grads(x, y)[0].mean(axis=0)

    vectors = np.random.default_rng(2).standard_normal((3, p))
    fd_hvp = np.stack(
        [
            (batch_grad(theta + step * v) - batch_grad(theta - step * v)) / (2 * step)
            for v in vectors
        ]
    )
    np.testing.assert_allclose(model.hvp(x, y, vectors), fd_hvp, rtol=1e-9, atol=1e-11)
    hessian = influx.HessianOperator(model, [(x, y)]).to_dense()  # from hvp
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-14)
    np.testing.assert_allclose(vectors @ hessian, fd_hvp, rtol=1e-9, atol=1e-11)

    mixed = model.mixed_grads(x, y, vectors)
    assert mixed.shape == (3, len(x), x.shape[1])
    for d in range(x.shape[1]):
        e = np.zeros(x.shape[1])
        e[d] = step
        plus = model.per_sample_grads(x + e, y)[0] @ vectors.T  # [B, K]
        minus = model.per_sample_grads(x - e, y)[0] @ vectors.T
        np.testing.assert_allclose(
            mixed[:, :, d], ((plus - minus) / (2 * step)).T, rtol=1e-9, atol=1e-11
        )


@pytest.mark.parametrize("method", ["direct", "cg"])
@pytest.mark.parametrize("kind", ["up", "perturbation"])
def test_plugin_influences_equal_the_closed_form(
    fake_dist: Any, method: str, kind: str
) -> None:
    module = _plugin_module()
    problem = _linear_problem()
    model = influx.twice_differentiable(
        module.LinearModel(problem["weight"], problem["bias"]),
        module.mean_squared_error,
    )
    options = {"rtol": 1e-13, "atol": 0.0} if method == "cg" else {}
    x_in, y_in = problem["input"]
    result = influx.compute_influences(
        model,
        influx.batches(*problem["train"], batch_size=5),  # uneven: 5, 5, 3
        test_data=influx.batches(*problem["test"], batch_size=3),
        input_data=[(x_in[:4], y_in[:4]), (x_in[4:], y_in[4:])],  # a plain list
        inversion_method=method,
        influence_type=kind,
        hessian_regularization=problem["lam"],
        **options,
    )
    assert isinstance(result, np.ndarray)
    assert result.dtype == np.float64
    expected = closed_form(problem)[0 if kind == "up" else 1]
    assert result.shape == expected.shape
    np.testing.assert_allclose(
        result, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max()
    )
    if method == "direct":  # the core asked the plugin for its dense solve
        assert "cholesky_solve" in module.NumpyBackend.linalg_calls


def test_plugin_dense_solves_serve_self_influence(fake_dist: Any) -> None:
    module = _plugin_module()
    problem = _linear_problem()
    model = influx.twice_differentiable(
        module.LinearModel(problem["weight"], problem["bias"]),
        module.mean_squared_error,
    )
    train = influx.batches(*problem["train"], batch_size=5)
    inf = influx.Influence(model, "direct", problem["lam"]).fit(train)
    module.NumpyBackend.linalg_calls.clear()
    values = inf.self_influence(train)
    assert module.NumpyBackend.linalg_calls == ["solve_triangular"] * len(train)
    both = {**problem, "test": problem["train"], "input": problem["train"]}
    expected = np.diag(closed_form(both)[0])
    np.testing.assert_allclose(values, expected, rtol=1e-10)


def test_plugin_factors_and_info(fake_dist: Any) -> None:
    module = _plugin_module()
    problem = _linear_problem()
    model = influx.twice_differentiable(
        module.LinearModel(problem["weight"], problem["bias"]),
        module.mean_squared_error,
        backend=PLUGIN,
    )
    train = influx.batches(*problem["train"], batch_size=4)
    test = influx.batches(*problem["test"], batch_size=4)
    factors, info = influx.compute_influence_factors(
        model,
        train,
        test,
        "cg",
        hessian_perturbation=problem["lam"],
        rtol=1e-13,
        atol=0.0,
        return_info=True,
    )
    assert factors.shape == (4, model.num_params)
    assert info.all_converged
    assert info.iterations.max() <= model.num_params
    up = influx.compute_influences_up(model, influx.batches(*problem["input"]), factors)
    np.testing.assert_allclose(up, closed_form(problem)[0], rtol=1e-8, atol=1e-10)


def test_plugin_agrees_with_the_framework_backends(
    fake_dist: Any, backend_name: str
) -> None:
    """The numpy plugin and torch / JAX give the same influences on one model."""
    module = _plugin_module()
    problem = _linear_problem(seed=3)
    layers = [(problem["weight"], problem["bias"])]
    framework = wrap_mlp(backend_name, layers)
    plugin = influx.twice_differentiable(
        module.LinearModel(*layers[0]), module.mean_squared_error
    )
    train = influx.batches(*problem["train"], batch_size=5)
    for kind in ("up", "perturbation"):
        results = [
            to_numpy(
                influx.compute_influences(
                    model,
                    train,
                    test_data=[problem["test"]],
                    input_data=[problem["input"]],
                    influence_type=kind,
                    hessian_regularization=problem["lam"],
                )
            )
            for model in (plugin, framework)
        ]
        np.testing.assert_allclose(results[0], results[1], rtol=1e-9, atol=1e-12)


def test_plugin_runs_where_torch_and_jax_cannot_be_imported(
    fake_dist: Any, tmp_path: Path
) -> None:
    """A third-party backend needs neither framework (the ``core`` session)."""
    problem = _linear_problem()
    np.savez(
        tmp_path / "problem.npz",
        weight=problem["weight"],
        bias=problem["bias"],
        x_train=problem["train"][0],
        y_train=problem["train"][1],
        x_test=problem["test"][0],
        y_test=problem["test"][1],
        x_in=problem["input"][0],
        y_in=problem["input"][1],
    )
    out = _run_clean(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["jax"] = None
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np
        import influx

        p = np.load({str(tmp_path / "problem.npz")!r})
        from fake_influx_backend import LinearModel, mean_squared_error

        model = influx.twice_differentiable(
            LinearModel(p["weight"], p["bias"]), mean_squared_error
        )
        up = influx.compute_influences(
            model,
            influx.batches(p["x_train"], p["y_train"], batch_size=4),
            test_data=influx.batches(p["x_test"], p["y_test"]),
            input_data=influx.batches(p["x_in"], p["y_in"]),
            inversion_method="cg",
            hessian_regularization={problem["lam"]!r},
            rtol=1e-13,
            atol=0.0,
        )
        np.save({str(tmp_path / "up.npy")!r}, up)
        print(sorted(m for m in {FRAMEWORK_MODULES!r} if sys.modules.get(m)))
        """
    )
    assert out.strip() == "[]"
    up = np.load(tmp_path / "up.npy")
    np.testing.assert_allclose(up, closed_form(problem)[0], rtol=1e-8, atol=1e-10)


def test_this_module_imports_no_framework_at_module_level() -> None:
    """Collecting this file must not need torch or JAX."""
    header = Path(__file__).read_text().split("FAKE_BACKEND_SOURCE =")[0]
    for framework in ("torch", "jax"):
        assert f"import {framework}" not in header
        assert f"from {framework}" not in header
    plugin = FAKE_BACKEND_SOURCE.read_text()
    assert "import torch" not in plugin
    assert "import jax" not in plugin
