"""A third-party influx backend in plain numpy, for the plugin tests.

It is installed into a temporary folder as its own distribution (a module plus
a ``.dist-info`` with an ``influx.backends`` entry point), so influx finds it
exactly as it would find a backend published on PyPI: nothing in ``src/``
knows about it.

The backend handles one model family, a multi-output linear model
``f(x) = W x + b`` (``W [O, D]``, ``b [O]``) under the mean-squared error
``loss(pred, y) = mean((pred - y) ** 2)`` over batch and outputs. The
per-sample loss is ``l = (1/O) ||W x + b - y||^2`` and the flat parameter
vector is ``theta = [vec(W) row-major, b]``. All derivatives are analytic:
with ``r = W x + b - y`` and the Jacobian ``J = d pred / d theta``,

- ``grad_theta l = (2/O) J^T r``, i.e. ``(2/O) [r x^T, r]``;
- ``hessian l = (2/O) J^T J``, where ``J v = V_W x + v_b``;
- ``grad_x <v, grad_theta l> = (2/O) (V_W^T r + W^T (V_W x + v_b))``.

It imports neither torch nor JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "LinearModel",
    "LinearMSE",
    "NumpyBackend",
    "mean_squared_error",
]


def mean_squared_error(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Mean of ``(predictions - targets) ** 2`` over batch and outputs."""
    return np.mean((predictions - targets) ** 2)


class LinearModel:
    """``f(x) = x @ weight.T + bias`` for a batch ``x [B, D]``."""

    def __init__(self, weight: Any, bias: Any) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError("weight must be [O, D] and bias [O].")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


class LinearMSE:
    """A :class:`LinearModel` under mean-squared error, as a TwiceDifferentiable."""

    def __init__(self, model: LinearModel) -> None:
        self._model = model
        self._weight = model.weight.copy()
        self._bias = model.bias.copy()
        self._out, self._in = self._weight.shape
        self._theta = np.concatenate([self._weight.ravel(), self._bias])

    # -- the TwiceDifferentiable protocol ------------------------------------

    @property
    def backend(self) -> NumpyBackend:
        return NumpyBackend()

    @property
    def num_params(self) -> int:
        return int(self._theta.size)

    @property
    def dtype(self) -> np.dtype:
        return self._theta.dtype

    @property
    def parameters(self) -> np.ndarray:
        return self._theta

    def per_sample_grads(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        x, r = self._check(x, y)
        scale = 2.0 / self._out
        grad_w = scale * np.einsum("bo,bd->bod", r, x).reshape(len(x), -1)
        grads = np.concatenate([grad_w, scale * r], axis=1)
        losses = np.mean(r**2, axis=1)
        return grads, losses

    def hvp(self, x: Any, y: Any, vectors: Any) -> np.ndarray:
        x, _ = self._check(x, y)
        v_w, v_b = self._split(vectors)
        jv = self._jvp(x, v_w, v_b)  # [K, B, O]
        scale = 2.0 / (self._out * len(x))
        h_w = scale * np.einsum("kbo,bd->kod", jv, x).reshape(len(vectors), -1)
        h_b = scale * jv.sum(axis=1)
        return np.concatenate([h_w, h_b], axis=1)

    def mixed_grads(self, x: Any, y: Any, vectors: Any) -> np.ndarray:
        x, r = self._check(x, y)
        v_w, v_b = self._split(vectors)
        jv = self._jvp(x, v_w, v_b)  # [K, B, O]
        first = np.einsum("kod,bo->kbd", v_w, r)
        second = np.einsum("od,kbo->kbd", self._weight, jv)
        return (2.0 / self._out) * (first + second)

    # -- helpers -------------------------------------------------------------

    def _check(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=self.dtype)
        y = np.asarray(y, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self._in:
            raise ValueError(f"x must have shape [B, {self._in}], got {x.shape}")
        if y.shape != (len(x), self._out):
            raise ValueError(f"y must have shape [B, {self._out}], got {y.shape}")
        return x, x @ self._weight.T + self._bias - y

    def _split(self, vectors: Any) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.asarray(vectors, dtype=self.dtype)
        cut = self._out * self._in
        v_w = vectors[:, :cut].reshape(len(vectors), self._out, self._in)
        return v_w, vectors[:, cut:]

    @staticmethod
    def _jvp(x: np.ndarray, v_w: np.ndarray, v_b: np.ndarray) -> np.ndarray:
        """``J v`` for every sample and vector: ``V_W x_b + v_b``, ``[K, B, O]``."""
        return np.einsum("kod,bd->kbo", v_w, x) + v_b[:, None, :]


class NumpyBackend:
    """The backend object the entry point ``numpy_linear`` names."""

    name = "numpy_linear"
    framework_module = "numpy"
    #: Names of the dense solves influx asked for, shared by every instance.
    linalg_calls: list[str] = []  # noqa: RUF012

    def owns(self, obj: Any) -> bool:
        """Only this package's models and wrappers, never plain numpy arrays."""
        return isinstance(obj, LinearModel | LinearMSE)

    def is_native_array(self, obj: Any) -> bool:
        return isinstance(obj, np.ndarray)

    def asarray(self, obj: Any, like: Any | None = None) -> np.ndarray:
        array = np.asarray(obj)
        if like is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(like.dtype, copy=False)
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def twice_differentiable(
        self, model: Any, loss: Callable[[Any, Any], Any], *, params: Any = None
    ) -> LinearMSE:
        if not isinstance(model, LinearModel):
            raise TypeError(
                f"the numpy_linear backend wraps a LinearModel, got "
                f"{type(model).__name__}."
            )
        if loss is not mean_squared_error:
            raise TypeError(
                "the numpy_linear backend only knows "
                "fake_influx_backend.mean_squared_error."
            )
        if params is not None:
            raise TypeError("a LinearModel holds its own parameters: omit params.")
        return LinearMSE(model)

    # -- optional dense linear algebra (influx.protocols.DenseLinearAlgebra) --

    def cholesky_solve(self, factor: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """``A^{-1} rhs`` from the lower Cholesky factor of ``A``; counts calls."""
        self.linalg_calls.append("cholesky_solve")
        return np.linalg.solve(factor.T, np.linalg.solve(factor, rhs))

    def solve_triangular(
        self, factor: np.ndarray, rhs: np.ndarray, *, lower: bool = True
    ) -> np.ndarray:
        """``factor^{-1} rhs`` (a general solve: the plugin needs no scipy)."""
        self.linalg_calls.append("solve_triangular")
        triangle = np.tril(factor) if lower else np.triu(factor)
        return np.linalg.solve(triangle, rhs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NumpyBackend)

    def __hash__(self) -> int:
        return hash(self.name)
