"""Resumable results: a zarr group whose chunks are marked done once written.

``Influence.influences(..., out="scores.zarr")`` and ``self_influence(...,
out="self.zarr")`` write into a store laid out as:

- array ``"scores"``: the result, ``[N_test, M, *S]`` (``[N]`` for the
  self-influence), chunked along the input axis (``M``, or ``N``) in the
  width of one task (a source's ``partition_size``; the rows are split too
  where a chunk would pass :data:`CHUNK_BYTES`);
- array ``"done"``: int32 ``[chunks]``, chunk size 1, the number of the run
  that wrote each chunk (``0``: not written yet). A chunk's entry is written
  only after its data, so a chunk marked done is complete;
- group attributes ``"influx"``: the format, the job's fingerprint (what the
  result depends on, see ``influx._distributed_scoring``), its SHA-256, and
  ``runs``, one ``{"number", "started"}`` per call that opened the store.

Opening a store with another fingerprint is refused before any work, naming
what differs; ``overwrite=True`` starts over. A path holding anything that is
not a zarr store is never deleted. :func:`open_results` reads a store back
(for inspection, resume counts and ``influx run --dry-run``).

``zarr`` is imported only here, when a store is used (``pip install
"influx[dask]"`` or ``zarr``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from influx.errors import InputError

__all__ = ["ChunkWriter", "Results", "ResultStore", "fingerprint_hash", "open_results"]

#: Largest chunk of ``"scores"`` (bytes) before its rows are split too; a task
#: still writes whole chunks (all rows of its columns).
CHUNK_BYTES = 1 << 27
#: Names of the store's format in its attributes.
STORE_FORMAT = "influx.results"
STORE_VERSION = 1


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as error:  # pragma: no cover - zarr is in the extras
        raise ImportError(
            'out="path.zarr" writes a zarr store: pip install "influx[dask]" (or zarr).'
        ) from error
    return zarr


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """SHA-256 of the fingerprint's canonical JSON."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def is_store_path(out: Any) -> bool:
    """Whether ``out`` names a store (a ``str`` or ``os.PathLike``), not an array."""
    return isinstance(out, str | os.PathLike)


@dataclass(frozen=True)
class Results:
    """What a results store holds (:func:`open_results`).

    Attributes
    ----------
    scores
        The zarr array of the result (``[N_test, M, *S]`` or ``[N]``).
    done
        int32 ``[chunks]``: the run that wrote each chunk, ``0`` if missing.
    fingerprint
        The job's fingerprint (a dict) and ``fingerprint_sha256`` its hash.
    runs
        One ``{"number", "started"}`` per call that opened the store.
    chunk_size
        Points per chunk along the input axis.
    """

    path: str
    scores: Any
    done: np.ndarray
    fingerprint: dict[str, Any]
    fingerprint_sha256: str
    runs: list[dict[str, Any]]
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return int(self.done.size)

    @property
    def chunks_done(self) -> int:
        """How many chunks are written."""
        return int(np.count_nonzero(self.done))

    @property
    def chunks_missing(self) -> list[int]:
        """The numbers of the chunks not written yet."""
        return [int(i) for i in np.flatnonzero(self.done == 0)]

    @property
    def complete(self) -> bool:
        return self.chunks_done == self.num_chunks

    def written_by(self, run: int) -> int:
        """How many chunks run ``run`` wrote (the last: ``runs[-1]["number"]``)."""
        return int(np.count_nonzero(self.done == run))


def open_results(path: str | os.PathLike[str]) -> Results:
    """Read an influx results store: the result, its done mask and fingerprint.

    Parameters
    ----------
    path
        The ``out`` path of ``influences`` or ``self_influence``.

    Returns
    -------
    Results
        ``scores`` (the zarr array), ``done`` (run numbers per chunk, 0 =
        missing), ``fingerprint``, ``runs``, ``chunks_done``,
        ``chunks_missing``.

    Raises
    ------
    InputError
        If ``path`` is not an influx results store.
    """
    target = os.fspath(path)
    group, header = _read(target)
    if group is None or header is None:
        raise InputError(f"{target!r} is not an influx results store.")
    return Results(
        path=target,
        scores=group["scores"],
        done=np.asarray(group["done"][:]),
        fingerprint=header["fingerprint"],
        fingerprint_sha256=header["fingerprint_sha256"],
        runs=list(header.get("runs", [])),
        chunk_size=int(header["chunk_size"]),
    )


