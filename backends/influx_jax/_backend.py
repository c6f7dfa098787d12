"""The JAX backend: detection, conversion and wrapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from influx_jax import _cache
from influx_jax._libraries import is_library_module
from influx_jax._model import JaxTwiceDifferentiable

__all__ = ["JaxBackend"]


class JaxBackend:
    """JAX through ``jax.jit``, ``jax.vmap`` and ``jax.jvp`` (registered ``"jax"``)."""

    name = "jax"
    framework_module = "jax"

    def owns(self, obj: Any) -> bool:
        """JAX arrays, wrappers, equinox and nnx modules, and JAX-array pytrees.

        Pytrees are dicts, mappings (flax's ``FrozenDict``), lists and tuples
        whose leaves are all JAX arrays.
        """
        if isinstance(obj, jax.Array | JaxTwiceDifferentiable):
            return True
        if is_library_module(obj):  # imports no library that is not imported
            return True
        if isinstance(obj, Mapping | list | tuple):
            leaves = jax.tree_util.tree_leaves(obj)
            return bool(leaves) and all(isinstance(leaf, jax.Array) for leaf in leaves)
        return False

    def is_native_array(self, obj: Any) -> bool:
        """Whether ``obj`` is a ``jax.Array``."""
        return isinstance(obj, jax.Array)

    def asarray(self, obj: Any, like: Any | None = None) -> jax.Array:
        """``obj`` as a JAX array; on ``like``'s device, floats in ``like``'s dtype."""
        array = obj if isinstance(obj, jax.Array) else jnp.asarray(np.asarray(obj))
        if like is None:
            return array
        if jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != like.dtype:
            array = array.astype(like.dtype)
        devices = getattr(like, "devices", None)
        if devices is not None and array.devices() != like.devices():
            array = jax.device_put(array, next(iter(like.devices())))
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        """A host numpy copy of a JAX array; bfloat16 comes back as float32.

        numpy has no bfloat16 of its own (as on torch), and float32 holds every
        bfloat16 exactly.
        """
        host = np.asarray(jax.device_get(array))
        if host.dtype.name == "bfloat16":
            return host.astype(np.float32)
        return host

    def twice_differentiable(
        self, model: Any, loss: Callable[[Any, Any], Any], *, params: Any = None
    ) -> JaxTwiceDifferentiable:
        """Wrap ``apply_fn(params, x)`` with its ``params`` pytree.

        ``model`` may also be an equinox or flax nnx module with
        ``params=None``, and ``params`` flax variables (only their ``"params"``
        collection is differentiated); see :mod:`influx_jax._libraries`.
        """
        return JaxTwiceDifferentiable(model, params, loss)

    def enable_compilation_cache(self, *args: Any, **kwargs: Any) -> Any:
        """JAX's persistent compilation cache (see ``influx_jax._cache``)."""
        return _cache.enable_compilation_cache(*args, **kwargs)

    def cholesky_solve(self, factor: jax.Array, rhs: jax.Array) -> jax.Array:
        """``A^{-1} rhs`` (``[P, K]``) from the lower Cholesky factor of ``A``."""
        return jax.scipy.linalg.cho_solve((factor, True), rhs)

    def solve_triangular(
        self, factor: jax.Array, rhs: jax.Array, *, lower: bool = True
    ) -> jax.Array:
        """``factor^{-1} rhs`` (``[P, K]``) for a triangular ``factor``."""
        return jax.scipy.linalg.solve_triangular(factor, rhs, lower=lower)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JaxBackend)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"JaxBackend(jax {jax.__version__})"
