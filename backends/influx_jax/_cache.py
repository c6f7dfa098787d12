"""JAX's persistent compilation cache, opt-in.

JAX can keep compiled programs on disk so that a new process reuses them
instead of compiling again: the first call of a fresh process then costs
little more than on torch. influx never turns it on by itself. Turn it on
with :func:`influx.enable_compilation_cache` or by setting the environment
variable ``INFLUX_JAX_CACHE_DIR`` to a folder before the JAX backend is
first used (unset it to opt out). It sets JAX's own options
``jax_compilation_cache_dir``, ``jax_persistent_cache_min_compile_time_secs``
and ``jax_persistent_cache_min_entry_size_bytes``; a cache already configured
through JAX is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["ENV_VAR", "enable_compilation_cache", "enable_from_environment"]

#: Environment variable naming the cache folder; unset (the default) is off.
ENV_VAR = "INFLUX_JAX_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/influx/jax`` (``~/.cache/influx/jax`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "influx" / "jax"


def enable_compilation_cache(
    path: str | os.PathLike[str] | None = None,
    *,
    min_compile_time_s: float = 0.0,
    min_entry_size_bytes: int = 0,
) -> Path:
    """Keep JAX's compiled programs in ``path`` for later processes.

    Parameters
    ----------
    path
        The cache folder, created if missing; ``None`` means
        :func:`default_cache_dir`.
    min_compile_time_s
        Only programs that took at least this long to compile are stored
        (JAX's default is 1 s, which skips most of influx's small programs).
    min_entry_size_bytes
        Only programs at least this large are stored.

    Returns
    -------
    Path
        The cache folder in use.
    """
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s)
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes)
    )
    return folder


def enable_from_environment() -> Path | None:
    """Enable the cache in ``$INFLUX_JAX_CACHE_DIR`` if that is set (and JAX's not)."""
    folder = os.environ.get(ENV_VAR)
    if not folder or jax.config.jax_compilation_cache_dir is not None:
        return None
    return enable_compilation_cache(folder)
