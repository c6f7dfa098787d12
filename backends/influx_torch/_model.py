"""A torch module and its loss as a twice-differentiable function of a flat vector."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.func import functional_call, grad, grad_and_value, vjp, vmap

from influx._checks import scalar_loss
from influx.errors import InputError
from influx.layers import Layer, LayerBatch, Noise
from influx_torch._ggn import ggnvp
from influx_torch._layers import LayerStructure, find_layers, layer_batch

__all__ = ["TorchTwiceDifferentiable"]

#: One re-entrant lock per module, shared by every wrapper of that module.
_MODULE_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_MODULE_LOCKS_GUARD = threading.Lock()


def module_lock(module: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises influx's calls on ``module``.

    ``torch.func.functional_call`` swaps the module's parameters and buffers
    in place for the duration of a call, and the evaluation-mode switch sets
    the modules' ``training`` flags: two threads doing either at once on one
    module would see each other's tensors and leave plain tensors or the wrong
    mode behind. Every wrapper of the same module (and every thread) shares
    this lock, which is held across the mode switch and the functional call.
    """
    with _MODULE_LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(module)
        if lock is None:
            lock = threading.RLock()
            _MODULE_LOCKS[module] = lock
        return lock


class TorchTwiceDifferentiable:
    """A ``torch.nn.Module`` with its loss, differentiable in its parameters.

    The differentiated parameters are those with ``requires_grad=True``,
    flattened in ``named_parameters()`` order into ``theta`` (``[P]``), captured
    when the wrapper is built: wrap again after training further. Frozen
    parameters and buffers enter as constants. Every method is functional
    (``torch.func``): the module's parameters, gradients and ``requires_grad``
    flags are never touched. Each call runs the module in evaluation mode
    (dropout off, batch-norm on its running statistics) and restores the train
    or eval mode of every submodule afterwards, also when the call raises.
    Calls from several threads on one module (through one wrapper or several)
    are serialised by a lock per module (:func:`module_lock`), so each gives
    the single-threaded result and leaves the module as it was.

    Integer (and bool) inputs ``x`` are cast to the parameters' dtype before
    the forward pass, as JAX promotes them in arithmetic, so that a model of
    numeric features gives the same influences from integer and floating
    inputs; a module that contains an ``nn.Embedding`` or ``nn.EmbeddingBag``
    receives its integer inputs unchanged (token ids).

    Parameters
    ----------
    model
        The module; its differentiated parameters must share one floating dtype
        and one device.
    loss
        ``loss(predictions, targets) -> scalar``, a mean over the batch.

    Examples
    --------
    >>> model = TorchTwiceDifferentiable(torch.nn.Linear(3, 1), torch.nn.MSELoss())
    >>> model.num_params
    4
    """

    #: Calls are serialised per module by :func:`module_lock`, so influx needs
    #: no lock of its own around them.
    thread_safe = True

    def __init__(
        self, model: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor]
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}.")
        with module_lock(model):  # never read another thread's swapped-in tensors
            named = list(model.named_parameters())
            buffers = list(model.named_buffers())
        trainable = [(n, p) for n, p in named if p.requires_grad]
        if not trainable:
            raise InputError(
                "model has no parameter with requires_grad=True: there is nothing "
                "to differentiate. Unfreeze the parameters to attribute."
            )
        dtypes = {p.dtype for _, p in trainable}
        devices = {p.device for _, p in trainable}
        if len(dtypes) > 1:  # floating and finite are checked by the core
            raise TypeError(
                f"model's differentiated parameters must share one floating dtype, "
                f"got {sorted(map(str, dtypes))}. Convert the model with "
                "model.to(torch.float32) or model.double()."
            )
        if len(devices) > 1:
            raise TypeError(
                f"model's differentiated parameters are on several devices "
                f"{sorted(map(str, devices))}; move the model to one device."
            )
        self._module = model
        self._loss = loss
        self._names = [n for n, _ in trainable]
        self._shapes = [p.shape for _, p in trainable]
        self._sizes = [p.numel() for _, p in trainable]
        with torch.no_grad():
            self._theta = torch.cat([p.detach().reshape(-1) for _, p in trainable])
        trainable_names = set(self._names)
        self._constants = {n: p.detach() for n, p in named if n not in trainable_names}
        self._constants.update({n: b.detach() for n, b in buffers})
        # Integer inputs of a module without an embedding are numbers, not ids.
        embeddings = (torch.nn.Embedding, torch.nn.EmbeddingBag)
        self._cast_integer_inputs = not any(
            isinstance(m, embeddings) for m in model.modules()
        )
        self._layer_structure: LayerStructure | None = None  # found on first use

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the module, loss and parameters; the layer structure is found again.

        (dask sends the wrapper to its workers; the per-module lock is a
        process-wide table, never part of the wrapper.)
        """
        state = dict(self.__dict__)
        state["_layer_structure"] = None
        return state

    @property
    def backend(self) -> Any:
        """The torch backend."""
        from influx_torch._backend import TorchBackend

        return TorchBackend()

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped module (never modified)."""
        return self._module

    @property
    def loss(self) -> Callable[[Any, Any], torch.Tensor]:
        """The batch-mean loss."""
        return self._loss

    @property
    def num_params(self) -> int:
        """Number ``P`` of differentiated parameters."""
        return int(self._theta.numel())

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self._theta.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self._theta.device

    @property
    def parameters(self) -> torch.Tensor:
        """Flat differentiated parameters ``theta``, ``[P]`` (a copy)."""
        return self._theta

    @property
    def parameter_names(self) -> list[str]:
        """Names of the differentiated parameters, in ``theta`` order."""
        return list(self._names)

    @property
    def parameter_blocks(self) -> list[tuple[str, int]]:
        """``(name, size)`` of each differentiated parameter, in ``theta`` order."""
        return list(zip(self._names, self._sizes, strict=True))

    # -- the functions torch.func transforms ---------------------------------

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(theta, self._sizes)
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(
                self._names, pieces, self._shapes, strict=True
            )
        }

    def _inputs(self, x: Any) -> Any:
        """``x``, cast to the parameters' dtype if it holds integers or bools."""
        if (
            self._cast_integer_inputs
            and isinstance(x, torch.Tensor)
            and not (x.is_floating_point() or x.is_complex())
        ):
            return x.to(self.dtype)
        return x

    def _batch_loss(self, theta: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        params = {**self._constants, **self._unflatten(theta)}
        x = self._inputs(x)
        with module_lock(self._module):  # re-entrant: held already by callers
            predictions = functional_call(self._module, params, (x,))
        return scalar_loss(self._loss(predictions, y), "Use a reduction='mean' loss.")

    def _sample_loss(self, theta: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        return self._batch_loss(theta, x.unsqueeze(0), y.unsqueeze(0))

    # -- the TwiceDifferentiable protocol ------------------------------------

    def per_sample_grads(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample gradients ``[B, P]`` and losses ``[B]``."""
        with self._eval_mode():
            fn = vmap(grad_and_value(self._sample_loss), in_dims=(None, 0, 0))
            grads, losses = fn(self._theta, x, y)
        return grads.detach(), losses.detach()

    def grad(self, x: Any, y: Any) -> torch.Tensor:
        """Gradient of the batch-mean loss, ``[P]``."""
        with self._eval_mode():
            return grad(self._batch_loss)(self._theta, x, y).detach()

    def value_and_grad(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-mean loss ``[]`` and its gradient ``[P]`` (optional method)."""
        with self._eval_mode():
            gradient, value = grad_and_value(self._batch_loss)(self._theta, x, y)
        return value.detach(), gradient.detach()

    def hvp(self, x: Any, y: Any, vectors: torch.Tensor) -> torch.Tensor:
        """``[K, P]`` products of the batch-mean Hessian with ``vectors[k]``.

        Reverse over reverse: the gradient map is differentiated once with
        ``vjp`` and its pullback is mapped over the vectors (the Hessian is
        symmetric, so the vector-Jacobian product is the Hessian-vector
        product). This shares the first-order graph between all ``K`` vectors
        and, unlike forward over reverse, works with every loss torch
        differentiates (``mse_loss`` has no forward-mode rule over its
        backward).
        """
        with self._eval_mode():
            _, pullback = vjp(lambda t: grad(self._batch_loss)(t, x, y), self._theta)
            return vmap(pullback)(vectors)[0].detach()

    def mixed_grads(self, x: Any, y: Any, vectors: torch.Tensor) -> torch.Tensor:
        """``[K, B, *S]``: ``grad_x <vectors[k], grad_theta l(x_b, y_b)>``.

        The batch-mean loss times ``B`` is the sum of the per-sample losses, and
        sample ``b``'s term depends on ``x_b`` only, so one input gradient of
        ``<v, grad_theta (B * loss)>`` gives every sample's row at once: two
        reverse passes over the batch per vector, mapped over the vectors,
        instead of one per sample and vector.
        """
        x = self._inputs(x)
        count = x.shape[0]
        batch_grad = grad(self._batch_loss)

        def directional(xb: Any, v: torch.Tensor) -> torch.Tensor:
            return count * torch.dot(batch_grad(self._theta, xb, y), v)

        with self._eval_mode():
            return vmap(grad(directional), in_dims=(None, 0))(x, vectors).detach()

    def ggnvp(self, x: Any, y: Any, vectors: torch.Tensor) -> torch.Tensor:
        """``[K, P]`` products of the batch-mean Gauss-Newton matrix ``J^T H_out J``.

        ``J`` is the Jacobian of the batch's outputs in ``theta`` and ``H_out``
        the Hessian of the batch-mean loss in the outputs (see
        :func:`influx_torch._ggn.ggnvp`).
        """
        with self._eval_mode():
            return ggnvp(self, x, y, vectors)

    # -- layer structure (influx.layers.LayerStructured) ----------------------

    @property
    def layers(self) -> list[Layer]:
        """The recognised layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``).

        See :mod:`influx_torch._layers` for which modules are layers and which
        parameters are the rest. Found once, on first use.
        """
        return list(self._layer_modules().layers)

    def _layer_modules(self) -> LayerStructure:
        with module_lock(self._module):
            if self._layer_structure is None:
                self._layer_structure = find_layers(
                    self._module, self._names, self._sizes
                )
            return self._layer_structure

    def layer_batch(
        self, x: Any, y: Any, *, fisher: str = "empirical", noise: Noise | None = None
    ) -> LayerBatch:
        """One batch's layer inputs, output gradients, rest gradients and losses.

        Layer inputs ``[B, T, d_in]``, output gradients ``[B, S, T, d_out]``,
        rest gradients ``[B, S, P_rest]`` and losses ``[B]``.

        The contract is :class:`influx.layers.LayerStructured`; the work is
        done by :func:`influx_torch._layers.layer_batch`: one forward and one
        reverse pass batched over the ``S`` probes (a second pass, mapped over
        the samples, only for rest parameters outside leaf modules or shared).
        """
        structure = self._layer_modules()
        with self._eval_mode():
            return layer_batch(self, structure, x, y, fisher, noise)

    # -- state ---------------------------------------------------------------

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Hold the module's lock and run in eval mode; restore the modes after.

        The lock is taken before the modes are read and released after they
        are restored, so concurrent calls never see another call's eval mode.
        """
        with module_lock(self._module):
            modes = [(m, m.training) for m in self._module.modules()]
            if not any(training for _, training in modes):
                yield
                return
            try:
                self._module.eval()
                yield
            finally:
                for module, training in modes:
                    module.training = training

    def __repr__(self) -> str:
        return (
            f"TorchTwiceDifferentiable({type(self._module).__name__}, "
            f"num_params={self.num_params}, dtype={self.dtype}, device={self.device})"
        )