def _read(target: str) -> tuple[Any, dict[str, Any] | None]:
    """``(group, influx attributes)``; ``(None, None)`` when not a zarr group."""
    zarr = _zarr()
    if not os.path.isdir(target):
        return None, None
    try:
        group = zarr.open_group(target, mode="r")
    except Exception:  # not a zarr group (a plain directory, an array)
        return None, None
    header = dict(group.attrs).get("influx")
    if (
        not isinstance(header, dict)
        or header.get("format") != STORE_FORMAT
        or "scores" not in group
        or "done" not in group
    ):
        return group, None
    return group, header


def _is_zarr(target: str) -> bool:
    names = (".zgroup", ".zarray", "zarr.json")
    return os.path.isdir(target) and any(
        os.path.exists(os.path.join(target, name)) for name in names
    )


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    found = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key, "(absent)"), wanted.get(key, "(absent)")
        if json.dumps(old, sort_keys=True, default=str) != json.dumps(
            new, sort_keys=True, default=str
        ):
            found.append(f"{key}: stored {_short(old)}, this call {_short(new)}")
    return found


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class ResultStore:
    """An opened store of one run (:meth:`open`): its arrays and run number.

    Attributes
    ----------
    path
        The store's directory.
    scores, done
        The zarr arrays.
    run
        This run's number (1 for a new store, one more than the last run).
    chunk_size
        Points per chunk along ``axis``.
    axis
        The input axis of ``scores`` (1; 0 for the self-influence).
    """

    def __init__(
        self,
        path: str,
        group: Any,
        run: int,
        chunk_size: int,
        axis: int,
    ) -> None:
        self.path, self.group, self.run = path, group, run
        self.chunk_size, self.axis = chunk_size, axis
        self.scores = group["scores"]
        self.done = group["done"]

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        fingerprint: dict[str, Any],
        shape: tuple[int, ...],
        chunk_size: int,
        dtype: Any,
        *,
        axis: int = 1,
        overwrite: bool = False,
    ) -> ResultStore:
        """Create the store at ``path``, or open the one there of the same job.

        Parameters
        ----------
        path
            The store's directory.
        fingerprint
            What the result depends on (JSON-serialisable).
        shape
            The result's shape; ``shape[axis]`` is split in chunks.
        chunk_size
            Points per chunk along ``axis``.
        dtype
            The result's numpy dtype.
        axis
            The input axis.
        overwrite
            Delete an existing store (of this job or another) and start over.

        Raises
        ------
        InputError
            If ``path`` holds a store of another job (naming what differs)
            and ``overwrite`` is false, or anything that is not a zarr store.
        """
        zarr = _zarr()
        target = os.fspath(path)
        digest = fingerprint_hash(fingerprint)
        exists = os.path.lexists(target)
        if exists:
            group, header = _read(target)
            if header is not None and not overwrite:
                if header.get("fingerprint_sha256") != digest:
                    differences = _differences(header["fingerprint"], fingerprint)
                    raise InputError(
                        f"out={target!r} holds the results of another job: "
                        + ("; ".join(differences) or "its fingerprint differs")
                        + ". Pass overwrite=True to delete it and start over, or "
                        "choose another out path."
                    )
                return cls._resume(target, group, header)
            if header is None:
                empty = os.path.isdir(target) and not os.listdir(target)
                if not empty and not (overwrite and _is_zarr(target)):
                    what = "a zarr store" if _is_zarr(target) else "not a zarr store"
                    hint = (
                        "Pass overwrite=True to replace it, or choose another out path."
                        if _is_zarr(target)
                        else "influx never deletes it: choose another out path, "
                        "or remove it yourself."
                    )
                    raise InputError(
                        f"out={target!r} exists and is not an influx results store "
                        f"({what}). {hint}"
                    )
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
        return cls._create(
            zarr, target, fingerprint, digest, shape, chunk_size, dtype, axis
        )

    @classmethod
    def _create(
        cls,
        zarr: Any,
        target: str,
        fingerprint: dict[str, Any],
        digest: str,
        shape: tuple[int, ...],
        chunk_size: int,
        dtype: Any,
        axis: int,
    ) -> ResultStore:
        shape = tuple(int(n) for n in shape)
        chunks = list(shape)
        chunks[axis] = max(1, min(int(chunk_size), shape[axis]))
        if axis == 1 and shape[0] > 1:  # rows split so that a chunk stays small
            row = chunks[1] * math.prod(shape[2:]) * np.dtype(dtype).itemsize
            chunks[0] = max(1, min(shape[0], CHUNK_BYTES // max(1, row)))
        count = -(-shape[axis] // chunks[axis])
        group = zarr.open_group(target, mode="w")
        # uncompressed: influences barely compress, and writing stays cheap
        _create_array(
            group, "scores", shape, tuple(chunks), np.dtype(dtype), np.nan, False
        )
        _create_array(group, "done", (count,), (1,), np.dtype(np.int32), 0)
        header = {
            "format": STORE_FORMAT,
            "format_version": STORE_VERSION,
            "fingerprint": fingerprint,
            "fingerprint_sha256": digest,
            "chunk_size": chunks[axis],
            "axis": axis,
            "runs": [_run(1)],
        }
        group.attrs["influx"] = header
        return cls(target, group, 1, chunks[axis], axis)

    @classmethod
    def _resume(cls, target: str, group: Any, header: dict[str, Any]) -> ResultStore:
        zarr = _zarr()
        group = zarr.open_group(target, mode="r+")
        runs = list(header.get("runs", []))
        number = 1 + max((int(r.get("number", 0)) for r in runs), default=0)
        header = {**header, "runs": [*runs, _run(number)]}
        group.attrs["influx"] = header
        return cls(target, group, number, int(header["chunk_size"]), header["axis"])

    def missing(self) -> list[int]:
        """Numbers of the chunks not written yet."""
        return [int(i) for i in np.flatnonzero(np.asarray(self.done[:]) == 0)]

    def writer(self) -> ChunkWriter:
        """A picklable writer of this run's chunks (for tasks on any process)."""
        return ChunkWriter(self.path, self.run, self.chunk_size, self.axis)


def _run(number: int) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"number": number, "started": now.isoformat(timespec="seconds")}


def _create_array(
    group: Any,
    name: str,
    shape: tuple[int, ...],
    chunks: Any,
    dtype: Any,
    fill: Any,
    compress: bool = True,
) -> Any:
    options: dict[str, Any] = {}
    if hasattr(group, "create_array"):  # zarr 3
        if not compress:
            options["compressors"] = None
        return group.create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, **options
        )
    if not compress:
        options["compressor"] = None
    return group.create_dataset(  # zarr 2
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, **options
    )


@dataclass(frozen=True)
class ChunkWriter:
    """Writes chunks of one run of a store, from any process (pickles as a path).

    A chunk is written as its block, then its ``done`` entry (the run
    number): a chunk marked done is complete. :meth:`is_done` lets a task
    rerun by dask after its worker died skip a chunk already written.
    """

    path: str
    run: int
    chunk_size: int
    axis: int

    def _arrays(self) -> tuple[Any, Any]:
        # opened per task: a few small reads, never stale after an overwrite
        group = _zarr().open_group(self.path, mode="r+")
        return group["scores"], group["done"]

    def is_done(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is written (by any run)."""
        done = self._arrays()[1]
        return bool(int(np.asarray(done[chunk : chunk + 1])[0]) != 0)

    def write(self, chunk: int, block: np.ndarray) -> None:
        """Write chunk ``chunk``'s ``block``, then mark it done by this run."""
        scores, done = self._arrays()
        start = chunk * self.chunk_size
        stop = start + int(block.shape[self.axis])
        index: tuple[Any, ...] = (slice(None),) * self.axis + (slice(start, stop),)
        scores[index] = block
        done[chunk : chunk + 1] = np.asarray([self.run], dtype=np.int32)
