"""Layer structure: an optional adapter capability, and the core's view of it.

Block-diagonal curvature, K-FAC, EK-FAC and layer-wise scoring need to know a
model's layers. An adapter that can name them implements the
:class:`LayerStructured` protocol next to :class:`~influx.TwiceDifferentiable`:
a list of :class:`Layer` objects (where each layer's weights and bias sit in
``theta``) and, for a batch, each layer's *inputs* ``a`` and the gradients
``g`` of the loss with respect to its *outputs* (a :class:`LayerBatch`). A
backend without it still runs every flat method.

Conventions (``B`` points in the batch, ``T`` weight-sharing positions of a
layer: 1 for a dense layer on a vector, the output positions of a
convolution, the tokens of a sequence):

- A layer computes ``s[t] = W a[t] + b`` at every position ``t``, with ``W``
  of shape ``[d_out, d_in]`` and ``a[t]`` of length ``d_in`` (for a
  convolution, ``a[t]`` is the flattened input patch of position ``t``, in the
  order of the columns of ``W`` as :attr:`Layer.weight_index` lays them out).
- :attr:`Layer.weight_index` ``[d_out, d_in]`` holds the position in ``theta``
  of every entry of ``W``; :attr:`Layer.bias_index` ``[d_out]`` those of ``b``
  (``None`` without a bias). The bias is folded in as an appended constant
  ``1`` in ``a``: the *augmented* inputs have ``d_a = d_in + 1`` columns and
  :meth:`Layer.index` ``[d_out, d_a]`` has the bias as its last column.
- The (pseudo-)gradient of point ``n`` for probe ``s`` in the layer's matrix
  form is ``G[n, s] = sum_t g[n, s, t] a_aug[n, t]^T`` (``[d_out, d_a]``);
  for ``fisher="empirical"`` (one probe, the observed labels) this is the
  layer's part of the per-sample gradient ``grad_theta l(z_n)``.
- Probes (``S`` per point) are cotangents ``u`` on the model's outputs (``C``
  values per point, the per-sample output flattened), back-propagated to the
  layers: ``"empirical"``: ``u = grad_f l(f_n, y_n)`` (``S = 1``); ``"ggn"``:
  the ``C`` columns of ``H_n^{1/2}``, the symmetric square root of the output
  Hessian ``H_n = grad_f^2 l(f_n, y_n)`` with negative eigenvalues clipped to
  zero (``S = C``), so that ``sum_s G[n, s] G[n, s]^T`` is the layer's block
  of the exact Gauss-Newton matrix of point ``n``; ``"mc"``: ``u =
  H_n^{1/2} eps`` with ``eps`` standard normal draws supplied by the core
  (``S`` draws), whose covariance is ``H_n``: for cross-entropy and squared
  error it is the Fisher that sampling labels from the model's predictive
  distribution estimates.
- Parameters in no recognised layer (normalisation scales, embeddings,
  grouped convolutions, ...) are the *rest* (:func:`rest_index`, ascending
  ``theta`` order); their per-sample (pseudo-)gradients come whole in
  :attr:`LayerBatch.rest_grads`, and curvature methods give them a diagonal
  block. Nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from array_api_compat import array_namespace

from influx.errors import InputError

__all__ = [
    "FISHER_TYPES",
    "MAX_OUTPUT_HESSIAN",
    "Layer",
    "LayerBatch",
    "LayerLayout",
    "LayerStructured",
    "Noise",
    "flat_gradients",
    "has_layers",
    "layer_gradients",
    "parameter_groups",
    "rest_index",
]

#: The probes :meth:`LayerStructured.layer_batch` accepts.
FISHER_TYPES = ("empirical", "mc", "ggn")

#: Largest number ``C`` of outputs per point for which an adapter forms the
#: ``[C, C]`` output Hessian (``fisher="ggn"`` and ``"mc"``).
MAX_OUTPUT_HESSIAN = 4096

#: ``noise(B, C) -> [B, S, C]`` float64 standard normal draws (``"mc"``).
Noise = Callable[[int, int], np.ndarray]


@dataclass(frozen=True, eq=False)
class Layer:
    """One recognised layer and where its parameters sit in ``theta``.

    Parameters
    ----------
    name
        The layer's name in the model (a torch module path, a flax scope, a
        pytree path).
    kind
        ``"linear"`` or ``"conv"`` (informative).
    weight_index
        Integer array ``[d_out, d_in]``: ``theta[weight_index[o, i]]`` is
        ``W[o, i]``, with ``i`` in the order of the layer inputs' last axis.
    bias_index
        Integer array ``[d_out]`` of the bias' positions, or ``None``.
    """

    name: str
    kind: str
    weight_index: np.ndarray
    bias_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        weight = np.asarray(self.weight_index)
        if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.integer):
            raise InputError(
                f"Layer {self.name!r}: weight_index must be an integer array "
                f"[d_out, d_in], got {weight.dtype} of shape {weight.shape}."
            )
        object.__setattr__(self, "weight_index", weight.astype(np.int64))
        if self.bias_index is not None:
            bias = np.asarray(self.bias_index)
            if bias.shape != (weight.shape[0],) or not np.issubdtype(
                bias.dtype, np.integer
            ):
                raise InputError(
                    f"Layer {self.name!r}: bias_index must be an integer array "
                    f"[d_out] = [{weight.shape[0]}], got shape {bias.shape}."
                )
            object.__setattr__(self, "bias_index", bias.astype(np.int64))

    @property
    def d_out(self) -> int:
        """Number of outputs per position."""
        return int(self.weight_index.shape[0])

    @property
    def d_in(self) -> int:
        """Number of inputs per position (without the bias' constant)."""
        return int(self.weight_index.shape[1])

    @property
    def has_bias(self) -> bool:
        """Whether the layer has a bias (folded in as a constant input 1)."""
        return self.bias_index is not None

    @property
    def d_a(self) -> int:
        """Columns of the augmented inputs: ``d_in + 1`` with a bias."""
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """``d_out * d_a``."""
        return self.d_out * self.d_a

    def index(self) -> np.ndarray:
        """``[d_out, d_a]`` positions in ``theta``; the bias is the last column."""
        if self.bias_index is None:
            return self.weight_index
        return np.concatenate([self.weight_index, self.bias_index[:, None]], axis=1)


@dataclass(frozen=True)
class LayerBatch:
    """One batch's layer inputs and output gradients (native arrays).

    Attributes
    ----------
    inputs
        One ``[B, T, d_in]`` array per layer (not augmented).
    output_grads
        One ``[B, S, T, d_out]`` array per layer: the probes' gradients with
        respect to the layer's outputs, for the per-sample loss ``l(z_n)``
        (not the batch mean).
    rest_grads
        ``[B, S, P_rest]``: the probes' gradients with respect to the rest
        parameters (:func:`rest_index` order); ``P_rest`` may be 0.
    losses
        ``[B]`` per-sample losses.
    """

    inputs: tuple[Any, ...]
    output_grads: tuple[Any, ...]
    rest_grads: Any
    losses: Any


@runtime_checkable
class LayerStructured(Protocol):
    """The optional capability of a wrapped model that knows its layers."""

    @property
    def layers(self) -> Sequence[Layer]:
        """The recognised layers, in forward order."""
        ...

    def layer_batch(
        self, x: Any, y: Any, *, fisher: str = "empirical", noise: Noise | None = None
    ) -> LayerBatch:
        """Layer inputs and output gradients of one batch.

        Parameters
        ----------
        x, y
            One batch, ``B`` points.
        fisher
            The probes: ``"empirical"`` (the observed labels, ``S = 1``),
            ``"ggn"`` (the columns of the output Hessian's square root,
            ``S = C``) or ``"mc"`` (``H^{1/2} eps`` for ``eps = noise(B, C)``
            of shape ``[B, S, C]``).
        noise
            Required for ``"mc"``.
        """
        ...


def has_layers(model: Any) -> bool:
    """Whether ``model`` offers the layer structure capability.

    Its ``layer_batch`` is what is looked for (``layers`` comes with it by
    the contract): reading ``layers`` may need a traced batch first (JAX),
    and a runtime protocol check on Python 3.12+ does not see methods that a
    proxy provides through ``__getattr__``.
    """
    return callable(getattr(model, "layer_batch", None))


def rest_index(layers: Sequence[Layer], num_params: int) -> np.ndarray:
    """Positions in ``theta`` of no layer, ascending, ``[P_rest]`` int64.

    Raises
    ------
    InputError
        If the layers' indices overlap or leave ``[0, P)``.
    """
    covered = np.zeros(num_params, dtype=bool)
    for layer in layers:
        index = layer.index().ravel()
        if index.size and (index.min() < 0 or index.max() >= num_params):
            raise InputError(
                f"Layer {layer.name!r} indexes outside theta (P={num_params}): the "
                "adapter's layer structure is wrong."
            )
        # bincount, not np.unique: O(P), where unique sorted or hashed 1M
        # positions in seconds on every query.
        repeated = index.size and int(np.bincount(index).max()) > 1
        if covered[index].any() or repeated:
            raise InputError(
                f"Layer {layer.name!r} shares parameters with another layer: the "
                "adapter's layer structure is wrong."
            )
        covered[index] = True
    return np.flatnonzero(~covered).astype(np.int64)


class LayerLayout:
    """Moves between flat vectors ``[K, P]`` and per-layer matrices.

    Parameters
    ----------
    layers
        The model's layers.
    num_params
        ``P``.

    Attributes
    ----------
    rest
        :func:`rest_index` of the layers.
    order
        ``[P]``: the layers' :meth:`Layer.index` (row-major) one after the
        other, then the rest; ``inverse`` undoes it.
    """

    def __init__(self, layers: Sequence[Layer], num_params: int) -> None:
        self.layers = tuple(layers)
        self.num_params = int(num_params)
        self.rest = rest_index(self.layers, self.num_params)
        pieces = [layer.index().ravel() for layer in self.layers] + [self.rest]
        self.order = np.concatenate(pieces).astype(np.int64)
        self.inverse = np.argsort(self.order).astype(np.int64)
        self.sizes = [layer.num_params for layer in self.layers] + [self.rest.size]

    def split(self, vectors: Any) -> tuple[list[Any], Any]:
        """``[K, P]`` -> (``[K, d_out, d_a]`` per layer, the rest ``[K, P_rest]``)."""
        xp = array_namespace(vectors)
        ordered = xp.take(vectors, _like_index(xp, self.order, vectors), axis=1)
        blocks, start = [], 0
        for layer in self.layers:
            stop = start + layer.num_params
            blocks.append(
                xp.reshape(ordered[:, start:stop], (-1, layer.d_out, layer.d_a))
            )
            start = stop
        return blocks, ordered[:, start:]

    def join(self, blocks: Sequence[Any], rest: Any) -> Any:
        """The inverse of :meth:`split`: per-layer blocks and the rest -> ``[K, P]``."""
        xp = array_namespace(rest)
        count = int(rest.shape[0])
        flat = [xp.reshape(block, (count, -1)) for block in blocks] + [rest]
        ordered = xp.concat(flat, axis=1)
        return xp.take(ordered, _like_index(xp, self.inverse, ordered), axis=1)


def _like_index(xp: Any, index: np.ndarray, like: Any) -> Any:
    """``index`` as an integer array of ``like``'s namespace and device."""
    if isinstance(like, np.ndarray):
        return index
    from array_api_compat import device as array_device

    return xp.asarray(index, device=array_device(like))


def augmented_inputs(inputs: Any, layer: Layer) -> Any:
    """``[B, T, d_a]``: ``inputs`` with a column of ones appended for a bias."""
    if not layer.has_bias:
        return inputs
    xp = array_namespace(inputs)
    ones = xp.ones((*inputs.shape[:-1], 1), dtype=inputs.dtype)
    if not isinstance(inputs, np.ndarray):
        from array_api_compat import device as array_device

        ones = xp.ones(
            (*inputs.shape[:-1], 1), dtype=inputs.dtype, device=array_device(inputs)
        )
    return xp.concat([inputs, ones], axis=-1)


def layer_gradients(inputs: Any, output_grads: Any, layer: Layer) -> Any:
    """Per-sample, per-probe layer gradients ``[B, S, d_out, d_a]``.

    ``G[n, s] = sum_t output_grads[n, s, t] a_aug[n, t]^T``.

    Parameters
    ----------
    inputs
        ``[B, T, d_in]``.
    output_grads
        ``[B, S, T, d_out]``.
    layer
        The layer (for its bias).
    """
    xp = array_namespace(inputs)
    a = augmented_inputs(inputs, layer)  # [B, T, d_a]
    g = xp.permute_dims(output_grads, (0, 1, 3, 2))  # [B, S, d_out, T]
    return g @ a[:, None, :, :]


def flat_gradients(layout: LayerLayout, batch: LayerBatch) -> Any:
    """Per-sample, per-probe gradients in ``theta`` order, ``[B, S, P]``.

    The reference assembly of a :class:`LayerBatch` (tests, and a fallback
    for code that needs flat vectors): it materialises ``[B, S, P]``.
    """
    xp = array_namespace(batch.rest_grads)
    count, probes = int(batch.rest_grads.shape[0]), int(batch.rest_grads.shape[1])
    blocks = [
        xp.reshape(layer_gradients(a, g, layer), (count * probes, -1))
        for layer, a, g in zip(
            layout.layers, batch.inputs, batch.output_grads, strict=True
        )
    ]
    rest = xp.reshape(batch.rest_grads, (count * probes, -1))
    flat = layout.join(blocks, rest)
    return xp.reshape(flat, (count, probes, layout.num_params))


def parameter_groups(model: Any) -> list[tuple[str, np.ndarray]]:
    """Named groups of ``theta`` positions that partition ``[0, P)``.

    The model's layers (weights and bias together) when it offers the layer
    structure, then the rest split by the adapter's ``parameter_blocks``
    (``(name, size)`` in ``theta`` order) where it has them; without layers,
    the parameter blocks; without either, one group ``"all"``. Used for
    per-layer scores and block-diagonal curvature.

    Returns
    -------
    list of (str, numpy.ndarray)
        ``(name, index)`` with ``index`` an int64 array of positions.
    """
    num_params = int(model.num_params)
    groups: list[tuple[str, np.ndarray]] = []
    if has_layers(model):
        layers = list(model.layers)
        groups = [(layer.name, layer.index().ravel()) for layer in layers]
        remaining = rest_index(layers, num_params)
    else:
        remaining = np.arange(num_params, dtype=np.int64)
    if remaining.size == 0:
        return groups
    blocks = getattr(model, "parameter_blocks", None)
    if not blocks:
        name = "rest" if groups else "all"
        return [*groups, (name, remaining)]
    start = 0
    for name, size in blocks:
        span = np.arange(start, start + int(size), dtype=np.int64)
        start += int(size)
        inside = span[np.isin(span, remaining)]
        if inside.size:
            groups.append((str(name), inside))
    return groups
