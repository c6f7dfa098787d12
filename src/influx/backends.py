"""Finding and choosing a backend.

Backends are plugins in the entry-point group ``influx.backends``. The built-in
ones (``torch`` and ``jax``) take a fast path that needs no metadata scan; any
other name is looked up in the installed distributions' entry points, once,
lazily, and cached.

Every public call resolves its backend through :func:`resolve_backend`, in this
order:

1. an explicit ``backend=`` argument (a name or a backend object);
2. the innermost ``with influx.use_backend(...)`` block (thread- and
   task-local, through a :class:`contextvars.ContextVar`);
3. the ``INFLUX_BACKEND`` environment variable, read at call time;
4. detection from the model or array type, which looks only at frameworks
   already imported, so it never imports one itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from influx.protocols import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "available_backends",
    "check_model_backend",
    "detect_backend",
    "get_backend",
    "resolve_backend",
    "resolve_backend_name",
    "use_backend",
]

ENTRY_POINT_GROUP = "influx.backends"
ENV_VAR = "INFLUX_BACKEND"

# name -> (adapter module, backend class, framework module, pip extra)
_BUILTINS: dict[str, tuple[str, str, str, str]] = {
    "torch": ("influx_torch", "TorchBackend", "torch", "influx[torch]"),
    "jax": ("influx_jax", "JaxBackend", "jax", "influx[jax]"),
}

_selected: contextvars.ContextVar[str | Backend | None] = contextvars.ContextVar(
    "influx_backend", default=None
)
_loaded: dict[str, Backend] = {}


class BackendNotInstalledError(ImportError):
    """A known backend whose framework is not installed."""


@functools.cache
def _plugin_entry_points() -> dict[str, EntryPoint]:
    """Entry points of the ``influx.backends`` group, read once."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _clear_caches() -> None:
    """Forget loaded backends and the entry-point scan (for tests and reloads)."""
    _plugin_entry_points.cache_clear()
    _loaded.clear()


def available_backends() -> list[str]:
    """Names of all registered backends, installed framework or not.

    Returns
    -------
    list of str
        Sorted names: the built-ins and every entry point of the group
        ``influx.backends``.
    """
    return sorted(set(_BUILTINS) | set(_plugin_entry_points()))


def _instantiate(name: str, factory: Any) -> Backend:
    is_instance = isinstance(factory, Backend) and not isinstance(factory, type)
    backend = factory if is_instance else factory()
    if not isinstance(backend, Backend):
        raise TypeError(
            f"The entry point for backend {name!r} produced {backend!r}, which does "
            "not implement influx.protocols.Backend."
        )
    return backend


def _load_builtin(name: str) -> Backend:
    module_name, class_name, framework, extra = _BUILTINS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if missing.split(".")[0] == module_name:
            raise  # the adapter itself is missing: a broken installation
        raise BackendNotInstalledError(
            f"The {name!r} backend needs {framework}, which could not be imported "
            f'({error}). Install it with: pip install "{extra}"'
        ) from error
    return _instantiate(name, getattr(module, class_name))


def get_backend(name: str | Backend) -> Backend:
    """Return the backend registered as ``name``, loading it on first use.

    Parameters
    ----------
    name
        A registered name (``"torch"``, ``"jax"`` or a plugin's) or a backend
        object, which is returned as is.

    Raises
    ------
    ValueError
        If no backend is registered under ``name``; the message lists the
        available ones.
    ImportError
        If the backend is known but its framework is not installed; the message
        says which ``pip install`` fixes it.
    """
    if not isinstance(name, str):
        if isinstance(name, Backend):
            return name
        raise TypeError(
            f"backend must be a backend name or object, got {type(name).__name__}."
        )
    key = name.strip().lower()
    if key in _loaded:
        return _loaded[key]
    if key in _BUILTINS:
        backend = _load_builtin(key)
    else:
        plugins = _plugin_entry_points()
        if key not in plugins:
            raise ValueError(
                f"Unknown backend {name!r}. Available backends: "
                f"{', '.join(available_backends())}."
            )
        try:
            factory = plugins[key].load()
        except ImportError as error:
            raise BackendNotInstalledError(
                f"The backend {name!r} is registered by "
                f"{plugins[key].value!r} but could not be imported: {error}"
            ) from error
        backend = _instantiate(key, factory)
    _loaded[key] = backend
    return backend


