"""Timing and peak-memory measurement shared by every benchmark runner.

Standard library and numpy only: the peers' environments import it too.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Measurement", "measure", "write_result"]

#: Runs slower than this (seconds) are not repeated: their first run is the sample.
SLOW_RUN_S = 30.0


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (Linux), or ``None`` elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class Measurement(dict):
    """Wall times (s) and peak resident memory (MiB) of a benchmarked call.

    Keys: ``cold_s`` (first call, compilation included), ``times_s`` (the
    warm repeats, or the cold run alone when it was slow), ``median_s``,
    ``peak_mib`` (the largest rise of resident memory over the memory held
    before the first call, across all calls) and ``rss_before_mib``;
    ``cold_cpu_s`` and ``median_cpu_s``: the same in CPU seconds of this
    process (all its threads), which a busy machine inflates less than wall
    time.
    """


def measure(
    call: Callable[[], Any], repeats: int = 3, slow_s: float = SLOW_RUN_S
) -> tuple[Measurement, Any]:
    """Time ``call`` once cold, then ``repeats`` more times warm.

    Parameters
    ----------
    call
        The work to time; its result from the first run is returned.
    repeats
        Warm runs after the first. A first run slower than ``slow_s``
        (default ``SLOW_RUN_S``) is not repeated and serves as the only sample.
    slow_s
        See ``repeats``.

    Returns
    -------
    measurement, result
    """
    before = _status_kib("VmRSS") or 0
    tracked = _reset_peak_rss()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = call()
    cold = time.perf_counter() - start
    cold_cpu = time.process_time() - start_cpu
    times, cpu_times = [], []
    if cold < slow_s:
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
    peak = _status_kib("VmHWM") if tracked else None
    samples = times or [cold]
    out = Measurement(
        cold_s=cold,
        times_s=samples,
        median_s=statistics.median(samples),
        cold_cpu_s=cold_cpu,
        median_cpu_s=statistics.median(cpu_times or [cold_cpu]),
        peak_mib=None if peak is None else max(peak - before, 0) / 1024,
        rss_before_mib=before / 1024,
    )
    return out, result


def write_result(
    directory: str | os.PathLike,
    meta: dict[str, Any],
    measurement: Measurement | None,
    result: np.ndarray | None,
) -> None:
    """Write ``result.json`` (meta + measurement) and ``influences.npy``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = dict(meta)
    if measurement is not None:
        record.update(measurement)
    if result is not None:
        np.save(directory / "influences.npy", np.asarray(result))
    (directory / "result.json").write_text(json.dumps(record, indent=2, default=str))
