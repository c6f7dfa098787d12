"""Helpers of the fault tests (tests/test_faults.py, tests/fault_client_run.py).

- :func:`slow_data`, a ``FactorySource`` factory whose batch reads sleep and
  are logged (process, batch, time), so a run is slow enough to interrupt
  mid-way and every read of a partition can be counted afterwards;
- :func:`write_log_plugin`, a dask worker plugin that logs every write into a zarr
  array made on a worker (array name, selection, process), on the workers
  that exist and on those that join later (a worker restarted by its nanny);
- store readers (the ``done`` array's run numbers) and a poller.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Layer sizes of the fault tests' MLP.
SIZES = (3, 5, 2)
#: Points, batch and partition (chunk) sizes: 16 chunks, the last one short.
N_TRAIN, BATCH, PARTITION = 250, 8, 16
N_TEST = 5


def arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training points ``x [N, 3]`` and targets ``y [N, 2]`` (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_TRAIN, SIZES[0]))
    y = rng.standard_normal((N_TRAIN, SIZES[-1]))
    return x, y


def query_arrays(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The test points ``[N_TEST, 3]`` and targets ``[N_TEST, 2]``."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((N_TEST, SIZES[0])),
        rng.standard_normal((N_TEST, SIZES[-1])),
    )


def slow_data(
    log_dir: str | None = None, delay: float = 0.0, seed: int = 0
) -> tuple[Any, Any]:
    """``(x, y)`` as dask arrays, one block per batch, each read sleeping.

    Reading a batch computes one block of ``x``: it sleeps ``delay`` seconds
    and, with ``log_dir``, appends ``"<pid> <batch> <time>"`` to
    ``log_dir/reads-<pid>.log``.
    """
    import dask.array as da

    x, y = arrays(seed)

    def read_block(block: np.ndarray, block_info: Any = None) -> np.ndarray:
        if block_info is not None and None in block_info:
            batch = block_info[None]["chunk-location"][0]
            if delay:
                time.sleep(delay)
            if log_dir is not None:
                pid = os.getpid()
                with open(Path(log_dir) / f"reads-{pid}.log", "a") as log:
                    log.write(f"{pid} {batch} {time.time():.6f}\n")
        return block

    lazy_x = da.from_array(x, chunks=(BATCH, x.shape[1])).map_blocks(
        read_block, dtype=x.dtype
    )
    return lazy_x, da.from_array(y, chunks=(BATCH, y.shape[1]))


def warm_up(backend_name: str) -> int:
    """Import the framework and influx here (a worker); the process id."""
    if backend_name == "torch":
        import torch  # noqa: F401
    else:
        import jax  # noqa: F401
    import influx  # noqa: F401

    return os.getpid()


def read_log(log_dir: str | os.PathLike[str]) -> list[tuple[int, int, float]]:
    """Every logged batch read: ``(pid, batch, time)``."""
    entries = []
    for path in sorted(Path(log_dir).glob("reads-*.log")):
        for line in path.read_text().splitlines():
            pid, batch, stamp = line.split()
            entries.append((int(pid), int(batch), float(stamp)))
    return entries


def partition_reads(
    entries: list[tuple[int, int, float]], exclude_pid: int | None = None
) -> dict[int, int]:
    """How many whole-batch reads each partition got (batches per partition)."""
    per_partition = PARTITION // BATCH
    counts: dict[int, int] = {}
    for pid, batch, _ in entries:
        if pid == exclude_pid:
            continue
        number = batch // per_partition
        counts[number] = counts.get(number, 0) + 1
    return counts


def write_log_plugin(log_dir: str) -> Any:
    """A dask worker plugin logging each ``zarr.Array.__setitem__`` on the workers.

    Each write appends ``"<pid> <array name> <selection> <time>"`` to
    ``log_dir/writes-<pid>.log``. Registered plugins also reach workers that
    join later (a worker its nanny restarted after it was killed), so every
    write on the cluster is seen.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class WriteLog(WorkerPlugin):
        name = "influx-test-write-log"

        def setup(self, worker: Any) -> None:
            patch_zarr_writes(log_dir)

    return WriteLog()


def patch_zarr_writes(log_dir: str) -> None:
    """Log every write into a ``zarr.Array`` in this process (see above)."""
    import zarr

    original = zarr.Array.__setitem__
    if getattr(original, "_influx_logged", False):
        return

    def logged(self: Any, selection: Any, value: Any) -> Any:
        result = original(self, selection, value)
        pid = os.getpid()
        name = str(getattr(self, "basename", None) or getattr(self, "name", "?"))
        with open(Path(log_dir) / f"writes-{pid}.log", "a") as log:
            name = name.strip("/").split("/")[-1]
            log.write(f"{pid} {name} {_selection(selection)} {time.time():.6f}\n")
        return result

    logged._influx_logged = True  # type: ignore[attr-defined]
    zarr.Array.__setitem__ = logged


def _selection(selection: Any) -> str:
    """A selection as text without spaces: ``0:5,16:32`` or ``3``."""
    if not isinstance(selection, tuple):
        selection = (selection,)
    parts = []
    for item in selection:
        if isinstance(item, slice):
            parts.append(
                f"{'' if item.start is None else item.start}:"
                f"{'' if item.stop is None else item.stop}"
            )
        else:
            parts.append(str(int(item)) if np.ndim(item) == 0 else "array")
    return ",".join(parts)


def read_writes(
    log_dir: str | os.PathLike[str],
) -> list[tuple[int, str, str, float]]:
    """Every logged write: ``(pid, array name, selection, time)``."""
    entries = []
    for path in sorted(Path(log_dir).glob("writes-*.log")):
        for line in path.read_text().splitlines():
            pid, name, selection, stamp = line.split()
            entries.append((int(pid), name, selection, float(stamp)))
    return entries


def done_runs(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The store's ``done`` array (run number per chunk, 0 = missing), or ``None``.

    ``None`` while the store or its ``done`` array does not exist yet (or is
    being created).
    """
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        return np.asarray(group["done"][...])
    except Exception:
        return None


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, step: float = 0.02
) -> None:
    """Poll ``condition`` until true; ``AssertionError`` naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def chunks_done(path: str | os.PathLike[str]) -> int:
    """How many chunks of the store at ``path`` are done (0 if none yet)."""
    done = done_runs(path)
    return 0 if done is None else int(np.count_nonzero(done))


def file_states(path: str | os.PathLike[str]) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path``: its bytes and its mtime (ns), by relative path."""
    root = Path(path)
    return {
        str(file.relative_to(root)): (file.read_bytes(), file.stat().st_mtime_ns)
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }


def job_torch() -> dict[str, Any]:
    """An ``influx run`` factory: the fault tests' MLP and data on torch."""
    import torch
    from models import mlp_weights, torch_mlp

    return {
        "model": torch_mlp(mlp_weights(SIZES), "float64"),
        "loss": torch.nn.MSELoss(),
        "train": arrays(),
        "test": query_arrays(),
    }


def job_jax() -> dict[str, Any]:
    """An ``influx run`` factory: the fault tests' MLP and data on JAX."""
    from models import jax_mlp, mlp_weights, mse_loss

    apply_fn, params = jax_mlp(mlp_weights(SIZES), "float64")
    return {
        "model": apply_fn,
        "params": params,
        "loss": mse_loss("jax"),
        "train": arrays(),
        "test": query_arrays(),
    }
