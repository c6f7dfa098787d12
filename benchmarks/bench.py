"""Run the whole benchmark: every tool, workload and method, then the report.

Run with the influx environment's Python from the repository root (``nox -s
bench`` does it, with the peers' environments)::

    python benchmarks/bench.py [--workloads W1,W2,W3]
        [--tools influx-torch,influx-jax,pydvl-0.7.0,pydvl-0.10.0]
        [--repeats 3] [--results benchmarks/results/latest]
        [--peer-python pydvl-0.7.0=PATH ...] [--timeout 1800]
        [--peer-max-seconds 600] [--report docs/benchmarks.md]
        [--methods cg,lissa] [--reuse-references]

Every job (one tool, workload and method) runs in a fresh process, one at a
time (never two at once: they would disturb each other's timings), under a
wall-clock limit, and writes ``RESULTS/<workload>/<tool>/<method>/``
(``result.json``, ``influences.npy`` and the runner's ``log.txt``). A job
that fails or times out still leaves a ``result.json`` with an ``error``.

The references (influx on torch in float64) go to
``RESULTS/<workload>/reference/<method>/``: Direct (up-weighting and
perturbation) on W1, CG to ``rtol=1e-10`` on W2 (Direct is out of reach).
A peer whose interpreter is missing is skipped with a note. W3 is
``benchmarks/memory_w3.py``'s memory sweep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import report

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

INFLUX_TOOLS = ("influx-torch", "influx-jax")
PEER_TOOLS = ("pydvl-0.7.0", "pydvl-0.10.0")
TOOLS = INFLUX_TOOLS + PEER_TOOLS

#: The methods each workload is benchmarked with (all tools alike).
METHODS: dict[str, tuple[str, ...]] = {
    "W1": ("direct", "cg", "lissa", "arnoldi", "direct-pert"),
    "W2": ("cg", "lissa", "arnoldi"),
}

#: The references per workload: method name -> extra ``run_influx.py`` arguments.
#: Always influx on torch, float64, no warm repeats.
REFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "W1": {"direct": (), "direct-pert": ()},
    "W2": {"cg": ("--options", json.dumps({"rtol": 1e-10, "atol": 0}))},
}

#: The W3 (memory) script.
MEMORY_W3 = BENCH_DIR / "memory_w3.py"


@dataclass
class Job:
    """One runner invocation: what it measures, its command and where it writes."""

    workload: str
    tool: str
    method: str
    out: Path
    argv: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.workload} {self.tool} {self.method}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", default="W1,W2,W3", type=_csv, help="comma-separated"
    )
    parser.add_argument(
        "--tools", default=",".join(TOOLS), type=_csv, help="comma-separated"
    )
    parser.add_argument(
        "--methods", default="", type=_csv, help="only these methods (default all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="warm repeats per job (default 3)"
    )
    parser.add_argument(
        "--results", type=Path, default=BENCH_DIR / "results" / "latest"
    )
    parser.add_argument(
        "--peer-python",
        action="append",
        default=[],
        metavar="TOOL=PATH",
        help="the interpreter of a peer's environment "
        "(default benchmarks/.envs/TOOL/bin/python)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    parser.add_argument(
        "--peer-max-seconds",
        type=float,
        default=600.0,
        help="passed to the peers' runner as --max-seconds (0: none)",
    )
    parser.add_argument(
        "--reuse-references",
        action="store_true",
        help="keep references already in the results folder",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="where the markdown report goes",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {list(TOOLS)}")
    unknown = sorted(set(args.workloads) - {*METHODS, "W3"})
    if unknown:
        parser.error(f"unknown workloads {unknown}")
    return args


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def peer_pythons(overrides: Sequence[str]) -> dict[str, Path]:
    """Each peer's interpreter: the default path, or ``TOOL=PATH`` overrides."""
    pythons = {
        tool: BENCH_DIR / ".envs" / tool / "bin" / "python" for tool in PEER_TOOLS
    }
    for item in overrides:
        tool, sep, path = item.partition("=")
        if not sep or tool not in PEER_TOOLS:
            raise SystemExit(f"--peer-python wants TOOL=PATH with TOOL in {PEER_TOOLS}")
        pythons[tool] = Path(path)
    return pythons


def ensure_workloads(names: Sequence[str]) -> None:
    """Write the workload files with ``make_workloads.py`` if any is missing."""
    sys.path.insert(0, str(BENCH_DIR))
    from _workloads import cache_dir

    missing = [n for n in names if not (cache_dir() / f"{n}.npz").exists()]
    if missing:
        print(f"workloads {missing} missing: running make_workloads.py", flush=True)
        subprocess.run(
            [sys.executable, str(BENCH_DIR / "make_workloads.py")], check=True
        )


