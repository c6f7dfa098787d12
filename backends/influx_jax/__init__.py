"""The JAX backend of influx.

Registered under the entry-point group ``influx.backends`` as ``jax``.
Importing this package imports jax. Float64 needs ``jax_enable_x64``. If
``INFLUX_JAX_CACHE_DIR`` is set, importing it turns on JAX's persistent
compilation cache in that folder (see ``influx_jax._cache``).
"""

from influx_jax._backend import JaxBackend
from influx_jax._cache import enable_from_environment
from influx_jax._model import JaxTwiceDifferentiable

enable_from_environment()  # opt-in: only when INFLUX_JAX_CACHE_DIR is set

__all__ = ["JaxBackend", "JaxTwiceDifferentiable"]
