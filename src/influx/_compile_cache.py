"""``influx.enable_compilation_cache``: the JAX backend's persistent cache."""

from __future__ import annotations

import os
from pathlib import Path

from influx.backends import get_backend

__all__ = ["enable_compilation_cache"]


def enable_compilation_cache(
    path: str | os.PathLike[str] | None = None,
    *,
    min_compile_time_s: float = 0.0,
    min_entry_size_bytes: int = 0,
) -> Path:
    """Keep JAX's compiled programs on disk, so a new process skips compiling.

    A cold first call on JAX spends most of its time compiling; with the
    cache on, later processes load the compiled programs instead. Off unless
    you call this (or set ``INFLUX_JAX_CACHE_DIR`` before the JAX backend is
    first used). Imports jax. Call it before the first computation.

    Parameters
    ----------
    path
        The cache folder, created if missing; ``None`` means
        ``$XDG_CACHE_HOME/influx/jax`` (``~/.cache/influx/jax``).
    min_compile_time_s
        Store only programs that took at least this long to compile.
    min_entry_size_bytes
        Store only programs at least this large.

    Returns
    -------
    Path
        The cache folder in use.
    """
    backend = get_backend("jax")
    return backend.enable_compilation_cache(  # type: ignore[attr-defined]
        path,
        min_compile_time_s=min_compile_time_s,
        min_entry_size_bytes=min_entry_size_bytes,
    )
