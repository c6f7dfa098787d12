"""The torch backend: detection, conversion and wrapping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from influx_torch._model import TorchTwiceDifferentiable

__all__ = ["TorchBackend"]


class TorchBackend:
    """PyTorch through ``torch.func`` (registered as ``"torch"``)."""

    name = "torch"
    framework_module = "torch"

    def owns(self, obj: Any) -> bool:
        """Torch modules, tensors and wrappers belong to torch."""
        return isinstance(
            obj, torch.nn.Module | torch.Tensor | TorchTwiceDifferentiable
        )

    def is_native_array(self, obj: Any) -> bool:
        """Whether ``obj`` is a ``torch.Tensor``."""
        return isinstance(obj, torch.Tensor)

    def asarray(self, obj: Any, like: Any | None = None) -> torch.Tensor:
        """``obj`` as a tensor; on ``like``'s device, floats in ``like``'s dtype."""
        if isinstance(obj, torch.Tensor):
            tensor = obj
        else:
            array = np.asarray(obj)
            if not array.flags.writeable:  # torch warns on read-only memory
                array = array.copy()
            tensor = torch.as_tensor(array)
        if like is None:
            return tensor
        dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=like.device, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """A host numpy copy of a tensor; bfloat16 comes back as float32.

        numpy has no bfloat16, and float32 holds every bfloat16 exactly.
        """
        tensor = array.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()

    def twice_differentiable(
        self, model: Any, loss: Callable[[Any, Any], Any], *, params: Any = None
    ) -> TorchTwiceDifferentiable:
        """Wrap a ``torch.nn.Module``; ``params`` must be ``None``."""
        if params is not None:
            raise TypeError(
                "params is for JAX apply functions; a torch.nn.Module holds its own "
                "parameters. Call twice_differentiable(module, loss) without params."
            )
        return TorchTwiceDifferentiable(model, loss)

    def cholesky_solve(self, factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``A^{-1} rhs`` (``[P, K]``) from the lower Cholesky factor of ``A``."""
        return torch.cholesky_solve(rhs, factor, upper=False)

    def solve_triangular(
        self, factor: torch.Tensor, rhs: torch.Tensor, *, lower: bool = True
    ) -> torch.Tensor:
        """``factor^{-1} rhs`` (``[P, K]``) for a triangular ``factor``."""
        return torch.linalg.solve_triangular(factor, rhs, upper=not lower)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchBackend)

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"TorchBackend(torch {torch.__version__})"