@contextlib.contextmanager
def use_backend(name: str | Backend) -> Iterator[Backend]:
    """Select a backend for the calls made inside a ``with`` block.

    The choice is local to the current thread or asyncio task and is restored
    on exit, also when the block raises. An explicit ``backend=`` argument still
    wins over it.

    Parameters
    ----------
    name
        A backend name or object.

    Yields
    ------
    Backend
        The selected backend.

    Examples
    --------
    >>> with influx.use_backend("jax"):  # doctest: +SKIP
    ...     model = influx.twice_differentiable(apply_fn, loss, params=params)
    """
    backend = get_backend(name)
    token = _selected.set(backend)
    try:
        yield backend
    finally:
        _selected.reset(token)


def _configured() -> tuple[str | Backend | None, str]:
    """The backend chosen by context or environment, and where it came from."""
    chosen = _selected.get()
    if chosen is not None:
        return chosen, "influx.use_backend(...)"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env, f"the {ENV_VAR} environment variable"
    return None, ""


def resolve_backend_name(backend: str | Backend | None = None) -> str | Backend:
    """The backend for a call without a model: explicit, configured or default.

    The default is the first built-in backend whose framework is installed
    (torch, then jax), found without importing it.
    """
    if backend is not None:
        return backend
    chosen, _ = _configured()
    if chosen is not None:
        return chosen
    for name, (_, _, framework, _) in _BUILTINS.items():
        if importlib.util.find_spec(framework) is not None:
            return name
    raise BackendNotInstalledError(
        'No framework is installed for influx: pip install "influx[torch]" or '
        'pip install "influx[jax]".'
    )


def _owners(obj: Any) -> list[Backend]:
    """Backends whose framework is imported and that claim ``obj``."""
    owners = []
    for name, (_, _, framework, _) in _BUILTINS.items():
        # A None entry marks an import that was blocked or failed: not imported.
        if sys.modules.get(framework) is not None:
            backend = get_backend(name)
            if backend.owns(obj):
                owners.append(backend)
    if owners:
        return owners
    for name in _plugin_entry_points():
        if name in _BUILTINS:
            continue
        try:
            backend = get_backend(name)
        except ImportError:
            continue
        if sys.modules.get(backend.framework_module) is not None and backend.owns(obj):
            owners.append(backend)
    return owners


def detect_backend(*objs: Any) -> Backend | None:
    """The backend owning the first of ``objs`` that any backend claims."""
    for obj in objs:
        if obj is None:
            continue
        owners = _owners(obj)
        if owners:
            return owners[0]
    return None


def resolve_backend(*objs: Any, backend: str | Backend | None = None) -> Backend:
    """Choose the backend for a call on ``objs`` (models, arrays, pytrees).

    Parameters
    ----------
    *objs
        The objects the call works on; ``None`` entries are ignored.
    backend
        An explicit choice, which wins over everything else.

    Returns
    -------
    Backend
        The chosen backend.

    Raises
    ------
    TypeError
        If the chosen backend is not the framework of one of ``objs`` (a torch
        module under ``INFLUX_BACKEND=jax``, say), or if no backend can be
        chosen.
    """
    source = "the backend argument"
    chosen: str | Backend | None = backend
    if chosen is None:
        chosen, source = _configured()
    if chosen is None:
        detected = detect_backend(*objs)
        if detected is None:
            kinds = ", ".join(type(o).__name__ for o in objs if o is not None)
            raise TypeError(
                f"Cannot tell which framework {kinds or 'the input'} belongs to. "
                f"Pass backend=... (one of {', '.join(available_backends())}), use "
                f"'with influx.use_backend(name):' or set {ENV_VAR}."
            )
        return detected
    selected = get_backend(chosen)
    for obj in objs:
        if obj is None or selected.owns(obj):
            continue
        owners = _owners(obj)
        if owners:
            raise TypeError(
                f"{type(obj).__module__}.{type(obj).__name__} is a "
                f"{owners[0].name} object, but {source} selects the "
                f"{selected.name} backend. A {owners[0].name} model runs only on "
                f"the {owners[0].name} backend: select backend={owners[0].name!r} "
                f"or build the model in {selected.name}."
            )
    return selected


def check_model_backend(model: Any) -> None:
    """Raise if a configured backend is not the wrapped ``model``'s own.

    A model wrapped for one framework cannot run on another: under
    ``INFLUX_BACKEND=jax`` a torch-wrapped model is an error, not a silent
    conversion.
    """
    chosen, source = _configured()
    if chosen is None:
        return
    selected = get_backend(chosen)
    own = model.backend
    if selected.name != own.name:
        raise TypeError(
            f"The model is wrapped for the {own.name} backend, but {source} selects "
            f"the {selected.name} backend. A {own.name} model runs only on "
            f"{own.name}: unset the selection or wrap a {selected.name} model."
        )
