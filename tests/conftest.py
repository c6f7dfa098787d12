"""Backend parametrisation shared by the test suite.

Tests that take the ``backend_name`` fixture run once per selected backend.
The selection is ``--backend torch,jax`` (or ``INFLUX_TEST_BACKENDS``); by
default every backend whose framework is installed. A backend that is selected
explicitly but not installed is an error, not a skip, so a CI session cannot
pass by testing nothing.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

ALL_BACKENDS = ("torch", "jax")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="store",
        default=None,
        help="comma-separated backends to test (torch, jax, none); default: installed",
    )


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def selected_backends(config: pytest.Config) -> list[str]:
    raw = config.getoption("--backend") or os.environ.get("INFLUX_TEST_BACKENDS")
    if raw is None:
        return [name for name in ALL_BACKENDS if _installed(name)]
    names = [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"unknown backend(s) {unknown}; choose from {ALL_BACKENDS}"
        )
    missing = [n for n in names if not _installed(n)]
    if missing:
        raise pytest.UsageError(
            f"backend(s) {missing} selected but not installed: "
            "pip install 'influx[all]'"
        )
    return names


def pytest_configure(config: pytest.Config) -> None:
    # Added here rather than in pyproject's filterwarnings: pytest resolves the
    # category of an ini filter at startup, importing influx before pytest-cov
    # starts, so every module-level line of the package would read as missed.
    config.addinivalue_line("filterwarnings", "error::influx.NotConvergedWarning")
    if _installed("jax"):
        import jax

        jax.config.update("jax_enable_x64", True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", selected_backends(metafunc.config))


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    both = all(_installed(n) for n in ALL_BACKENDS)
    skip = pytest.mark.skip(reason="needs torch and jax installed (nox -s cross)")
    for item in items:
        if "cross" in item.keywords and not both:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start with no INFLUX_BACKEND from the caller's environment."""
    monkeypatch.delenv("INFLUX_BACKEND", raising=False)


@pytest.fixture(scope="session")
def dask_client():
    """A ``distributed.Client`` on a local cluster of 2 worker processes.

    One thread per worker. The workers get this checkout on their path (for
    the test modules that tasks import) and JAX's float64 switched on, as
    this process has it. Shared by the session: tests that kill workers make
    their own cluster.
    """
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from influx._job_cluster import without_malloc_trim

    with (
        without_malloc_trim(),
        LocalCluster(**local_cluster_options(2)) as cluster,
        Client(cluster) as client,
    ):
        yield client


def local_cluster_options(workers: int) -> dict:
    """Keyword arguments of a quiet ``LocalCluster`` of ``workers`` processes."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = [str(root / "tests"), str(root / "src"), str(root / "backends")]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        paths.append(existing)
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
        "silence_logs": 40,  # logging.ERROR
        "env": {"PYTHONPATH": os.pathsep.join(paths), "JAX_ENABLE_X64": "1"},
    }
