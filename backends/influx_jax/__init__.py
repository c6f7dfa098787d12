"""The JAX backend of influx.

Registered under the entry-point group ``influx.backends`` as ``jax``.
Importing this package imports jax. Float64 needs ``jax_enable_x64``.
"""

from influx_jax._backend import JaxBackend
from influx_jax._model import JaxTwiceDifferentiable

__all__ = ["JaxBackend", "JaxTwiceDifferentiable"]
