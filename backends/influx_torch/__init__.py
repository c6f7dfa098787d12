"""The PyTorch backend of influx.

Registered under the entry-point group ``influx.backends`` as ``torch``.
Importing this package imports torch.
"""

from influx_torch._backend import TorchBackend
from influx_torch._model import TorchTwiceDifferentiable

__all__ = ["TorchBackend", "TorchTwiceDifferentiable"]