def needed_references(workload: str, methods: Sequence[str]) -> list[str]:
    """The reference methods of ``workload`` that ``methods`` are compared with."""
    wanted = set()
    for method in methods:
        for name in report.REFERENCE_METHODS.get(method, report.UP_REFERENCES):
            if name in REFERENCES.get(workload, {}):
                wanted.add(name)
                break
    return [name for name in REFERENCES.get(workload, {}) if name in wanted]


def reference_done(out: Path) -> bool:
    """Whether ``out`` holds a successful result (for ``--reuse-references``)."""
    file = out / "result.json"
    if not (file.exists() and (out / "influences.npy").exists()):
        return False
    record = json.loads(file.read_text())
    return not record.get("error") and not record.get("nan")


def reference_jobs(
    workload: str, methods: Sequence[str], args: argparse.Namespace
) -> list[Job]:
    """The float64 influx-torch reference runs ``methods`` on ``workload`` need.

    With ``--reuse-references``, a reference already in the results folder is
    kept (and announced) instead of being computed again.
    """
    jobs = []
    for method in needed_references(workload, methods):
        out = args.results / workload / report.REFERENCE / method
        if args.reuse_references and reference_done(out):
            print(f"{workload} reference {method}: reusing {out}", flush=True)
            continue
        argv = [
            sys.executable,
            str(BENCH_DIR / "run_influx.py"),
            "--backend=torch",
            f"--workload={workload}",
            f"--method={method}",
            f"--out={out}",
            "--dtype=float64",
            "--repeats=0",
            *REFERENCES[workload][method],
        ]
        jobs.append(Job(workload, report.REFERENCE, method, out, argv, args.timeout))
    return jobs


def tool_job(
    workload: str,
    tool: str,
    method: str,
    args: argparse.Namespace,
    pythons: dict[str, Path],
) -> Job:
    """The job that benchmarks ``tool`` on ``workload`` with ``method``.

    Parameters
    ----------
    workload, tool, method
        What to run: ``tool`` is one of :data:`TOOLS`.
    args
        The command line (``results``, ``repeats``, ``timeout``,
        ``peer_max_seconds``).
    pythons
        Each peer's interpreter.

    Returns
    -------
    Job
        influx's runner under this interpreter, or a peer's runner under the
        peer's interpreter, writing to ``RESULTS/<workload>/<tool>/<method>``.
    """
    out = args.results / workload / tool / method
    common = [
        f"--workload={workload}",
        f"--method={method}",
        f"--out={out}",
        f"--repeats={args.repeats}",
    ]
    if tool in INFLUX_TOOLS:
        backend = tool.removeprefix("influx-")
        argv = [
            sys.executable,
            str(BENCH_DIR / "run_influx.py"),
            f"--backend={backend}",
            *common,
        ]
    else:
        argv = [str(pythons[tool]), str(BENCH_DIR / "peer_pydvl.py"), *common]
        if args.peer_max_seconds:
            argv.append(f"--max-seconds={args.peer_max_seconds:g}")
    return Job(workload, tool, method, out, argv, args.timeout)


def available_tools(
    tools: Sequence[str], pythons: dict[str, Path], notes: list[str]
) -> list[str]:
    """``tools`` minus the peers whose interpreter is missing (noted)."""
    kept = []
    for tool in tools:
        if tool in PEER_TOOLS and not pythons[tool].exists():
            notes.append(f"{tool} skipped: no interpreter at {pythons[tool]}")
            continue
        kept.append(tool)
    return kept


def plan_jobs(
    args: argparse.Namespace, tools: Sequence[str], pythons: dict[str, Path]
) -> list[Job]:
    """Every job, in order: per workload the references, then method by method."""
    jobs: list[Job] = []
    for workload in args.workloads:
        if workload not in METHODS:
            continue
        methods = [m for m in METHODS[workload] if m in (args.methods or [m])]
        jobs += reference_jobs(workload, methods, args)
        for method in methods:
            jobs += [tool_job(workload, t, method, args, pythons) for t in tools]
    return jobs


