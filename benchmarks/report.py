"""Turn a benchmark results folder into a markdown page.

``python benchmarks/report.py RESULTS_DIR [--out docs/benchmarks.md]`` reads
every ``RESULTS_DIR/<workload>/<tool>/<method>/result.json`` (and its
``influences.npy``), compares each result with the workload's float64
reference (``RESULTS_DIR/<workload>/reference/<method>/``) and writes one
page: the machine, a table and a time-ratio table per workload, the targets
(met or missed, evaluated from the numbers), and the W3 memory sweep when
``RESULTS_DIR/W3/<tool>/n<N>/result.json`` exist. ``bench.py`` calls it at
the end of a run. Numpy only (plus the standard library).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import SLOW_RUN_S
from _workloads import SPECS

#: The tool folder holding a workload's references.
REFERENCE = "reference"
#: What ``bench.py`` records about a run (command, date, machine, notes).
RUN_INFO = "run.json"

TORCH = "influx-torch"
JAX = "influx-jax"
PYDVL_07 = "pydvl-0.7.0"
PYDVL_010 = "pydvl-0.10.0"
TOOL_ORDER = (TORCH, JAX, PYDVL_010, PYDVL_07)
METHOD_ORDER = ("direct", "cg", "lissa", "arnoldi", "direct-pert")
LABELS = {PYDVL_07: "pyDVL 0.7.0", PYDVL_010: "pyDVL 0.10.0"}

#: Which reference each method is compared with, first one found.
REFERENCE_METHODS: dict[str, tuple[str, ...]] = {"direct-pert": ("direct-pert",)}
UP_REFERENCES = ("direct", "cg")

#: The time-ratio columns: (numerator tool, denominator tool).
RATIOS = ((PYDVL_010, TORCH), (PYDVL_07, TORCH), (JAX, TORCH))

#: Messages that get no flag (still footnoted): the peers' library noise.
QUIET = r"^(Pending)?DeprecationWarning|^FutureWarning"

#: Short flags for messages (warnings, errors), first match wins.
FLAGS: tuple[tuple[str, str], ...] = (
    (
        r"not converged|did not converge|no ?convergence|eigenpairs to tol",
        "not converged",
    ),
    (r"\bdiverged\b", "diverged"),
    (r"positive definite", "not positive definite"),
)


# --------------------------------------------------------------------------- #
# Machine


def _first_line(path: str, prefix: str, sep: str = ":") -> str | None:
    """The value of the first ``prefix ...<sep> value`` line of ``path``, if any."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(prefix):
                    return line.split(sep, 1)[-1].strip()
    except OSError:
        return None
    return None


def _os_name() -> str:
    pretty = _first_line("/etc/os-release", "PRETTY_NAME=", "=")
    name = pretty.strip('"') if pretty else platform.system()
    return f"{name}, kernel {platform.release()}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """The machine and the influx environment's versions, as display strings."""
    mem_kib = _first_line("/proc/meminfo", "MemTotal")
    memory = f"{int(mem_kib.split()[0]) / 2**20:.1f} GiB" if mem_kib else "unknown"
    return {
        "CPU": _first_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": str(os.cpu_count()),
        "memory": memory,
        "OS": _os_name(),
        "Python": platform.python_version(),
        "influx": _version("influx"),
        "torch": _version("torch"),
        "jax": _version("jax"),
        "numpy": _version("numpy"),
    }


# --------------------------------------------------------------------------- #
# Results


@dataclass
class Entry:
    """One result: its record, its influences and its accuracy."""

    workload: str
    tool: str
    method: str
    record: dict[str, Any]
    path: Path
    max_rel_err: float | None = None
    correlation: float | None = None
    accuracy_note: str | None = None

    @property
    def median(self) -> float | None:
        """The warm median, or ``None`` for a failed run."""
        if self.record.get("error"):
            return None
        return self.record.get("median_s")

    @property
    def valid(self) -> bool:
        """Timed and finite."""
        return self.median is not None and not self.record.get("nan")

    def influences(self) -> np.ndarray | None:
        return _load_influences(self.path / "influences.npy")


@functools.lru_cache(maxsize=4)
def _load_influences(file: Path) -> np.ndarray | None:
    """A result's influences in float64 (references are read many times)."""
    return np.load(file).astype(np.float64) if file.exists() else None


