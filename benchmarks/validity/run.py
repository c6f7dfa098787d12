"""Run the validity suite and write ``docs/validity.md`` with its figures.

Studies, in order: ``loo_logistic``, ``loo_mlp``, ``lds``, ``mislabel`` (each a
module next to this file with ``run(backends, quick) -> dict`` and
``section(results, figures) -> str``; one that is absent is skipped with a
note). Results go to ``benchmarks/results/validity/<study>.json``.

    python benchmarks/validity/run.py                  # the full suite
    python benchmarks/validity/run.py --quick          # a smoke run
    python benchmarks/validity/run.py --studies mislabel --reuse

A full run writes ``docs/validity.md`` and ``docs/figures/*.png``; ``--quick``
writes them under ``benchmarks/results/validity/quick/`` instead (the docs keep
the full numbers). ``--reuse`` renders the studies not run this time from
their saved JSON of an earlier full run. BLAS and OpenMP threads default to 1
(``OMP_NUM_THREADS`` and friends, unless set) so that timings are comparable.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, ROOT, environment, save_json  # noqa: E402

STUDIES = ["loo_logistic", "loo_mlp", "lds", "mislabel"]


def _module(name: str) -> object | None:
    """The study module ``name``, or ``None`` (with a note) if it is absent."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        print(f"validity: skipping {name} (no module benchmarks/validity/{name}.py)")
        return None


def _header(backends: list[str], quick: bool, seconds: dict[str, float]) -> str:
    env = environment(backends)
    versions = ", ".join(
        f"{k} {v}" for k, v in env.items() if k not in {"machine", "processor"}
    )
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return "\n".join(
        [
            "# Validity: do the numbers mean something?",
            "",
            "Influence scores are predictions of what retraining would do. This page "
            "checks them against retraining (leave-one-out, the linear datamodeling "
            "score) and on a task with a known answer (finding flipped labels), for "
            "each method and both backends. `influx.metrics` and `influx.plot` "
            "compute and draw the same numbers for your own runs.",
            "",
            "Reproduce with `nox -s validity` (or `python benchmarks/validity/run.py`"
            f"{' --quick' if quick else ''} with influx, torch, JAX, matplotlib and "
            "scikit-learn installed); results also go to "
            "`benchmarks/results/validity/*.json`. `nox -s validity -- --quick` is "
            "a smoke run.",
            "",
            f"Generated {datetime.date.today().isoformat()} on {env['machine']}, "
            "BLAS/OpenMP threads "
            f"{os.environ.get('OMP_NUM_THREADS', 'default')}; {versions}. "
            f"Backends: {', '.join(backends)}. Times come from a shared machine "
            "and are indicative only." + (f" Study times: {timing}." if timing else ""),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the influx validity suite.")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--backends", default="torch,jax", help="comma-separated (default torch,jax)"
    )
    parser.add_argument(
        "--studies",
        default=",".join(STUDIES),
        help=f"comma-separated subset of {','.join(STUDIES)}",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="render the studies not run from their saved JSON",
    )
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    chosen = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STUDIES))
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {STUDIES}")
    if args.quick:
        output = RESULTS / "quick"
        page, figures = output / "validity.md", output / "figures"
    else:
        page, figures = ROOT / "docs" / "validity.md", ROOT / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections, seconds = [], {}
    for name in STUDIES:
        module = _module(name)
        if module is None:
            continue
        saved = RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
        if name in chosen:
            print(f"validity: running {name}", flush=True)
            start = time.perf_counter()
            results = module.run(backends, args.quick)
            seconds[name] = time.perf_counter() - start
            results["study_seconds"] = seconds[name]
            save_json(saved.stem, results)
            results = json.loads(saved.read_text())  # the section reads what was saved
        elif args.reuse and saved.exists():
            print(f"validity: {name} from {saved}", flush=True)
            results = json.loads(saved.read_text())
            if "study_seconds" in results:
                seconds[name] = results["study_seconds"]
        else:
            continue
        sections.append(module.section(results, figures))
    page.write_text(_header(backends, args.quick, seconds) + "\n" + "\n".join(sections))
    print(f"validity: wrote {page} and {figures}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
