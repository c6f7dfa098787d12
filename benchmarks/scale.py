"""The S1/S2 benchmark (issue 9): run the jobs, one at a time, then report.

``python benchmarks/scale.py run [--only PATTERN] [--force]`` runs every job
of :func:`jobs` whose ``result.json`` is missing (each in a fresh process,
``OMP_NUM_THREADS=1``, one after another) and writes
``benchmarks/results/scale/<workload>/<tool>/<method>/``. The peers run in
their own environments (``benchmarks/.envs/kronfluence-1.0.1`` and
``pydvl-0.10.0``, built by ``nox -s bench``); influx runs in this
interpreter (or the checkout named by ``--influx-tree``). ``python
benchmarks/scale.py report [--write docs/benchmarks.md]`` prints the Markdown
tables of ``docs/benchmarks.md``'s S1/S2 section from the results (or
replaces them between the section's markers).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "scale"
ENVS = BENCH / ".envs"
KRONFLUENCE = ENVS / "kronfluence-1.0.1" / "bin" / "python"
PYDVL = ENVS / "pydvl-0.10.0" / "bin" / "python"

INFLUX_METHODS = (
    "kfac",
    "ekfac",
    "ekfac-empirical",
    "block",
    "cg",
    "block-cg",
    "arnoldi",
)


def jobs() -> list[tuple[str, list[str], float]]:
    """``(result folder relative to RESULTS, argv, timeout s)`` in run order."""
    out: list[tuple[str, list[str], float]] = []
    for workload in ("S1", "S2"):
        for method in ("kfac", "ekfac"):
            rel = f"{workload}/kronfluence/{method}-equal"
            default = RESULTS / f"{workload}/kronfluence/{method}-default"
            out.append(
                (
                    rel,
                    [
                        str(KRONFLUENCE),
                        str(BENCH / "peer_kronfluence.py"),
                        "--workload",
                        workload,
                        "--method",
                        method,
                        "--damping",
                        "equal",
                        "--also-default",
                        str(default),
                        "--out",
                        str(RESULTS / rel),
                    ],
                    2400,
                )
            )
        for method in ("ekfac", "nystroem", "block-cg"):
            rel = f"{workload}/pydvl/{method}"
            out.append(
                (
                    rel,
                    [
                        str(PYDVL),
                        str(BENCH / "peer_pydvl.py"),
                        "--workload",
                        workload,
                        "--method",
                        method,
                        "--repeats",
                        "0",
                        "--out",
                        str(RESULTS / rel),
                    ],
                    1800,
                )
            )
    for workload, seconds in (("S1", 1200), ("S2", 1800)):
        rel = f"{workload}/reference/cg-ggn"
        out.append(
            (
                rel,
                [
                    sys.executable,
                    str(BENCH / "reference_ggn.py"),
                    "--workload",
                    workload,
                    "--rtol",
                    "1e-6",
                    "--dtype",
                    "float32",
                    "--max-seconds",
                    str(seconds),
                    "--out",
                    str(RESULTS / rel),
                ],
                seconds + 900,
            )
        )
    for workload in ("S1-10k", "S1-40k"):
        rel = f"{workload}/kronfluence/kfac-equal"
        out.append(
            (
                rel,
                [
                    str(KRONFLUENCE),
                    str(BENCH / "peer_kronfluence.py"),
                    "--workload",
                    workload,
                    "--method",
                    "kfac",
                    "--repeats",
                    "0",
                    "--out",
                    str(RESULTS / rel),
                ],
                1800,
            )
        )
    # influx: the Kronecker methods first (cheap), then the memory sweep, then
    # the flat solvers (each a multiple of the reference's cost).
    plan = [
        (w, b, m)
        for w in ("S1", "S2")
        for b in ("torch", "jax")
        for m in ("kfac", "ekfac", "ekfac-empirical")
    ]
    plan += [(w, b, "kfac") for w in ("S1-10k", "S1-40k") for b in ("torch", "jax")]
    plan += [
        (w, b, m)
        for m in ("block-cg", "block", "cg", "arnoldi")
        for b in ("torch", "jax")
        for w in ("S1", "S2")
    ]
    for workload, backend, method in plan:
        rel = f"{workload}/influx-{backend}/{method}"
        argv = [sys.executable, str(BENCH / "run_scale.py"), "--backend", backend]
        argv += ["--workload", workload, "--method", method]
        out.append((rel, [*argv, "--out", str(RESULTS / rel)], 1200))
    return out


def run_jobs(only: str, force: bool, tree: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "XLA_FLAGS": (
            "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ),
        "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(tree / "backends")]),
        "INFLUX_BENCH_TREE": str(tree),
    }
    for rel, argv, timeout in jobs():
        if not fnmatch.fnmatch(rel, only):
            continue
        target = RESULTS / rel / "result.json"
        if target.exists() and not force:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(target.parent / "log.txt", "w") as log:
            try:
                code = subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if not target.exists():
            target.write_text(json.dumps({"error": f"exit {code}", "argv": argv}))
        print(f"{rel}: {code} ({time.perf_counter() - start:.0f} s)", flush=True)


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def _load(rel: str) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    folder = RESULTS / rel
    if not (folder / "result.json").exists():
        return None, None
    meta = json.loads((folder / "result.json").read_text())
    path = folder / "influences.npy"
    return meta, (np.load(path).astype(np.float64) if path.exists() else None)


def _rank(a: np.ndarray) -> np.ndarray:
    order = a.argsort(axis=-1)
    ranks = np.empty_like(order, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(a.shape[-1], dtype=np.float64), -1)
    return ranks


def accuracy(values: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Pearson (flattened), mean Spearman per test point, mean top-10% overlap.

    The top 10% are the training points of largest influence (influx's sign:
    most helpful) for each test point.
    """
    pearson = float(np.corrcoef(values.ravel(), ref.ravel())[0, 1])
    rv, rr = _rank(values), _rank(ref)
    spearman = float(
        np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(rv, rr, strict=True)])
    )
    k = max(1, ref.shape[1] // 10)
    overlaps = [
        len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k
        for a, b in zip(values, ref, strict=True)
    ]
    return {"pearson": pearson, "spearman": spearman, "top10": float(np.mean(overlaps))}


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def rows(workload: str) -> list[dict[str, Any]]:
    """One row per measured job of ``workload`` (tool, method, times, accuracy)."""
    _, ref = _load(f"{workload}/reference/cg-ggn")
    out = []
    folder = RESULTS / workload
    if not folder.exists():
        return out
    for tool_dir in sorted(folder.iterdir()):
        if tool_dir.name == "reference":
            continue
        for method_dir in sorted(tool_dir.iterdir()):
            meta, values = _load(f"{workload}/{tool_dir.name}/{method_dir.name}")
            if meta is None:
                continue
            row = {**meta, "tool": tool_dir.name, "method": method_dir.name}
            if values is not None and ref is not None and np.all(np.isfinite(values)):
                row.update(accuracy(values, ref))
            out.append(row)
    return out


#: (influx method, kronfluence method) compared at equal settings.
PAIRS = (("kfac", "kfac-equal"), ("ekfac", "ekfac-equal"))


def _row(table: list[dict[str, Any]], tool: str, method: str) -> dict[str, Any]:
    for row in table:
        if row["tool"] == tool and row["method"] == method and "error" not in row:
            return row
    return {}


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a and b else None


def _time(row: dict[str, Any], phase: str) -> float | None:
    """CPU seconds of ``phase`` (``fit``/``query``) when recorded, else wall."""
    return row.get(f"{phase}_cpu_s") or row.get(f"{phase}_s")


def _total(row: dict[str, Any]) -> float | None:
    fit, query = _time(row, "fit"), _time(row, "query")
    return None if fit is None or query is None else fit + query


def _workload_section(workload: str) -> list[str]:
    lines = [f"### {workload}: {SPEC_TEXT[workload]}", ""]
    ref_meta, _ = _load(f"{workload}/reference/cg-ggn")
    if ref_meta and "error" not in ref_meta:
        moved = ref_meta.get("pearson_at_residual", {})
        trail = ", ".join(f"{_fmt(v, 6)} at {k}" for k, v in moved.items())
        lines.append(
            "Reference: CG in float64 on the exact Gauss-Newton matrix's products "
            f"in {ref_meta.get('method', '').rsplit('-', 1)[-1]} "
            f"(`benchmarks/reference_ggn.py`): {ref_meta.get('iterations')} "
            "iterations, largest relative residual "
            f"{_fmt(ref_meta.get('max_relative_residual'))} "
            f"({_fmt(ref_meta.get('solve_s'))} s). Pearson of the scores at "
            f"earlier iterates with the final ones: {trail or '-'}."
        )
    else:
        lines.append("Reference: missing (no accuracy columns).")
    lines += [
        "",
        "| tool | method | fit s | fit CPU s | query s | query CPU s | peak MiB "
        "| Pearson | Spearman | top-10% | load | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- |",
    ]
    table = rows(workload)
    for row in table:
        note = (row.get("error") or "").replace("|", "/")
        lines.append(
            f"| {row['tool']} | {row['method']} | {_fmt(row.get('fit_s'))} "
            f"| {_fmt(row.get('fit_cpu_s'))} | {_fmt(row.get('query_s'))} "
            f"| {_fmt(row.get('query_cpu_s'))} | {_mib(row.get('peak_mib'))} "
            f"| {_fmt(row.get('pearson'), 4)} | {_fmt(row.get('spearman'), 4)} "
            f"| {_fmt(row.get('top10'), 3)} | {_fmt(row.get('loadavg_before'), 2)} "
            f"| {note[:160]} |"
        )
    lines += [
        "",
        "Against kronfluence at equal settings (damping = lambda): time ratios "
        "kronfluence / influx in CPU seconds (>= 1: influx is faster), peak "
        "memory, Pearson difference (influx - kronfluence).",
        "",
        "| method | backend | fit ratio | query ratio | peak MiB influx / kronfluence "
        "| Pearson influx - kronfluence |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for ours, theirs in PAIRS:
        peer = _row(table, "kronfluence", theirs)
        for backend in ("torch", "jax"):
            mine = _row(table, f"influx-{backend}", ours)
            if not mine or not peer:
                lines.append(f"| {ours} | {backend} | - | - | - | - |")
                continue
            diff = (
                mine["pearson"] - peer["pearson"]
                if "pearson" in mine and "pearson" in peer
                else None
            )
            lines.append(
                f"| {ours} | {backend} "
                f"| {_fmt(_ratio(_time(peer, 'fit'), _time(mine, 'fit')))} "
                f"| {_fmt(_ratio(_time(peer, 'query'), _time(mine, 'query')))} "
                f"| {_mib(mine.get('peak_mib'))} / {_mib(peer.get('peak_mib'))} "
                f"| {_fmt(diff, 3)} |"
            )
    lines += [
        "",
        "JAX / torch in CPU seconds (same weights, single thread, warm):",
        "",
        "| method | fit | query |",
        "| --- | ---: | ---: |",
    ]
    for method in INFLUX_METHODS:
        t, j = _row(table, "influx-torch", method), _row(table, "influx-jax", method)
        if t and j:
            lines.append(
                f"| {method} | {_fmt(_ratio(_time(j, 'fit'), _time(t, 'fit')))} "
                f"| {_fmt(_ratio(_time(j, 'query'), _time(t, 'query')))} |"
            )
    lines.append("")
    return lines


def _which_method(workloads: tuple[str, ...]) -> list[str]:
    lines = [
        "### Which method when",
        "",
        "Accuracy against time on each workload (torch, single thread; fit + "
        "query of 10 test points in CPU seconds), fastest first.",
        "",
        "| workload | tool | method | fit + query CPU s | Pearson | top-10% |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for workload in workloads:
        table = [
            r
            for r in rows(workload)
            if "error" not in r
            and _total(r) is not None
            and r["tool"] != "influx-jax"
            and not r["method"].endswith("-default")
        ]
        table.sort(key=lambda r: _total(r))
        for r in table:
            lines.append(
                f"| {workload} | {r['tool']} | {r['method']} | {_fmt(_total(r))} "
                f"| {_fmt(r.get('pearson'), 4)} | {_fmt(r.get('top10'), 3)} |"
            )
    lines.append("")
    return lines


def _memory_section() -> list[str]:
    lines = [
        "### Peak memory against N_train (S1 weights, K-FAC)",
        "",
        "| tool | 10,000 points MiB | 40,000 points MiB | fit CPU s (10k / 40k) |",
        "| --- | ---: | ---: | ---: |",
    ]
    tools = ("influx-torch", "influx-jax", "kronfluence")
    for tool in tools:
        method = "kfac-equal" if tool == "kronfluence" else "kfac"
        small, _ = _load(f"S1-10k/{tool}/{method}")
        large, _ = _load(f"S1-40k/{tool}/{method}")
        if not small or not large:
            continue
        lines.append(
            f"| {tool} | {_mib(small.get('peak_mib'))} | {_mib(large.get('peak_mib'))} "
            f"| {_fmt(_time(small, 'fit'))} / {_fmt(_time(large, 'fit'))} |"
        )
    lines.append("")
    return lines


SPEC_TEXT = {
    "S1": "digits shifted, CNN (133,738 parameters), 5,000 train / 10 test",
    "S2": "digits shifted, MLP 64-1024-1024-10 tanh (1,126,410 parameters), "
    "2,000 train / 10 test",
}


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")


def _targets() -> list[str]:
    """Issue 9's targets, each with its measured numbers (CPU seconds)."""
    lines = ["### Targets (issue 9)", ""]
    for workload in ("S1", "S2"):
        table = rows(workload)
        for ours, theirs in PAIRS:
            peer = _row(table, "kronfluence", theirs)
            for backend in ("torch", "jax"):
                mine = _row(table, f"influx-{backend}", ours)
                if not mine or not peer:
                    lines.append(
                        f"- {workload} {ours} influx-{backend} vs kronfluence: "
                        "not measured"
                    )
                    continue
                fit = _ratio(_time(peer, "fit"), _time(mine, "fit"))
                query = _ratio(_time(peer, "query"), _time(mine, "query"))
                pm, pk = mine.get("pearson"), peer.get("pearson")
                ok_t = fit is not None and query is not None and min(fit, query) >= 1
                ok_a = None if pm is None or pk is None else pm >= pk - 0.01
                lines.append(
                    f"- {workload} {ours} influx-{backend} vs kronfluence (equal "
                    f"damping): time {_verdict(ok_t)} (fit ratio {_fmt(fit)}, query "
                    f"ratio {_fmt(query)}); accuracy {_verdict(ok_a)} (Pearson "
                    f"{_fmt(pm, 4)} vs {_fmt(pk, 4)}; top-10% "
                    f"{_fmt(mine.get('top10'))} vs {_fmt(peer.get('top10'))})"
                )
        for method in ("kfac", "ekfac"):
            t = _row(table, "influx-torch", method)
            j = _row(table, "influx-jax", method)
            if t and j:
                fit = _ratio(_time(j, "fit"), _time(t, "fit"))
                query = _ratio(_time(j, "query"), _time(t, "query"))
                ok = fit is not None and query is not None and max(fit, query) <= 1.5
                lines.append(
                    f"- {workload} {method} JAX / torch <= 1.5: {_verdict(ok)} "
                    f"(fit {_fmt(fit)}, query {_fmt(query)})"
                )
        peer = _row(table, "pydvl", "block-cg")
        for backend in ("torch", "jax"):
            mine = _row(table, f"influx-{backend}", "block-cg")
            if not mine or not peer:
                continue
            ok = (_total(mine) or 1e30) <= (_total(peer) or 0) and (
                mine.get("pearson") or 0
            ) >= 0.999
            lines.append(
                f"- {workload} flat CG (influx-{backend} block CG, its defaults) at "
                f"least as fast as pyDVL's block CG at Pearson 0.999: {_verdict(ok)} "
                f"({_fmt(_total(mine))} vs {_fmt(_total(peer))} CPU s; Pearson "
                f"{_fmt(mine.get('pearson'), 4)} vs {_fmt(peer.get('pearson'), 4)})"
            )
    for tool in ("influx-torch", "influx-jax"):
        small, _ = _load(f"S1-10k/{tool}/kfac")
        large, _ = _load(f"S1-40k/{tool}/kfac")
        kron, _ = _load("S1-40k/kronfluence/kfac-equal")
        if not small or not large or not small.get("peak_mib"):
            lines.append(f"- peak memory of {tool} independent of N: not measured")
            continue
        growth = large["peak_mib"] / small["peak_mib"]
        below = None if not kron else large["peak_mib"] <= kron.get("peak_mib", 0)
        lines.append(
            f"- peak memory of {tool} K-FAC independent of N (40k / 10k <= 1.5): "
            f"{_verdict(growth <= 1.5)} ({_fmt(growth)}); at most kronfluence's: "
            f"{_verdict(below)} ({_mib(large['peak_mib'])} vs "
            f"{_mib(kron.get('peak_mib') if kron else None)} MiB at 40k)"
        )
    lines.append("")
    return lines


def report() -> str:
    """The Markdown section of ``docs/benchmarks.md`` from the results."""
    lines: list[str] = []
    for workload in ("S1", "S2"):
        lines += _workload_section(workload)
    lines += _memory_section()
    lines += _which_method(("S1", "S2"))
    lines += _targets()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--only", default="*", help="glob on WORKLOAD/TOOL/METHOD")
    run_parser.add_argument("--force", action="store_true")
    run_parser.add_argument(
        "--influx-tree",
        type=Path,
        default=BENCH.parent,
        help="the influx checkout whose src/ and backends/ the influx jobs import "
        "(default this one)",
    )
    report_parser = sub.add_parser("report")
    report_parser.add_argument(
        "--write",
        type=Path,
        default=None,
        help="replace the text between the scale markers of this file "
        "(docs/benchmarks.md) instead of printing",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        run_jobs(args.only, args.force, args.influx_tree.resolve())
    elif args.write is None:
        print(report())
    else:
        text = args.write.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        args.write.write_text(f"{head}{BEGIN}\n{report()}\n{END}{tail}")


#: The markers around the generated part of docs/benchmarks.md.
BEGIN = "<!-- scale.py report: begin -->"
END = "<!-- scale.py report: end -->"


if __name__ == "__main__":
    main()
