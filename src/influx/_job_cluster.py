"""The cluster of an ``influx run`` job: a scheduler, a local cluster, or none.

:func:`connect` yields a ``distributed.Client`` (closed, and a local cluster
shut down, on exit) whose workers import the job's factory module as the
client did: a worker plugin puts the job's ``python_path`` first on their
``sys.path``. ``distributed`` is imported only here, when a job has a
``[cluster]``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from influx.job import Job

__all__ = ["MALLOC_TRIM_KEY", "connect", "without_malloc_trim"]

#: The dask setting that starts worker processes with glibc's
#: ``MALLOC_TRIM_THRESHOLD_`` (see :func:`without_malloc_trim`).
MALLOC_TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


@contextlib.contextmanager
def connect(job: Job) -> Iterator[Any]:
    """The job's dask client (``None``: this process), closed on exit.

    Raises
    ------
    JobError
        If ``distributed`` is missing, or the scheduler cannot be reached
        within the job's timeout.
    """
    from influx.job import JobError

    if job.scheduler is None and job.local_workers is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise JobError(
            f"{job.path}: [cluster] needs dask.distributed ({error}): pip install "
            '"influx[dask]".'
        ) from None
    if job.scheduler is not None:
        try:
            client = Client(job.scheduler, timeout=job.timeout)
        except (OSError, TimeoutError) as error:
            raise JobError(
                f"{job.path}: cannot reach the scheduler [cluster] scheduler = "
                f"{job.scheduler!r} within {job.timeout:g} s ({error}). Check the "
                "address and that the scheduler runs, or raise [cluster] timeout."
            ) from None
        with client:
            client.register_plugin(_path_plugin(job.python_path))
            yield client
        return
    # Local workers are spawned with this process's sys.path (an environment
    # PYTHONPATH would come too late); the plugin adds the job's folders, also
    # to workers that replace lost ones.
    env = {"JAX_ENABLE_X64": "1"} if job.backend == "jax" and _jax_x64() else {}
    with (
        without_malloc_trim(),
        LocalCluster(
            n_workers=job.local_workers,
            threads_per_worker=job.threads_per_worker,
            processes=True,
            dashboard_address=":0",  # any free port (None still tries 8787)
            worker_dashboard_address=None,
            silence_logs=40,
            env=env,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_path_plugin(job.python_path))
        yield client


@contextlib.contextmanager
def without_malloc_trim() -> Iterator[None]:
    """Start dask worker processes without ``MALLOC_TRIM_THRESHOLD_``.

    dask sets it (65536) in every worker it spawns, to hand freed memory back
    to the system. On glibc, setting it also switches off the adaptive
    ``mmap`` threshold, which then stays at 128 KiB: every temporary array
    above that (a batch's per-sample gradients, its products) is a fresh
    ``mmap`` whose pages fault in again on each batch. Scoring with
    per-sample gradients cost about 1.5 times the CPU of the same loop in an
    ordinary process (docs/scaling.md). Workers started inside this context
    keep glibc's defaults; it changes nothing else.
    """
    import dask

    with dask.config.set({MALLOC_TRIM_KEY: None}):
        yield


def _path_plugin(folders: tuple[str, ...]) -> Any:
    """A worker plugin putting ``folders`` first on each worker's ``sys.path``.

    So that the workers import the factory's module (a custom model class or
    loss pickled by reference) as the client did.
    """
    from distributed import WorkerPlugin

    class ImportPath(WorkerPlugin):  # pickled by value (cloudpickle)
        name = "influx-job-python-path"

        def __init__(self, folders: list[str]) -> None:
            self.folders = folders

        def setup(self, worker: Any) -> None:
            import sys

            for folder in reversed(self.folders):
                if folder not in sys.path:
                    sys.path.insert(0, folder)

    return ImportPath(list(folders))


def _jax_x64() -> bool:
    jax = sys.modules.get("jax")
    return bool(jax is not None and jax.config.jax_enable_x64)
