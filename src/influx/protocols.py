"""The two contracts between the framework-free core and a framework adapter.

A *backend* (:class:`Backend`) knows one array framework: which objects belong
to it, how to convert data to its arrays and how to wrap a model. A *twice
differentiable model* (:class:`TwiceDifferentiable`) is what a backend wraps a
model into: a fixed, flat parameter vector ``theta`` of length ``P`` and the
derivatives of the per-sample loss with respect to it.

Everything the core computes goes through these two protocols, so a third-party
backend is one class of each, registered under the entry-point group
``influx.backends``.

Shapes use ``B`` for the samples of one batch, ``K`` for a stack of vectors in
parameter space and ``P`` for the number of differentiated parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Backend", "DenseLinearAlgebra", "TwiceDifferentiable"]


@runtime_checkable
class TwiceDifferentiable(Protocol):
    """A model and its loss, differentiable twice in a flat parameter vector.

    The loss passed by the user is a batch mean ``loss(predictions, targets)``;
    the per-sample loss ``l(z, theta)`` is that loss on a batch of one. All
    methods are functional: they keep no autograd graph between calls and never
    modify the wrapped model. ``x`` and ``y`` are native arrays of the backend
    (convert with :meth:`Backend.asarray`).

    There is no ``hessian``: the core materialises a Hessian from batched
    :meth:`hvp` products with the identity
    (:meth:`influx.HessianOperator.to_dense`). The core checks after wrapping
    (:func:`influx.twice_differentiable`) that :attr:`parameters` is a
    ``[P]`` floating vector with finite entries, and the batch loss is checked
    to be a scalar where the optional ``value_and_grad`` exists; an adapter
    only checks what needs its framework (one dtype over the parameter
    leaves, one device).

    Optional methods, not part of the protocol's ``isinstance`` check, let the
    core verify that the loss is a batch mean (on the first batch of each data
    argument): ``value_and_grad(x, y) -> (loss [], grad [P])`` of the batch
    loss, or else ``grad(x, y) -> [P]``; and a ``loss`` attribute (the user's
    loss) names it in errors. A backend without them is not checked.
    """

    @property
    def backend(self) -> Backend:
        """The backend that produced this wrapper."""
        ...

    @property
    def num_params(self) -> int:
        """Number ``P`` of differentiated parameters."""
        ...

    @property
    def dtype(self) -> Any:
        """Floating dtype of the parameters (a native dtype object)."""
        ...

    @property
    def parameters(self) -> Any:
        """The flat parameter vector ``theta``, shape ``[P]``."""
        ...

    def per_sample_grads(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Per-sample gradients and losses.

        Parameters
        ----------
        x, y
            One batch, leading dimension ``B``.

        Returns
        -------
        grads, losses
            ``grads[b] = grad_theta l(z_b, theta)``, shape ``[B, P]``;
            ``losses[b] = l(z_b, theta)``, shape ``[B]``.
        """
        ...

    def hvp(self, x: Any, y: Any, vectors: Any) -> Any:
        """Hessian of the batch-mean loss applied to many vectors.

        Parameters
        ----------
        x, y
            One batch, leading dimension ``B``.
        vectors
            Shape ``[K, P]``.

        Returns
        -------
        Any
            ``[K, P]``: row ``k`` is ``H_batch @ vectors[k]``.
        """
        ...

    def mixed_grads(self, x: Any, y: Any, vectors: Any) -> Any:
        """Input gradients of the directional parameter gradients.

        Parameters
        ----------
        x, y
            One batch, leading dimension ``B``; ``x`` has shape ``[B, *S]``.
        vectors
            Shape ``[K, P]``.

        Returns
        -------
        Any
            ``[K, B, *S]``: entry ``[k, b]`` is
            ``grad_x <vectors[k], grad_theta l((x_b, y_b), theta)>``.
        """
        ...


@runtime_checkable
class Backend(Protocol):
    """An adapter for one array framework.

    Backends are found by name through the entry-point group ``influx.backends``;
    the entry point names a zero-argument callable (usually the class) that
    returns the backend object.

    Optional capabilities, not part of the ``isinstance`` check: dense linear
    algebra (:class:`DenseLinearAlgebra`), which the direct solver uses when
    present (else scipy for numpy arrays, else the array API's general
    ``linalg.solve``). ``influx demo`` runs on a backend whose package ships
    a ``_demo`` module (see :func:`influx.demo.demo_trainer`).
    """

    #: Registry name, e.g. ``"torch"``.
    name: str
    #: Top-level module of the framework, e.g. ``"torch"``. Detection only asks
    #: :meth:`owns` when this module is already imported.
    framework_module: str

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` (a model, array or pytree) belongs to this framework."""
        ...

    def is_native_array(self, obj: Any) -> bool:
        """Whether ``obj`` is an array of this framework."""
        ...

    def asarray(self, obj: Any, like: Any | None = None) -> Any:
        """Convert ``obj`` (numpy or native) to a native array.

        When ``like`` is given, the result lives on the same device and
        floating data takes ``like``'s dtype; integer data keeps its dtype.
        """
        ...

    def to_numpy(self, array: Any) -> Any:
        """Copy a native array to a numpy array on the host."""
        ...

    def twice_differentiable(
        self,
        model: Any,
        loss: Callable[[Any, Any], Any],
        *,
        params: Any = None,
    ) -> TwiceDifferentiable:
        """Wrap a model and its loss into a :class:`TwiceDifferentiable`.

        ``params`` is for frameworks that keep parameters apart from the model
        (JAX); ``None`` otherwise.
        """
        ...


@runtime_checkable
class DenseLinearAlgebra(Protocol):
    """Dense solves a backend may offer (an optional part of :class:`Backend`).

    The array API standard has ``linalg.cholesky`` but no triangular solve;
    the core asks the backend of its arrays for these two, so that it never
    imports a framework. Shapes follow linear algebra: right-hand sides are
    columns.
    """

    def cholesky_solve(self, factor: Any, rhs: Any) -> Any:
        """``A^{-1} rhs`` given the lower Cholesky factor ``L`` of ``A = L L^T``.

        Parameters
        ----------
        factor
            ``[P, P]`` lower triangular.
        rhs
            ``[P, K]``, of ``factor``'s dtype.

        Returns
        -------
        Any
            ``[P, K]``.
        """
        ...

    def solve_triangular(self, factor: Any, rhs: Any, *, lower: bool = True) -> Any:
        """``factor^{-1} rhs`` for a triangular ``factor``.

        Parameters
        ----------
        factor
            ``[P, P]``, lower triangular when ``lower`` else upper.
        rhs
            ``[P, K]``, of ``factor``'s dtype.
        lower
            Which triangle ``factor`` holds.

        Returns
        -------
        Any
            ``[P, K]``.
        """
        ...
