"""Sessions: tests per backend and Python, the framework-free core, cross-backend
agreement, lint, the demo, and the benchmark.

``nox`` runs the default sessions (lint, core, tests on torch 3.11 and JAX 3.10
and 3.13, cross, docs); ``nox -l`` lists
them. Interpreters that are not installed are skipped. ``nox -s coverage``
(not a default) runs the suite on both backends under coverage and prints the
report; ``nox -s bench`` (not a default: it is long) runs
``benchmarks/bench.py`` against pyDVL.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

# The default run: torch on 3.11, JAX on the oldest and newest Python, and
# cross-backend agreement (3.11, both); `nox -s "tests(3.11-jax)"` and
# `nox -s "tests(3.12-jax)"` run the middle versions.
JAX_DEFAULT_PYTHONS = ["3.10", "3.13"]
nox.options.sessions = [
    "lint",
    "core",
    "tests(3.11-torch)",
    *(f"tests({python}-jax)" for python in JAX_DEFAULT_PYTHONS),
    "cross",
    "docs",
]
nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = False

# torch is pinned to the CPU build this project tests against; override with
# INFLUX_TORCH_SPEC (e.g. "torch>=2.1") on another machine.
TORCH_SPEC = os.environ.get("INFLUX_TORCH_SPEC", "torch==2.13.0")
TORCH_PYTHON = "3.11"
JAX_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

#: flax (linen variables, nnx modules) and equinox modules, tested on JAX.
JAX_LIBRARIES = ["flax>=0.10", "equinox>=0.11"]

MATRIX = [(TORCH_PYTHON, "torch")] + [(python, "jax") for python in JAX_PYTHONS]


def _expose_pyenv_interpreters() -> None:
    """Put pyenv's installed interpreters on PATH so nox finds every version.

    pyenv's shims only run the versions that are activated; the interpreters
    themselves live in ``$PYENV_ROOT/versions/*/bin``.
    """
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if not versions.is_dir():
        return
    wanted = {TORCH_PYTHON, *JAX_PYTHONS}
    bins = [
        str(path / "bin")
        for path in sorted(versions.iterdir())
        if ".".join(path.name.split(".")[:2]) in wanted and (path / "bin").is_dir()
    ]
    os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


_expose_pyenv_interpreters()


def _install(session: nox.Session, *extras: str) -> None:
    if "torch" in extras:
        session.install(TORCH_SPEC)
    session.install(f".[{','.join(('test', *extras))}]")


@nox.session
@nox.parametrize("python,backend", MATRIX, ids=[f"{p}-{b}" for p, b in MATRIX])
def tests(session: nox.Session, backend: str) -> None:
    """The test suite on one backend and Python version."""
    _install(session, backend)
    if backend == "jax":
        # The JAX model libraries influx wraps as they are (tests skip without).
        session.install(*JAX_LIBRARIES)
    # One pytest worker per core (pytest-xdist); arguments replace it.
    arguments = session.posargs or ["-n", "auto"]
    session.run("pytest", f"--backend={backend}", *arguments)


@nox.session(python=TORCH_PYTHON)
def cross(session: nox.Session) -> None:
    """torch and JAX on the same weights must agree (both installed)."""
    _install(session, "torch", "jax")
    session.run("pytest", "-m", "cross", "--backend=torch,jax", *session.posargs)


@nox.session(python=TORCH_PYTHON)
def coverage(session: nox.Session) -> None:
    """The whole suite on both backends under coverage; prints the report.

    Not a default session. Arguments go to pytest.
    """
    _install(session, "torch", "jax")
    session.install(*JAX_LIBRARIES)
    session.run(
        "pytest",
        "--backend=torch,jax",
        "--cov=influx",
        "--cov=influx_torch",
        "--cov=influx_jax",
        "--cov-report=term",
        *session.posargs,
    )


@nox.session(python=TORCH_PYTHON)
def core(session: nox.Session) -> None:
    """The core without any framework: registry, data, solvers, a fake plugin."""
    _install(session)
    session.run(
        "python",
        "-c",
        "import sys, influx; "
        "assert not {'torch', 'jax'} & set(sys.modules), 'core imported a framework'",
    )
    session.run("pytest", "--backend=none", *session.posargs)


@nox.session(python=TORCH_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=TORCH_PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site with ``mkdocs build --strict``.

    No framework is installed: mkdocstrings reads the sources statically
    (griffe), so a broken link, a missing page or a stale API name fails.
    The pages' examples run in the test sessions (tests/test_docs.py).
    Arguments go to ``mkdocs build`` (e.g. ``--site-dir /tmp/site``).
    """
    session.install(".[docs]")
    env = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner
    session.run("mkdocs", "build", "--strict", *session.posargs, env=env)


@nox.session(python=TORCH_PYTHON)
@nox.parametrize("backend", ["torch", "jax"])
def demo(session: nox.Session, backend: str) -> None:
    """Run ``influx demo`` from a fresh install, as the README says."""
    _install(session, backend)
    session.run("influx", "demo", env={"INFLUX_BACKEND": backend})


# The peers' environments (benchmarks/.envs/<name>), one per pyDVL version:
# name -> pip requirements. A marker file records what was installed; a change
# here rebuilds that environment on the next `nox -s bench`.
PEER_REQUIREMENTS: dict[str, list[str]] = {
    "pydvl-0.7.0": [
        "pydvl==0.7.0",
        TORCH_SPEC,
        "numpy<2",
        "pandas<2.3",
        "scipy<1.14",
    ],
    "pydvl-0.10.0": ["pydvl[influence]==0.10.0", TORCH_SPEC],
    # The S1/S2 benchmark's K-FAC / EK-FAC peer (benchmarks/scale.py).
    "kronfluence-1.0.1": ["kronfluence==1.0.1", TORCH_SPEC],
}
PEER_ENVS = Path(__file__).resolve().parent / "benchmarks" / ".envs"
PEER_MARKER = ".installed"


def _peer_env(session: nox.Session, name: str, requirements: list[str]) -> None:
    """Create ``benchmarks/.envs/<name>`` unless its marker matches."""
    path = PEER_ENVS / name
    marker = path / PEER_MARKER
    wanted = "\n".join(requirements) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        session.log(f"{name}: up to date ({path})")
        return
    if path.exists():
        shutil.rmtree(path)
    session.run("python", "-m", "venv", str(path))
    python = str(path / "bin" / "python")
    session.run(python, "-m", "pip", "install", *requirements, external=True)
    marker.write_text(wanted)


@nox.session(python=TORCH_PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark against pyDVL; arguments go to ``benchmarks/bench.py``.

    Not a default session. ``nox -s bench -- --workloads W1 --repeats 1`` runs
    a part; see ``python benchmarks/bench.py --help``. ``nox -s bench -- scale``
    runs the S1/S2 benchmark against kronfluence and pyDVL instead
    (``benchmarks/scale.py``: workloads, jobs, then the report).
    """
    session.install(TORCH_SPEC)
    session.install("-e", ".[all]", "scikit-learn", "zarr")
    for name, requirements in PEER_REQUIREMENTS.items():
        _peer_env(session, name, requirements)
    if session.posargs[:1] == ["scale"]:
        session.run("python", "benchmarks/_scale.py")
        session.run("python", "benchmarks/scale.py", "run", *session.posargs[1:])
        session.run("python", "benchmarks/scale.py", "report")
        return
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session(python=TORCH_PYTHON)
def validity(session: nox.Session) -> None:
    """The validity suite; writes ``docs/validity.md`` and ``docs/figures``.

    Not a default session (minutes). Arguments go to
    ``benchmarks/validity/run.py`` (``-- --quick`` for a smoke run,
    ``-- --backends torch``).
    """
    session.install(TORCH_SPEC)
    session.install(".[jax,plot]", "scikit-learn")
    session.run("python", "benchmarks/validity/run.py", *session.posargs)
