"""An apply function, its parameter pytree and a loss as a function of a flat vector."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from influx._checks import scalar_loss
from influx.errors import InputError
from influx.layers import Layer, LayerBatch, Noise
from influx_jax._compiled import compiled_model, pad_batch, pad_vectors, take_leading
from influx_jax._layer_batch import LayerStructure, example_of, structure_key
from influx_jax._libraries import split_model

__all__ = ["JaxTwiceDifferentiable"]


class _LazyLayers(Sequence[Layer]):
    """The layers of a wrapper, found when first read (see ``layers``)."""

    def __init__(self, resolve: Callable[[], tuple[Layer, ...]]) -> None:
        self._resolve = resolve

    def __getitem__(self, index: Any) -> Any:
        return self._resolve()[index]

    def __len__(self) -> int:
        return len(self._resolve())

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._resolve())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self._resolve()))


class JaxTwiceDifferentiable:
    """A JAX model ``apply_fn(params, x)`` with its loss, differentiable in ``params``.

    ``params`` may be any pytree of floating arrays (flax parameters, an
    equinox module's arrays, haiku parameters); it is flattened into ``theta``
    (``[P]``) with ``jax.flatten_util.ravel_pytree``. The models of JAX
    libraries are split first (see :mod:`influx_jax._libraries`): of flax
    variables with collections besides ``"params"`` (``"batch_stats"``) only
    ``variables["params"]`` is differentiated, the rest held constant; an
    equinox module (``params=None``) is partitioned with
    ``equinox.is_inexact_array`` and mapped over the batch,
    ``jax.vmap(module)(x)``; a flax nnx module (``params=None``) is
    differentiated in its ``nnx.Param`` state and run in evaluation mode. The
    functions of the protocol are ``jax.jit``-compiled once per bucket of
    batch sizes (batches are padded with masked samples, see
    ``influx_jax._compiled``) and shared by every wrapper of the same
    ``apply_fn`` and ``loss``.

    The wrapper offers the layer structure (:class:`influx.layers.LayerStructured`):
    :attr:`layers` are the dense and convolution layers found in the jaxpr of
    ``apply_fn`` on the first point it has seen (see
    :mod:`influx_jax._layers`), :meth:`layer_batch` their inputs and output
    gradients; :meth:`ggnvp` gives Gauss-Newton products.

    Integer inputs ``x`` reach ``apply_fn`` unchanged (``jnp`` promotes them
    to the parameters' dtype in arithmetic, and ``jnp.take`` or indexing by
    token ids keeps working); for the perturbation influence, which
    differentiates in ``x``, they are cast to the parameters' dtype.

    Parameters
    ----------
    apply_fn
        ``apply_fn(params, x) -> predictions`` for a batch ``x``; or an equinox
        or flax nnx module, with ``params=None``.
    params
        The parameter pytree, all differentiated leaves floating, of one dtype;
        or flax variables; or ``None`` for a module.
    loss
        ``loss(predictions, targets) -> scalar``, a mean over the batch.

    Examples
    --------
    >>> params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    >>> model = JaxTwiceDifferentiable(
    ...     lambda p, x: x @ p["w"] + p["b"], params,
    ...     lambda pred, y: jnp.mean((pred - y) ** 2))
    >>> model.num_params
    4
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        params: Any | None,
        loss: Callable[[Any, Any], Any],
    ) -> None:
        apply_fn, params = split_model(apply_fn, params)
        if not callable(apply_fn):
            raise TypeError(
                f"apply_fn must be callable as apply_fn(params, x), got "
                f"{type(apply_fn).__name__}."
            )
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}.")
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise InputError("params is empty: pass the model's parameter pytree.")
        dtypes = {jnp.asarray(leaf).dtype for leaf in leaves}
        if len(dtypes) > 1:  # floating and finite are checked by the core
            raise TypeError(
                f"params leaves must share one floating dtype, got "
                f"{sorted(map(str, dtypes))}. Cast them, e.g. with "
                "jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)."
            )
        self._apply_fn = apply_fn
        self._loss = loss
        self._params = params
        self._example: Any = None
        self._build()

    def _build(self) -> None:
        """Flat parameters, compiled functions and caches (rebuilt on unpickling)."""
        theta, unravel = ravel_pytree(self._params)
        self._theta = theta
        self._unravel = unravel

        self._compiled = compiled_model(
            self._apply_fn, self._loss, self._unravel, self._theta
        )
        # Layer structure (found by tracing on a batch of one, see ``layers``):
        # one LayerStructure per input structure, the first batch's first.
        self._structures: dict[Any, LayerStructure] = {}
        self._structures_lock = threading.Lock()
        # The user's own batch loss, unpadded: what the loss-convention check
        # compares with the per-sample losses (compiled for the checked batch).
        self._value_and_grad = jax.jit(jax.value_and_grad(self._batch_loss))

    # -- pickling (dask sends the wrapper to its workers) ----------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the model's definition, never its compiled functions or caches.

        Kept: the apply function, the loss, the parameter pytree and the first
        point seen (for the layer tracing); the rest is rebuilt on unpickling
        (and compiled again on first use). The dtype travels first, so that a
        64-bit model unpickled in a process without ``jax_enable_x64`` switches
        it on *before* its arrays are rebuilt (see :func:`_unpickled`).
        """
        state = {
            "_apply_fn": self._apply_fn,
            "_loss": self._loss,
            "_params": self._params,
            "_example": self._example,
        }
        return (_unpickled, (type(self), str(self.dtype)), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()

    @property
    def backend(self) -> Any:
        """The JAX backend."""
        from influx_jax._backend import JaxBackend

        return JaxBackend()

    @property
    def apply_fn(self) -> Callable[[Any, Any], Any]:
        """The apply function of :attr:`params` (a library model's is built)."""
        return self._apply_fn

    @property
    def params(self) -> Any:
        """The differentiated parameter pytree (flax variables: their ``params``)."""
        return self._params

    @property
    def loss(self) -> Callable[[Any, Any], Any]:
        """The batch-mean loss."""
        return self._loss

    @property
    def num_params(self) -> int:
        """Number ``P`` of parameters."""
        return int(self._theta.shape[0])

    @property
    def dtype(self) -> Any:
        """The parameters' dtype."""
        return self._theta.dtype

    @property
    def parameters(self) -> jax.Array:
        """Flat parameters ``theta``, ``[P]``."""
        return self._theta

    @property
    def parameter_blocks(self) -> list[tuple[str, int]]:
        """``(path, size)`` of each parameter leaf, in ``theta`` order."""
        return [
            (jax.tree_util.keystr(path), int(jnp.size(leaf)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(self._params)
        ]

    # -- the functions jax transforms ---------------------------------------

    def _batch_loss(self, theta: jax.Array, x: Any, y: Any) -> jax.Array:
        return scalar_loss(self._loss(self._apply_fn(self._unravel(theta), x), y))

    def _sample_loss(self, theta: jax.Array, x: Any, y: Any) -> jax.Array:
        return self._batch_loss(theta, x[None], y[None])

    # -- the TwiceDifferentiable protocol ------------------------------------

    def per_sample_grads(self, x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
        """Per-sample gradients ``[B, P]`` and losses ``[B]``."""
        self._remember(x)
        count, x, y, _ = pad_batch(x, y)
        losses, grads = self._compiled.per_sample(self._theta, x, y)
        return take_leading(grads, count), take_leading(losses, count)

    def grad(self, x: Any, y: Any) -> jax.Array:
        """Gradient of the batch-mean loss, ``[P]``."""
        self._remember(x)
        _, x, y, mask = pad_batch(x, y)
        return self._compiled.grad(self._theta, x, y, mask)

    def value_and_grad(self, x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
        """Batch-mean loss ``[]`` and its gradient ``[P]`` (optional method)."""
        self._remember(x)
        return self._value_and_grad(self._theta, x, y)

    def hvp(self, x: Any, y: Any, vectors: jax.Array) -> jax.Array:
        """``[K, P]`` products of the batch-mean Hessian with ``vectors[k]``."""
        self._remember(x)
        _, x, y, mask = pad_batch(x, y)
        count = int(vectors.shape[0])
        products = self._compiled.hvp(self._theta, x, y, mask, pad_vectors(vectors))
        return take_leading(products, count)

    def ggnvp(self, x: Any, y: Any, vectors: jax.Array) -> jax.Array:
        """``[K, P]`` products of the batch-mean Gauss-Newton matrix with ``vectors``.

        ``J^T H_out J v``: ``J`` the Jacobian of the batch's outputs in
        ``theta``, ``H_out`` the Hessian of the batch-mean loss in the outputs.
        """
        self._remember(x)
        _, x, y, mask = pad_batch(x, y)
        count = int(vectors.shape[0])
        products = self._compiled.ggnvp(self._theta, x, y, mask, pad_vectors(vectors))
        return take_leading(products, count)

    def mixed_grads(self, x: Any, y: Any, vectors: jax.Array) -> jax.Array:
        """``[K, B, *S]``: ``grad_x <vectors[k], grad_theta l(x_b, y_b)>``."""
        self._remember(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(self.dtype)  # gradients in x need a floating x
        count, x, y, mask = pad_batch(x, y)
        k = int(vectors.shape[0])
        mixed = self._compiled.mixed(self._theta, x, y, mask, pad_vectors(vectors))
        return take_leading(take_leading(mixed, k), count, axis=1)

    # -- layer structure (influx.layers.LayerStructured) ---------------------

    def _remember(self, x: Any) -> None:
        """Keep the first batch's first point: ``layers`` traces on it."""
        if self._example is None:
            self._example = example_of(x)

    def _structure(self, x: Any) -> LayerStructure:
        """The layer structure for batches like ``x`` (traced on ``x[:1]``)."""
        key = structure_key(x)
        with self._structures_lock:
            return self._structure_locked(key, x)

    def _structure_locked(self, key: Any, x: Any) -> LayerStructure:
        structure = self._structures.get(key)
        if structure is None:
            example = example_of(x)
            structure = LayerStructure(
                self._apply_fn, self._params, self._loss, example
            )
            first = next(iter(self._structures.values()), None)
            if first is not None and not first.same_layers(structure):
                raise InputError(
                    "The model's layers differ between inputs of different shapes "
                    f"({[layer.name for layer in first.layers]} against "
                    f"{[layer.name for layer in structure.layers]}): pass batches of "
                    "one input shape to layer-structured methods."
                )
            self._structures[key] = structure
        return structure

    def find_layers(self, x: Any) -> list[Layer]:
        """Trace ``apply_fn`` on ``x[:1]`` and return its layers (see ``layers``)."""
        self._remember(x)
        return list(self._structure(x).layers)

    @property
    def layers(self) -> Sequence[Layer]:
        """The dense and convolution layers found in ``apply_fn``, forward order.

        Found from the jaxpr of ``apply_fn(params, x[:1])`` (see
        :mod:`influx_jax._layers`): ``dot_general`` and
        ``conv_general_dilated`` with a parameter leaf as weight, and the bias
        added to their output; parameters of no layer are the rest. Tracing
        needs an input: the first batch this wrapper has seen (any method), or
        :meth:`find_layers`. The sequence is lazy: reading it does the
        tracing, so that the capability check
        (:func:`influx.layers.has_layers`) holds before the first batch.

        Raises
        ------
        InputError
            When the sequence is read before the wrapper has seen a batch.
        """
        return _LazyLayers(self._resolve_layers)

    def _resolve_layers(self) -> tuple[Layer, ...]:
        if self._example is None:
            raise InputError(
                "The JAX model's layers are found by tracing apply_fn on a batch, "
                "and this wrapper has seen none yet: call model.find_layers(x) (or "
                "model.layer_batch(x, y)) with a training batch first."
            )
        return tuple(self._structure(self._example).layers)

    def layer_batch(
        self, x: Any, y: Any, *, fisher: str = "empirical", noise: Noise | None = None
    ) -> LayerBatch:
        """Layer inputs and output gradients of one batch.

        Parameters
        ----------
        x, y
            One batch, ``B`` points.
        fisher
            ``"empirical"`` (``S = 1``), ``"ggn"`` (``S = C``, the columns of
            each point's output-Hessian square root) or ``"mc"`` (``S`` draws
            ``H^{1/2} eps``, ``eps = noise(B, C)``).
        noise
            ``noise(B, C) -> [B, S, C]`` standard normal draws, for ``"mc"``.

        Returns
        -------
        LayerBatch
            ``inputs`` ``[B, T, d_in]`` and ``output_grads`` ``[B, S, T,
            d_out]`` per layer, ``rest_grads`` ``[B, S, P_rest]``, ``losses``
            ``[B]``.
        """
        self._remember(x)
        structure = self._structure(x)
        leaves = self._leaves()
        return structure.layer_batch(leaves, x, y, fisher, noise, self.dtype)

    def _leaves(self) -> list[Any]:
        if not hasattr(self, "_leaf_values"):
            self._leaf_values = jax.tree_util.tree_leaves(self._unravel(self._theta))
        return self._leaf_values

    def __repr__(self) -> str:
        name = getattr(self._apply_fn, "__qualname__", type(self._apply_fn).__name__)
        return (
            f"JaxTwiceDifferentiable({name}, num_params={self.num_params}, "
            f"dtype={self.dtype})"
        )


def _unpickled(cls: type, dtype: str) -> Any:
    """An empty wrapper to unpickle into; 64-bit models switch ``jax_enable_x64`` on.

    JAX without ``jax_enable_x64`` would silently rebuild float64 parameters
    as float32 and compute every influence in single precision. A process
    that receives a float64 model (a dask worker started without
    ``JAX_ENABLE_X64=1``) therefore gets 64-bit mode switched on, with a
    :class:`RuntimeWarning`, before any of the model's arrays is rebuilt. The
    switch is process-wide: set ``JAX_ENABLE_X64=1`` in the workers'
    environment to have it from the start.
    """
    if dtype in _WIDE_DTYPES and not jax.config.read("jax_enable_x64"):
        warnings.warn(
            f"Unpickling a JAX model of dtype {dtype}: this process had "
            "jax_enable_x64 off, which would turn its parameters into 32-bit "
            "ones, so influx switched it on (process-wide). Set JAX_ENABLE_X64=1 "
            "in this process's environment (a dask worker's env) to start with it.",
            RuntimeWarning,
            stacklevel=2,
        )
        jax.config.update("jax_enable_x64", True)
    return cls.__new__(cls)


#: Dtypes that need ``jax_enable_x64``.
_WIDE_DTYPES = frozenset({"float64", "complex128", "int64", "uint64"})