def run_job(job: Job) -> str:
    """Run ``job`` in a fresh process and return its status.

    Parameters
    ----------
    job
        The job; its output (stdout and stderr) goes to ``job.out/log.txt``.

    Returns
    -------
    str
        ``ok``, or the result's flags (``timed out``, ``error``, ``NaN``,
        ``not converged``...), as :func:`report.status_of` gives them.

    Notes
    -----
    The job's directory is emptied first, so a stale result never survives a
    failed run. A job past its timeout is killed (its whole process group) and
    recorded with an ``error`` and ``timed_out``; so is a runner that exits
    without writing ``result.json``.
    """
    shutil.rmtree(job.out, ignore_errors=True)
    job.out.mkdir(parents=True)
    start = time.perf_counter()
    with open(job.out / "log.txt", "w") as log:
        process = subprocess.Popen(
            job.argv,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **job.env},
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=job.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            _record_failure(job, f"timed out after {job.timeout:g} s", timed_out=True)
            return "timed out"
    elapsed = time.perf_counter() - start
    if not (job.out / "result.json").exists():
        _record_failure(job, f"runner exited with {code} after {elapsed:.1f} s")
    return report.status_of(json.loads((job.out / "result.json").read_text()))


def _record_failure(job: Job, error: str, timed_out: bool = False) -> None:
    """A ``result.json`` for a job that left none, with the log's last line."""
    tail = (job.out / "log.txt").read_text(errors="replace").strip().splitlines()
    record = {
        "tool": job.tool,
        "workload": job.workload,
        "method": job.method,
        "error": error + (f": {tail[-1]}" if tail and not timed_out else ""),
        "timed_out": timed_out,
        "timeout_s": job.timeout,
        "command": job.argv,
    }
    (job.out / "result.json").write_text(json.dumps(record, indent=2))


def run_jobs(jobs: Sequence[Job]) -> None:
    """Run ``jobs`` one after the other, printing a progress line for each."""
    started = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {job.label} ...", end=" ", flush=True)
        job_start = time.perf_counter()
        status = run_job(job)
        print(
            f"{status} ({time.perf_counter() - job_start:.1f} s; "
            f"{time.perf_counter() - started:.0f} s so far)",
            flush=True,
        )


def run_w3(
    results: Path,
    tools: Sequence[str],
    pythons: dict[str, Path],
    timeout: float,
    notes: list[str],
) -> None:
    """The W3 memory sweep: hand over to ``benchmarks/memory_w3.py``.

    The script writes ``RESULTS/W3/<tool>/n<N>/result.json`` (keys
    ``n_train``, ``peak_mib``, ``median_s``), which the report reads. It gets
    ``--out RESULTS/W3``, ``--tools`` and one ``--peer-python TOOL=PATH`` per
    available peer.
    """
    out = results / "W3"
    argv = [
        sys.executable,
        str(MEMORY_W3),
        f"--out={out}",
        f"--tools={','.join(tools)}",
    ]
    argv += [f"--peer-python={t}={pythons[t]}" for t in tools if t in PEER_TOOLS]
    print(f"W3 memory sweep: {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(argv, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        notes.append(f"W3 timed out after {timeout:g} s")
        return
    if code:
        notes.append(f"W3: memory_w3.py exited with {code}")
    print(f"W3 done ({time.perf_counter() - start:.0f} s)", flush=True)


def command_line(argv: Sequence[str] | None) -> str:
    """How this run was started: ``nox -s bench`` under nox, else bench.py's."""
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("NOX_CURRENT_SESSION") == "bench":
        return " ".join(["nox -s bench", *(["--", *args] if args else [])])
    return " ".join(["python benchmarks/bench.py", *args])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run every job, then write the report."""
    args = parse_args(argv)
    args.results = args.results.resolve()
    pythons = peer_pythons(args.peer_python)
    notes: list[str] = []
    tools = available_tools(args.tools, pythons, notes)
    for note in notes:
        print(note, flush=True)
    ensure_workloads([w for w in args.workloads if w in METHODS])
    args.results.mkdir(parents=True, exist_ok=True)
    run_info = {
        "command": command_line(argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": report.machine_info(),
        "workloads": args.workloads,
        "tools": tools,
        "repeats": args.repeats,
        "timeout_s": args.timeout,
        "peer_max_seconds": args.peer_max_seconds,
        "notes": notes,
    }
    info_file = args.results / report.RUN_INFO
    info_file.write_text(json.dumps(run_info, indent=2))
    run_jobs(plan_jobs(args, tools, pythons))
    if "W3" in args.workloads:
        run_w3(args.results, tools, pythons, args.timeout * 4, notes)
    info_file.write_text(json.dumps(run_info, indent=2))
    report.write_report(args.results, args.report)
    print(f"report: {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
