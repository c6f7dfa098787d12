"""Where partition tasks run: in this process, or on a dask.distributed cluster.

An executor runs ``fn(item, *shared)`` for every item (a
:class:`~influx.sources.Partition`, usually) and either yields the results
(:meth:`map`, in completion order, with each item's position) or adds them up
(:meth:`sum`, a tree reduction on the workers). ``shared`` values (the model,
the fitted state, the test factors) are made once with :meth:`broadcast`:
in-process they are the values themselves; on dask each is sent to every
worker once and the tasks receive the worker's copy.

``dask`` and ``distributed`` are imported only when a client is given
(``pip install "influx[dask]"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from influx._progress import progress_iter

__all__ = ["DaskExecutor", "Executor", "LocalExecutor", "executor_for", "tree_add"]


class Executor:
    """Runs partition tasks; see :class:`LocalExecutor` and :class:`DaskExecutor`."""

    #: How many workers run tasks at once.
    workers: int = 1

    def broadcast(self, value: Any) -> Any:
        """A handle of ``value`` that tasks receive as ``value`` itself."""
        raise NotImplementedError

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        progress: bool = False,
        desc: str | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(position, fn(items[position], *shared))`` as tasks finish."""
        raise NotImplementedError

    def sum(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        progress: bool = False,
        desc: str | None = None,
    ) -> Any:
        """``sum_i fn(items[i], *shared)`` (:func:`tree_add` of the results)."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Runs every task here, one after the other, in order."""

    workers = 1

    def broadcast(self, value: Any) -> Any:
        return value

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        progress: bool = False,
        desc: str | None = None,
    ) -> Iterator[tuple[int, Any]]:
        for position, item in progress_iter(
            enumerate(items), progress, desc, total=len(items)
        ):
            yield position, fn(item, *shared)

    def sum(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        progress: bool = False,
        desc: str | None = None,
    ) -> Any:
        total = None
        for _, value in self.map(fn, items, *shared, progress=progress, desc=desc):
            total = value if total is None else tree_add(total, value)
        return total


class DaskExecutor(Executor):
    """Runs tasks on the workers of a ``dask.distributed.Client``.

    Tasks are submitted with ``pure=False`` (each runs, none is deduplicated
    by dask). A task lost with its worker is rerun by the scheduler on another
    worker, so every task's effects (a block written to a store) must be
    idempotent. Sums are reduced pairwise on the workers, so the client
    receives one result.

    Parameters
    ----------
    client
        A connected ``distributed.Client``.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))

    def broadcast(self, value: Any) -> Any:
        return self.client.scatter(value, broadcast=True, hash=False)

    def _submit(self, fn: Callable[..., Any], items: Sequence[Any], shared: Any) -> Any:
        return [self.client.submit(fn, item, *shared, pure=False) for item in items]

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        progress: bool = False,
        desc: str | None = None,
    ) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        futures = self._submit(fn, items, shared)
        where = {future.key: position for position, future in enumerate(futures)}
        try:
            done = as_completed(futures, with_results=True)
            for future, value in progress_iter(done, progress, desc, total=len(items)):
                if future.status != "finished":  # cancelled (an error raises)
                    raise RuntimeError(
                        f"a task was {future.status} before it finished "
                        f"({future.key}): the cluster dropped it. Run again."
                    )
                yield where[future.key], value
        except BaseException:
            # an error, or the caller stopped early: drop the tasks still queued
            _cancel_pending(futures)
            raise

    def sum(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        *shared: Any,
        progress: bool = False,
        desc: str | None = None,
    ) -> Any:
        from distributed import wait

        futures = self._submit(fn, items, shared)
        submitted = list(futures)
        try:
            if progress:
                # a bar over the leaves; the reduction after them is short
                from distributed import as_completed

                for _ in progress_iter(
                    as_completed(futures), progress, desc, total=len(items)
                ):
                    pass
            level = futures
            while len(level) > 1:
                pairs = [
                    self.client.submit(tree_add, level[i], level[i + 1], pure=False)
                    for i in range(0, len(level) - 1, 2)
                ]
                if len(level) % 2:
                    pairs.append(level[-1])
                submitted.extend(pairs)
                level = pairs
            wait(level)
            return level[0].result()
        except BaseException:
            _cancel_pending(submitted)
            raise


def _cancel_pending(futures: Sequence[Any]) -> None:
    """Cancel the tasks not finished yet (an erred or finished one is left alone).

    Cancelling the keys of erred tasks whose dependants erred too trips an
    assertion in the scheduler (distributed 2026.8) that leaves the client's
    later tasks cancelled; those tasks are released with their futures.
    """
    pending = [future for future in futures if future.status == "pending"]
    if pending:
        pending[0].client.cancel(pending)


def executor_for(client: Any) -> Executor:
    """The executor of ``client``: ``None`` runs here, else a dask client.

    Raises
    ------
    TypeError
        If ``client`` is neither ``None`` nor a ``distributed.Client``.
    """
    if client is None:
        return LocalExecutor()
    if isinstance(client, Executor):
        return client
    module = type(client).__module__.split(".")[0]
    if module == "distributed" and type(client).__name__ == "Client":
        return DaskExecutor(client)
    raise TypeError(
        f"client must be a dask.distributed.Client (or None to run here), got "
        f"{type(client).__name__}. Create one with `from dask.distributed import "
        'Client; client = Client(...)` (pip install "influx[dask]").'
    )


def tree_add(first: Any, second: Any) -> Any:
    """Add two results of the same structure (arrays, numbers, lists, dicts)."""
    if isinstance(first, dict):
        return {key: tree_add(first[key], second[key]) for key in first}
    if isinstance(first, list | tuple):
        added = [tree_add(a, b) for a, b in zip(first, second, strict=True)]
        if hasattr(first, "_fields"):  # a named tuple
            return type(first)(*added)
        return type(first)(added) if isinstance(first, tuple) else added
    if first is None:
        return None
    return first + second
