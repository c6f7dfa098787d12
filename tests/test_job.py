"""``influx run job.toml``: the examples end to end, the plan, and config errors.

The example jobs (``examples/<backend>/job.toml``) run with small factory
arguments and outputs in a temporary folder; their stores are compared with a
direct :class:`influx.Influence` computation on a model built by calling the
example's factory directly (float64, to 1e-10).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import influx
from influx import cli
from influx.job import JobError, load_job, run_job

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-10
SMALL = {"n_train": 60, "n_test": 5, "epochs": 15, "hidden": 6}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _toml(config: dict[str, Any]) -> str:
    """A TOML document of scalars and one level of tables (enough here)."""
    top = [f"{k} = {_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    tables = [
        f"[{name}]\n" + "\n".join(f"{k} = {_value(v)}" for k, v in table.items())
        for name, table in config.items()
        if isinstance(table, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def example_config(framework: str, /, **tables: Any) -> dict[str, Any]:
    """The example's job, small, writing next to the job file (a temp folder)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with open(ROOT / "examples" / framework / "job.toml", "rb") as handle:
        config = tomllib.load(handle)
    config["python_path"] = [str(ROOT)]
    config["factory_args"] = dict(SMALL)
    config["data"] = {"batch_size": 10, "partition_size": 20}
    config["output"] = {"scores": "scores.zarr", "self_influence": "self.zarr"}
    config["output"]["top_k"] = 4
    config.pop("cluster", None)
    for name, table in tables.items():
        if table is None:
            config.pop(name, None)
        elif isinstance(table, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **table}
        else:
            config[name] = table
    return config


