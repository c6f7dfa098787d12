"""Refuse dense ``[P, P]`` steps that cannot fit in memory, before they start."""

from __future__ import annotations

import os

from influx.errors import InputError

__all__ = ["available_memory", "check_dense_fits"]

GIB = 1024**3


def available_memory() -> int | None:
    """Bytes of host memory available now, or ``None`` if unknown.

    Reads ``MemAvailable`` from ``/proc/meminfo`` (Linux), else asks
    ``os.sysconf`` for the available physical pages.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_dense_fits(size: int, itemsize: int, count: int, what: str) -> None:
    """Raise if ``count`` matrices ``[size, size]`` would not fit in memory.

    Parameters
    ----------
    size
        ``P``, the number of parameters.
    itemsize
        Bytes per entry of the matrices.
    count
        How many ``[P, P]`` matrices are alive at once.
    what
        The step, for the message (``"the direct solve"``).

    Raises
    ------
    InputError
        When ``size**2 * itemsize * count`` exceeds the available host memory.
    """
    needed = int(size) * int(size) * int(itemsize) * int(count)
    available = available_memory()
    if available is None or needed <= available:
        return
    raise InputError(
        f"{what} needs {count} dense [P, P] matrices with P={size} parameters, "
        f"about {needed / GIB:.1f} GiB, but only {available / GIB:.1f} GiB of memory "
        "is available. Use inversion_method='cg', 'lissa' or 'arnoldi' with "
        f"rank_estimate << P={size}: they never form the [P, P] Hessian."
    )