@dataclass
class Results:
    """Every entry of a results folder, by ``(workload, tool, method)``."""

    entries: dict[tuple[str, str, str], Entry] = field(default_factory=dict)
    w3: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    def get(self, workload: str, tool: str, method: str) -> Entry | None:
        return self.entries.get((workload, tool, method))

    def workloads(self) -> list[str]:
        return sorted({w for w, _, _ in self.entries})

    def tools(self, workload: str) -> list[str]:
        found = {t for w, t, _ in self.entries if w == workload and t != REFERENCE}
        return _ordered(found, TOOL_ORDER)

    def methods(self, workload: str) -> list[str]:
        found = {m for w, t, m in self.entries if w == workload and t != REFERENCE}
        return _ordered(found, METHOD_ORDER)


def _ordered(items: Iterable[str], order: Sequence[str]) -> list[str]:
    """``items`` in ``order``, unknown ones after, sorted."""
    items = set(items)
    return [i for i in order if i in items] + sorted(items - set(order))


def load_results(directory: Path) -> Results:
    """Read a results folder (see the module docstring)."""
    results = Results()
    run_file = directory / RUN_INFO
    if run_file.exists():
        results.run = json.loads(run_file.read_text())
    for file in sorted(directory.glob("*/*/*/result.json")):
        method_dir = file.parent
        workload, tool, method = method_dir.relative_to(directory).parts
        record = json.loads(file.read_text())
        if workload == "W3":
            n = record.get("n_train") or int(method.removeprefix("n").split("-")[0])
            mode = record.get("mode")
            key = f"{tool} ({mode})" if mode else tool
            results.w3.setdefault(key, {})[int(n)] = record
            continue
        entry = Entry(workload, tool, method, record, method_dir)
        results.entries[workload, tool, method] = entry
    for entry in results.entries.values():
        if entry.tool != REFERENCE:
            score(entry, reference_for(results, entry.workload, entry.method))
    return results


def reference_for(results: Results, workload: str, method: str) -> Entry | None:
    """The reference ``method``'s result is compared with, if there is one."""
    for name in REFERENCE_METHODS.get(method, UP_REFERENCES):
        entry = results.get(workload, REFERENCE, name)
        if entry is not None:
            return entry
    return None