def write_job(folder: Path, config: dict[str, Any], name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(_toml(config))
    return path


@functools.cache
def reference(backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and self-influence of the example's model, computed directly."""
    module = importlib.import_module(f"examples.{backend}.factory")
    built = module.build(**SMALL)
    model = influx.twice_differentiable(
        built["model"], built["loss"], params=built.get("params")
    )
    train = influx.batches(*built["train"], batch_size=10)
    test = influx.batches(*built["test"], batch_size=10)
    inf = influx.Influence(model, "ekfac", 1e-3, fisher="empirical")
    inf.fit(train)
    to_numpy = np.asarray if backend == "jax" else lambda a: a.detach().numpy()
    return to_numpy(inf.influences(test, train)), to_numpy(inf.self_influence(train))


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def run_cli(*args: str) -> int:
    return cli.main(["run", "--no-progress", *map(str, args)])


def any_backend() -> str:
    for name in ("torch", "jax"):
        if _installed(name):
            return name
    pytest.skip("no framework installed")


# -- the examples ------------------------------------------------------------------


def check_outputs(folder: Path, backend: str, k: int = 4) -> None:
    import zarr

    scores, self_scores = reference(backend)
    stored = np.asarray(zarr.open_group(str(folder / "scores.zarr"))["scores"])
    assert stored.shape == scores.shape == (SMALL["n_test"], SMALL["n_train"])
    np.testing.assert_allclose(stored, scores, rtol=TOL, atol=TOL * abs(scores).max())
    stored_self = np.asarray(zarr.open_group(str(folder / "self.zarr"))["scores"])
    np.testing.assert_allclose(
        stored_self, self_scores, rtol=TOL, atol=TOL * abs(self_scores).max()
    )
    top = np.load(folder / "scores.top_k.npz")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top["indices"], order)
    np.testing.assert_allclose(
        top["values"], np.take_along_axis(scores, order, axis=1), rtol=TOL, atol=0
    )


def test_example_runs_in_process(
    backend_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = write_job(tmp_path, example_config(backend_name))
    assert run_cli(job) == 0
    check_outputs(tmp_path, backend_name)
    assert len(list(tmp_path.glob("scores.fit-*.npz"))) == 1
    (tmp_path / "scores.top_k.npz").unlink()
    # again: every chunk is done, so no fit and no new run in the stores
    monkeypatch.setattr(influx.Influence, "fit", None)
    capsys.readouterr()
    assert cli.main(["run", str(job)]) == 0
    assert "nothing to compute" in capsys.readouterr().err
    assert len(influx.open_results(tmp_path / "scores.zarr").runs) == 1
    check_outputs(tmp_path, backend_name)


def test_example_runs_on_two_local_workers(backend_name: str, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    import zarr

    # The factory's module lives in a folder only python_path names, and its
    # loss is pickled by reference: the workers import that module through
    # the job's worker plugin (they start with this process's sys.path).
    extra = tmp_path / "factories"
    extra.mkdir()
    module = f"job_factory_{backend_name}_{os.getpid()}"
    inner = {
        "torch": "from torch.nn.functional import cross_entropy",
        "jax": "from examples.jax.factory import cross_entropy",
    }[backend_name]
    (extra / f"{module}.py").write_text(
        f"from examples.{backend_name}.factory import build as _build\n"
        f"{inner}\n\n\n"
        "def loss(predictions, targets):\n"
        "    return cross_entropy(predictions, targets)\n\n\n"
        "def build(**kwargs):\n"
        "    return {**_build(**kwargs), 'loss': loss}\n"
    )
    config = example_config(
        backend_name,
        cluster={"local_workers": 2},
        factory=f"{module}:build",
        python_path=[str(ROOT), str(extra)],
    )
    job = write_job(tmp_path, config)
    assert run_cli(job) == 0
    assert str(extra) not in sys.path
    check_outputs(tmp_path, backend_name)
    # a rerun with a chunk of each store missing: the workers fill them from
    # the loaded fit
    for name in ("scores.zarr", "self.zarr"):
        zarr.open_group(str(tmp_path / name), mode="r+")["done"][2] = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(influx.Influence, "fit", None)
        assert run_cli(job) == 0
    assert influx.open_results(tmp_path / "self.zarr").done.tolist() == [1, 1, 2]
    check_outputs(tmp_path, backend_name)


def test_example_runs_as_a_command(backend_name: str, tmp_path: Path):
    job = write_job(tmp_path, example_config(backend_name))
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(ROOT / "backends")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "influx.cli", "run", str(job)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=1)
    assert done.returncode == 0, done.stderr
    assert "influx run: fit" in done.stderr
    check_outputs(tmp_path, backend_name)
    # the dry run of the finished job finds every chunk done
    dry = subprocess.run(
        [*command[:-1], "--dry-run", str(job)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "complete (3 of 3 chunks done)" in dry.stdout


# -- the plan ----------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_computes_nothing(
    backend_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = example_config(backend_name, cluster={"local_workers": 3})
    job = write_job(tmp_path, config)
    assert cli.main(["run", "--dry-run", str(job)]) == 0
    out = capsys.readouterr().out
    p = 4 * 6 + 6 + 6 * 3 + 3  # the 4 -> 6 -> 3 MLP
    for text in (
        f"backend      {backend_name}",
        f"P = {p} parameters, float64",
        "method       ekfac, curvature ggn, lambda = 0.001, fisher='empirical'",
        "N_train = 60, N_test = 5, batch 10",
        "partitions   3: 3 x 20 points",
        "local cluster of 3 worker processes",
        "[5, 60]",
        "[60]",
        "new",
        "fit          ekfac on the training data, saved to",
    ):
        assert text in out, text
    assert not (tmp_path / "scores.zarr").exists()
    assert not (tmp_path / "self.zarr").exists()


def test_plan_memory_per_worker(backend_name: str, tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, example_config(backend_name)))
    plan = job.plan()
    p, n_test, item = 51, 5, 8
    # EK-FAC: per layer the two eigenbases, their eigenvalues and the corrected
    # eigenvalues; layer 1 is 6 x (4 + 1), layer 2 is 3 x (6 + 1)
    state = sum(o * o + a * a + o + a + o * a for o, a in ((6, 5), (3, 7)))
    assert plan.memory == {
        "model": p * item,
        "factors": n_test * p * item,
        "gradients": 10 * p * item,
        "block": n_test * 20 * item,
        "state": state * item,
    }
    assert plan.memory_per_worker == sum(plan.memory.values())
    assert plan.result_bytes == (n_test * 60 + 60) * item
    assert plan.chunk_widths == [20, 20, 20]


def test_dry_run_counts_chunks_done_and_a_rerun_resumes(
    backend_name: str, tmp_path: Path
) -> None:
    import zarr

    job_path = write_job(tmp_path, example_config(backend_name))
    assert run_cli(job_path) == 0
    done = zarr.open_group(str(tmp_path / "scores.zarr"), mode="r+")["done"]
    done[1] = 0  # as if the run had stopped before this chunk
    plan = run_job(load_job(job_path), dry_run=True, progress=False).plan
    scores_state = plan.stores[0][1]
    assert (scores_state.chunks, scores_state.done) == (3, 2)
    assert "2 of 3 chunks done, 1 to compute" in str(plan)
    assert plan.fit.startswith("loaded from") and "scores.fit-" in plan.fit
    assert plan.stores[1][1].status() == "complete (3 of 3 chunks done)"
    # the rerun loads the first run's fit (fitting again would fail here)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(influx.Influence, "fit", None)
        assert run_cli(job_path) == 0
    scores = influx.open_results(tmp_path / "scores.zarr")
    assert [run["number"] for run in scores.runs] == [1, 2]
    assert scores.done.tolist() == [1, 2, 1]  # run 2 computed chunk 1 only
    self_scores = influx.open_results(tmp_path / "self.zarr")
    assert self_scores.written_by(2) == 0 and self_scores.complete
    check_outputs(tmp_path, backend_name)


def test_store_of_another_job_is_refused_before_any_work(
    backend_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_path = write_job(tmp_path, example_config(backend_name))
    assert run_cli(job_path) == 0
    before = influx.open_results(tmp_path / "scores.zarr")
    stored = np.asarray(before.scores[:])
    (first_fit,) = (path.name for path in tmp_path.glob("scores.fit-*.npz"))
    other = example_config(backend_name, influence={"hessian_regularization": 0.1})
    write_job(tmp_path, other)

    def no_fit(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the job fitted before checking its stores")

    with monkeypatch.context() as patch:
        patch.setattr(influx.Influence, "fit", no_fit)
        capsys.readouterr()
        assert cli.main(["run", "--dry-run", str(job_path)]) == 2
        out, err = capsys.readouterr()
        assert "ERROR:" in out and "holds the results of another job" in out
        assert "hessian_regularization: stored 0.001, this call 0.1" in err
        assert "overwrite = true" in err
        assert run_cli(job_path) == 2
    after = influx.open_results(tmp_path / "scores.zarr")
    assert after.runs == before.runs
    np.testing.assert_array_equal(np.asarray(after.scores[:]), stored)
    # overwrite = true starts over
    write_job(tmp_path, {**other, "output": {**other["output"], "overwrite": True}})
    assert run_cli(job_path) == 0
    replaced = influx.open_results(tmp_path / "scores.zarr")
    assert replaced.fingerprint["hessian_regularization"] == 0.1
    assert [run["number"] for run in replaced.runs] == [1]
    fits = list(tmp_path.glob("scores.fit-*.npz"))
    assert len(fits) == 1 and fits[0].name != first_fit


def test_a_path_that_is_no_store_is_never_touched(tmp_path, capsys) -> None:
    (tmp_path / "scores.zarr").mkdir()
    (tmp_path / "scores.zarr" / "notes.txt").write_text("mine")
    config = example_config(any_backend(), output={"overwrite": True})
    job = write_job(tmp_path, config)
    capsys.readouterr()
    assert run_cli(job) == 2
    assert "is not an influx results store" in capsys.readouterr().err
    assert (tmp_path / "scores.zarr" / "notes.txt").read_text() == "mine"


# -- config errors -----------------------------------------------------------------


def returns_a_list(**kwargs: Any) -> list[int]:
    return [1, 2]


def returns_no_test(**kwargs: Any) -> dict[str, Any]:
    built = importlib.import_module(f"examples.{any_backend()}.factory").build(**SMALL)
    del built["test"]
    return built


def returns_bad_train(**kwargs: Any) -> dict[str, Any]:
    built = importlib.import_module(f"examples.{any_backend()}.factory").build(**SMALL)
    built["train"] = "train.csv"
    return built


def returns_a_source(**kwargs: Any) -> dict[str, Any]:
    built = importlib.import_module(f"examples.{any_backend()}.factory").build(**SMALL)
    built["train"] = influx.ArraySource(*built["train"], batch_size=30)
    return built


def expect_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Any, *needles: str
) -> str:
    """Run the job through the CLI: status 2, one message, no store touched."""
    path = write_job(tmp_path, config) if isinstance(config, dict) else config
    capsys.readouterr()
    assert run_cli(path) == 2
    err = capsys.readouterr().err
    assert err.startswith("influx run: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "scores.zarr").exists()
    with pytest.raises(JobError):
        run_job(load_job(path), progress=False)
    return err


def test_unknown_keys_are_named_with_the_allowed_ones(tmp_path, capsys) -> None:
    config = example_config(any_backend())
    config["bakcend"] = config.pop("backend")
    expect_error(
        tmp_path, capsys, config, "unknown key 'bakcend'", "did you mean 'backend'"
    )
    config = example_config(any_backend())
    config["output"]["scroes"] = config["output"].pop("scores")
    expect_error(
        tmp_path,
        capsys,
        config,
        "unknown key [output] 'scroes'",
        "Allowed keys in [output]: scores, self_influence, top_k, overwrite",
    )


def test_missing_and_mistyped_keys(tmp_path, capsys) -> None:
    config = example_config(any_backend())
    del config["factory"]
    expect_error(tmp_path, capsys, config, "factory is missing")
    config = example_config(any_backend(), data={"batch_size": "big"})
    expect_error(tmp_path, capsys, config, "[data] batch_size must be int")
    config = example_config(any_backend(), data={"batch_size": 0})
    expect_error(tmp_path, capsys, config, "batch_size must be a positive integer")
    path = tmp_path / "broken.toml"
    path.write_text("backend = \n")
    expect_error(tmp_path, capsys, path, "is not valid TOML")
    expect_error(tmp_path, capsys, tmp_path / "none.toml", "no such job file")


def test_factory_errors(tmp_path, capsys) -> None:
    backend = any_backend()
    config = example_config(backend, factory="no_such_module_xyz:build")
    expect_error(tmp_path, capsys, config, "cannot import the module", "python_path")
    config = example_config(backend, factory="examples.data:no_such_function")
    expect_error(tmp_path, capsys, config, "has no 'no_such_function'")
    config = example_config(backend, factory="test_job:returns_a_list")
    expect_error(tmp_path, capsys, config, "must return a mapping", "got list")
    config = example_config(backend, factory="test_job:returns_no_test")
    expect_error(tmp_path, capsys, config, "returned no 'test'")
    config = example_config(backend, factory="test_job:returns_bad_train")
    expect_error(tmp_path, capsys, config, "'train' must be a pair (x, y)")
    config = example_config(backend, factory_args={"n_trian": 5})
    expect_error(tmp_path, capsys, config, "does not take the [factory_args]")
    config = example_config(backend, factory="test_job:returns_a_source")
    expect_error(
        tmp_path, capsys, config, "is an influx Source", "batch_size, partition_size"
    )
    config = example_config(backend, python_path=["no/such/folder"])
    expect_error(tmp_path, capsys, config, "python_path entry 'no/such/folder'")


def test_backend_errors(tmp_path, capsys, monkeypatch) -> None:
    backend = any_backend()
    config = example_config(backend, backend="tensorflow")
    expect_error(tmp_path, capsys, config, "Unknown backend 'tensorflow'")

    from influx import backends

    def not_installed(name: Any) -> Any:
        raise backends.BackendNotInstalledError(
            f'The {name!r} backend needs it: pip install "influx[{name}]"'
        )

    with monkeypatch.context() as patch:
        patch.setattr(backends, "get_backend", not_installed)
        config = example_config(backend)
        expect_error(
            tmp_path, capsys, config, f"backend = {backend!r} is not installed", "pip"
        )


@pytest.mark.cross
@pytest.mark.parametrize("model_backend", ["torch", "jax"])
def test_backend_that_is_not_the_models(model_backend: str, tmp_path, capsys) -> None:
    other = {"torch": "jax", "jax": "torch"}[model_backend]
    config = example_config(model_backend, backend=other)
    expect_error(tmp_path, capsys, config, f"backend = {other!r}", model_backend)


def test_method_errors(tmp_path, capsys) -> None:
    config = example_config(any_backend(), influence={"method": "ekfak"})
    expect_error(tmp_path, capsys, config, "[influence]", "Unknown inversion_method")
    config = example_config(any_backend(), influence={"options": {"fishr": "mc"}})
    expect_error(tmp_path, capsys, config, "'fishr'", "Valid options: fisher")
    config = example_config(any_backend(), influence={"hessian_regularization": -1})
    expect_error(tmp_path, capsys, config, "hessian_regularization must be")
    config = example_config(any_backend(), influence={"curvature": "fisher"})
    expect_error(tmp_path, capsys, config, "curvature must be one of 'hessian'")
    config = example_config(any_backend(), data={"partition_size": 25})
    expect_error(tmp_path, capsys, config, "must be a multiple of batch_size = 10")


def test_cluster_errors(tmp_path, capsys) -> None:
    pytest.importorskip("distributed")
    address = "tcp://127.0.0.1:1"
    config = example_config(
        any_backend(), cluster={"scheduler": address, "timeout": 0.5}
    )
    expect_error(tmp_path, capsys, config, "cannot reach the scheduler", address)
    config = example_config(
        any_backend(), cluster={"scheduler": address, "local_workers": 2}
    )
    expect_error(tmp_path, capsys, config, "both scheduler and local_workers")


def test_dry_run_counts_the_workers_of_a_scheduler(
    backend_name: str, tmp_path: Path, dask_client: Any
) -> None:
    address = dask_client.scheduler.address
    config = example_config(backend_name, cluster={"scheduler": address})
    plan = run_job(load_job(write_job(tmp_path, config)), dry_run=True).plan
    assert plan.workers == 2
    assert f"cluster      scheduler {address}, 2 workers" in str(plan)
    assert not (tmp_path / "scores.zarr").exists()