def accuracy(values: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Max relative error and Pearson correlation of a result.

    Parameters
    ----------
    values, reference
        Influences of the same shape; compared flattened, in float64.

    Returns
    -------
    max_rel_err, correlation
        ``max|values - reference| / max|reference|``, and the correlation
        (NaN when either array is constant).
    """
    values = values.astype(np.float64).ravel()
    reference = reference.astype(np.float64).ravel()
    max_rel_err = float(np.max(np.abs(values - reference)) / np.max(np.abs(reference)))
    if np.std(values) == 0 or np.std(reference) == 0:
        return max_rel_err, float("nan")
    return max_rel_err, float(np.corrcoef(values, reference)[0, 1])


def score(entry: Entry, reference: Entry | None) -> None:
    """Fill ``entry``'s accuracy against ``reference`` (or say why not)."""
    if reference is None:
        entry.accuracy_note = "no reference"
        return
    values, ref = entry.influences(), reference.influences()
    if values is None or ref is None:
        entry.accuracy_note = None if values is None else "no reference"
        return
    if values.shape != ref.shape:
        entry.accuracy_note = f"shape {values.shape} != reference {ref.shape}"
        return
    with np.errstate(all="ignore"):
        entry.max_rel_err, entry.correlation = accuracy(values, ref)


# --------------------------------------------------------------------------- #
# Formatting


def fmt(value: float | None) -> str:
    """``value`` with 3 significant digits; ``—`` for a missing number."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude < 1e-3 or magnitude >= 1e6:
        return f"{value:.2e}"
    if magnitude >= 100:
        return f"{round(value, 2 - math.floor(math.log10(magnitude))):.0f}"
    return f"{value:#.3g}".rstrip(".")


def fmt_corr(value: float | None) -> str:
    """A correlation: 3 significant digits, of ``1 - r`` when ``r`` is near 1.

    Past six nines it reads ``> 0.999999``.
    """
    if value is None or not math.isfinite(value) or value < 0.99:
        return fmt(value)
    deficit = 1.0 - value
    if deficit <= 0:
        return "1"
    if deficit < 5e-7:
        return "> 0.999999"
    digits = min(2 - math.floor(math.log10(deficit)), 6)
    return f"{value:.{digits}f}"


def label(tool: str) -> str:
    """A tool's display name."""
    return LABELS.get(tool, tool)


def flags_of(record: dict[str, Any]) -> list[str]:
    """Short flags for a record: errors, time-outs, NaN, warnings, caps."""
    error = record.get("error")
    if record.get("timed_out"):
        return ["timed out"]
    if error:
        return ["skipped" if str(error).startswith("skipped") else "error"]
    flags = ["NaN"] if record.get("nan") else []
    flags += [_flag(m) for m in messages_of(record) if not re.match(QUIET, m)]
    if "--max-seconds" in str(record.get("notes") or ""):
        flags.append("capped")
    return list(dict.fromkeys(flags))


def _flag(message: str) -> str:
    for pattern, flag in FLAGS:
        if re.search(pattern, message, re.IGNORECASE):
            return flag
    return "warning"


def messages_of(record: dict[str, Any]) -> list[str]:
    """The warnings a runner recorded (influx's and pyDVL's keys)."""
    return [*record.get("warnings", []), *record.get("pydvl_messages", [])]


def status_of(record: dict[str, Any]) -> str:
    """One word or two for a record: ``ok`` or its flags."""
    return ", ".join(flags_of(record)) or "ok"


def details_of(record: dict[str, Any]) -> list[str]:
    """The full texts behind a record's flags, for the footnotes."""
    texts = [record["error"]] if record.get("error") else []
    texts += messages_of(record)
    if record.get("notes"):
        texts.append(str(record["notes"]))
    return [" ".join(str(t).split())[:300] for t in texts]


class Footnotes:
    """Numbered footnotes of one table, each text once."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def refs(self, texts: Sequence[str]) -> str:
        numbers = []
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
            numbers.append(self.texts.index(text) + 1)
        # separated: "[2][3]" would read as a markdown reference link
        return ", ".join(f"[{n}]" for n in numbers)

    def lines(self) -> list[str]:
        return [f"[{i}] {text}  " for i, text in enumerate(self.texts, 1)]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A markdown table; ``align`` has one ``l``/``r`` per column."""
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = [header, marks, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# --------------------------------------------------------------------------- #
# Sections


def header_section(results: Results) -> str:
    """Title, machine, command and how to read the tables."""
    run = results.run
    machine = run.get("machine") or machine_info()
    date = run.get("date") or datetime.date.today().isoformat()
    command = run.get("command") or "nox -s bench"
    rows = [
        ["CPU", f"{machine['CPU']} ({machine['cores']} cores)"],
        ["memory", machine["memory"]],
        ["OS", machine["OS"]],
        ["Python", machine["Python"]],
        ["influx", machine["influx"]],
        [
            "torch / jax / numpy",
            f"{machine['torch']} / {machine['jax']} / {machine['numpy']}",
        ],
        ["peers", peer_versions(results) or "none"],
        ["date", date],
    ]
    repeats = run.get("repeats", 3)
    parts = [
        "# Benchmarks",
        f"Produced by `nox -s bench` (this run: `{command}`).",
        table(["", ""], rows, "ll"),
        "**How to read.** Each job runs alone in a fresh process. *median s* is "
        f"the median of the warm repeats ({repeats} per job in this run; "
        f"without any, or after a first call slower than {SLOW_RUN_S:g} s, the "
        "first call is the only sample); *cold s* is "
        "the first call, compilation and setup included; *peak MiB* is the "
        "largest rise of resident memory over the memory held before the first "
        "call. *max rel err* is `max|r - ref| / max|ref|` and *correlation* the "
        "Pearson correlation of the flattened influences, both in float64, "
        "against influx-torch's float64 reference: Direct on W1, CG at "
        "`rtol=1e-10` on W2. Time ratios above 1 mean influx-torch is faster.",
        "What bounds each result, with profiles: [performance.md](performance.md).",
    ]
    notes = run.get("notes") or []
    if notes:
        parts.append("Notes: " + "; ".join(notes) + ".")
    return "\n\n".join(parts)


def peer_versions(results: Results) -> str:
    """``pyDVL 0.7.0 (torch 2.13.0), ...`` from the peers' results."""
    seen: dict[str, str] = {}
    for (_, tool, _), entry in sorted(results.entries.items()):
        if tool.startswith("pydvl") and "version" in entry.record:
            torch = entry.record.get("torch_version", "?")
            seen.setdefault(tool, f"pyDVL {entry.record['version']} (torch {torch})")
    return ", ".join(seen[t] for t in _ordered(seen, TOOL_ORDER))


def workload_section(results: Results, workload: str) -> str:
    """The workload's results table, its footnotes and its time ratios."""
    spec = SPECS.get(workload)
    title = f"## {workload}" + (f": {spec.description}" if spec else "")
    notes = Footnotes()
    rows = []
    for method in results.methods(workload):
        for i, tool in enumerate(results.tools(workload)):
            entry = results.get(workload, tool, method)
            rows.append([method if i == 0 else "", label(tool), *cells(entry, notes)])
    header = [
        "method",
        "tool",
        "median s",
        "cold s",
        "peak MiB",
        "max rel err",
        "correlation",
        "notes",
    ]
    parts = [title, reference_line(results, workload), table(header, rows, "llrrrrrl")]
    if notes.texts:
        parts.append("\n".join(notes.lines()))
    parts.append(ratio_section(results, workload))
    return "\n\n".join(p for p in parts if p)


def cells(entry: Entry | None, notes: Footnotes) -> list[str]:
    """The numbers and the notes cell of one table row."""
    if entry is None:
        return ["—"] * 5 + ["not run"]
    record = entry.record
    flags = flags_of(record)
    if entry.accuracy_note:
        flags.append(entry.accuracy_note)
    note = ", ".join(flags)
    details = details_of(record)
    if details:
        note = f"{note} {notes.refs(details)}".strip()
    return [
        fmt(entry.median),
        fmt(None if record.get("error") else record.get("cold_s")),
        fmt(record.get("peak_mib")),
        fmt(entry.max_rel_err),
        fmt_corr(entry.correlation),
        note,
    ]


def reference_line(results: Results, workload: str) -> str:
    """Which references the workload's accuracy is measured against."""
    refs = _ordered(
        {m for w, t, m in results.entries if w == workload and t == REFERENCE},
        METHOD_ORDER,
    )
    if not refs:
        return "No reference: accuracy not measured."
    parts = []
    for method in refs:
        record = results.get(workload, REFERENCE, method).record
        options = record.get("options") or {}
        extra = f", options {json.dumps(options, sort_keys=True)}" if options else ""
        status = status_of(record)
        took = fmt(record.get("cold_s"))
        parts.append(f"`{method}`{extra} ({took} s, {status})")
    return "Reference: influx-torch, float64: " + "; ".join(parts) + "."


def ratio(
    results: Results, workload: str, method: str, pair: tuple[str, str]
) -> tuple[float | None, str]:
    """``median(num) / median(den)`` and its display text.

    A numerator that timed out gives a lower bound (``>``) from its timeout.
    """
    num = results.get(workload, pair[0], method)
    den = results.get(workload, pair[1], method)
    if num is None or den is None or den.median is None:
        return None, "—"
    if num.median is not None:
        value = num.median / den.median
        flagged = not (num.valid and den.valid)
        return value, fmt(value) + (" †" if flagged else "")
    if num.record.get("timed_out") and num.record.get("timeout_s"):
        bound = num.record["timeout_s"] / den.median
        return bound, f"> {fmt(bound)}"
    return None, "—"


def ratio_section(results: Results, workload: str) -> str:
    """Per method, the time ratios of :data:`RATIOS` (tools that ran)."""
    tools = set(results.tools(workload))
    pairs = [p for p in RATIOS if p[0] in tools and p[1] in tools]
    if not pairs:
        return ""
    rows = [
        [method, *(ratio(results, workload, method, p)[1] for p in pairs)]
        for method in results.methods(workload)
    ]
    header = ["method", *(f"{label(a)} / {label(b)}" for a, b in pairs)]
    legend = (
        "Time ratios (median over median; > X: the numerator timed out; "
        "†: one side returned NaN)."
    )
    return legend + "\n\n" + table(header, rows, "l" + "r" * len(pairs))


# --------------------------------------------------------------------------- #
# Targets


@dataclass
class Target:
    """One target line: its claim, ``met``/``missed``/``not evaluated``, numbers."""

    claim: str
    status: str
    detail: str

    def line(self) -> str:
        return f"- {self.claim}: **{self.status}** ({self.detail})"


#: A check of a target: ``True``/``False``, or ``None`` for "no verdict here"
#: (shown, but not deciding); and the numbers behind it.
Check = tuple[bool | None, str]


def _verdict(claim: str, checks: list[Check], missing: str) -> Target:
    """A target's line from its checks.

    ``met`` when every decided check holds, ``missed`` when one fails, ``not
    evaluated`` (with ``missing`` when there is no check at all) otherwise.
    """
    if not checks:
        return Target(claim, "not evaluated", missing)
    decided = [ok for ok, _ in checks if ok is not None]
    if not decided:
        status = "not evaluated"
    else:
        status = "met" if all(decided) else "missed"
    return Target(claim, status, "; ".join(text for _, text in checks))


def _pair(
    results: Results, workload: str, method: str
) -> tuple[Entry | None, Entry | None]:
    """influx-torch's and pyDVL 0.10's entries for one workload and method."""
    return (
        results.get(workload, TORCH, method),
        results.get(workload, PYDVL_010, method),
    )


def _against_peer(ours: Entry, theirs: Entry) -> Check | None:
    """The check when either side failed, or ``None`` when both are valid.

    influx failing misses the target; pyDVL failing (without a time-out bound)
    gives no verdict.
    """
    if not ours.valid:
        return False, f"{ours.workload}: influx-torch {status_of(ours.record)}"
    if not theirs.valid and not theirs.record.get("timed_out"):
        return None, f"{ours.workload}: pyDVL 0.10 {status_of(theirs.record)}"
    return None if theirs.valid else (None, "")


def speedup_target(
    results: Results, method: str, factor: float, max_err: float | None = None
) -> Target:
    """influx-torch at least ``factor`` x faster than pyDVL 0.10 on ``method``."""
    claim = f"{method}: influx-torch >= {factor:g}x faster than pyDVL 0.10"
    if max_err is not None:
        claim += f", with max rel err <= {max_err:g}"
    checks: list[Check] = []
    for workload in results.workloads():
        ours, theirs = _pair(results, workload, method)
        if ours is None or theirs is None:
            continue
        failed = _against_peer(ours, theirs)
        if failed is not None and failed[1]:
            checks.append(failed)
            continue
        value, text = ratio(results, workload, method, (PYDVL_010, TORCH))
        ok = value is not None and value >= factor
        detail = f"{workload}: {text}x"
        if max_err is not None:
            err = ours.max_rel_err
            ok = ok and err is not None and err <= max_err
            detail += f", err {fmt(err)}"
        checks.append((ok, detail))
    return _verdict(claim, checks, f"needs influx-torch and pyDVL 0.10 on {method}")


def lissa_target(results: Results, max_err: float = 1e-2) -> Target:
    """LiSSA (influx, default options) within ``max_err`` of the reference."""
    checks: list[Check] = []
    for workload in results.workloads():
        for tool in (TORCH, JAX):
            entry = results.get(workload, tool, "lissa")
            if entry is None:
                continue
            if not entry.valid:
                checks.append((False, f"{workload} {tool}: {status_of(entry.record)}"))
                continue
            err = entry.max_rel_err
            ok = err is not None and err <= max_err
            checks.append((ok, f"{workload} {tool}: {fmt(err)}"))
    return _verdict(
        f"lissa (defaults): max rel err <= {max_err:g}", checks, "no influx LiSSA run"
    )


def arnoldi_target(results: Results) -> Target:
    """influx-torch's Arnoldi: more accurate and no slower than pyDVL 0.10's."""
    checks: list[Check] = []
    for workload in results.workloads():
        ours, theirs = _pair(results, workload, "arnoldi")
        if ours is None or theirs is None:
            continue
        failed = _against_peer(ours, theirs)
        if failed is not None:
            text = failed[1] or f"{workload}: pyDVL 0.10 timed out"
            checks.append((failed[0] if failed[1] else True, text))
            continue
        if theirs.correlation is None:
            note = theirs.accuracy_note or "no influences"
            checks.append((None, f"{workload}: pyDVL 0.10 accuracy unknown ({note})"))
            continue
        corr_ok = _greater(ours.correlation, theirs.correlation)
        time_ok = ours.median <= theirs.median
        checks.append(
            (
                corr_ok and time_ok,
                f"{workload}: correlation {fmt_corr(ours.correlation)} vs "
                f"{fmt_corr(theirs.correlation)}, {fmt(ours.median)} s vs "
                f"{fmt(theirs.median)} s",
            )
        )
    return _verdict(
        "arnoldi: influx-torch's correlation above pyDVL 0.10's and its time "
        "at most pyDVL 0.10's",
        checks,
        "needs influx-torch and pyDVL 0.10 on arnoldi",
    )


def _greater(a: float | None, b: float | None) -> bool:
    """``a > b``, a missing or NaN ``b`` counting as the lowest value."""
    if a is None or not math.isfinite(a):
        return False
    return b is None or not math.isfinite(b) or a > b


def jax_target(results: Results, limit: float = 1.5) -> Target:
    """influx-jax within ``limit`` x of influx-torch's time on every method."""
    checks = []
    for workload in results.workloads():
        for method in results.methods(workload):
            value, text = ratio(results, workload, method, (JAX, TORCH))
            if value is not None:
                checks.append((value <= limit, f"{workload} {method}: {text}"))
    return _verdict(
        f"influx-jax / influx-torch <= {limit:g} on every method",
        checks,
        "needs influx-jax and influx-torch",
    )


def w3_target(results: Results, limit: float = 1.5) -> Target:
    """Each influx tool's W3 peak memory flat in N (max / min <= ``limit``)."""
    checks = []
    for tool in sorted(results.w3):
        if not tool.startswith("influx"):
            continue
        peaks = [r.get("peak_mib") for r in results.w3[tool].values()]
        peaks = [p for p in peaks if p is not None]
        if len(peaks) < 2 or min(peaks) <= 0:
            continue
        spread = max(peaks) / min(peaks)
        checks.append(
            (
                spread <= limit,
                f"{tool}: {fmt(max(peaks))} / {fmt(min(peaks))} MiB = {fmt(spread)}",
            )
        )
    return _verdict(
        f"W3 peak memory flat in N (max / min <= {limit:g})",
        checks,
        "no W3 results of influx at two sizes or more",
    )


TARGETS: tuple[Callable[[Results], Target], ...] = (
    lambda r: speedup_target(r, "direct", 2.0),
    lambda r: speedup_target(r, "cg", 10.0, max_err=1e-4),
    lambda r: speedup_target(r, "direct-pert", 3.0),
    lissa_target,
    arnoldi_target,
    jax_target,
    w3_target,
)


def targets_section(results: Results) -> str:
    """One line per target of :data:`TARGETS`."""
    lines = [target(results).line() for target in TARGETS]
    return "## Targets\n\n" + "\n".join(lines)


def w3_section(results: Results) -> str:
    """The W3 sweep: per training-set size, each tool's peak and median."""
    if not results.w3:
        return ""
    tools = sorted(results.w3)
    sizes = sorted({n for runs in results.w3.values() for n in runs})
    rows = []
    for n in sizes:
        row = [f"{n:,}"]
        for tool in tools:
            record = results.w3[tool].get(n, {})
            row += [fmt(record.get("peak_mib")), fmt(record.get("median_s"))]
        rows.append(row)
    header = ["n_train"]
    for tool in tools:
        header += [f"{label(tool)} peak MiB", f"{label(tool)} median s"]
    body = table(header, rows, "r" * len(header))
    intro = (
        "Up-influences of 100 test points, training data streamed in batches "
        "of 1,000 (`benchmarks/memory_w3.py`). *in-memory* holds the "
        "`[100, N]` result (400 N bytes, 38 MiB at 100k); *zarr* writes it "
        "block by block through `out=`."
    )
    return "## W3: memory against the training-set size\n\n" + intro + "\n\n" + body


def render(directory: Path) -> str:
    """The whole page for a results folder."""
    results = load_results(directory)
    sections = [header_section(results)]
    sections += [workload_section(results, w) for w in results.workloads()]
    sections += [w3_section(results), targets_section(results)]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_report(directory: Path, out: Path) -> None:
    """Render a results folder and write the page.

    Parameters
    ----------
    directory
        The results folder (``bench.py --results``).
    out
        The markdown file to write; its folder is created.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(Path(directory)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    write_report(args.results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
