"""Compiled functions of a JAX model, shared across wrappers and padded to buckets.

Two things make a cold JAX run slow: every new input shape compiles anew, and
every wrapper used to compile its own functions. Here

- batches are padded to a few *bucket* sizes (:func:`batch_bucket`) with
  copies of a real sample and a mask; the batch loss is the masked mean of the
  per-sample losses, so padded rows contribute nothing and the results are
  exact (influx assumes the batch loss is the mean of per-sample losses and
  samples are independent in evaluation);
- the jitted functions take ``theta`` as an argument and are kept in a
  module-level cache keyed by the ``apply_fn`` and ``loss`` objects (held
  weakly: an entry goes when either function is garbage collected) and the
  parameters' structure, so a second wrapper of the same model reuses them.

A dense Hessian is not compiled here: the core builds it from batched HVPs
with chunks of the identity of one size (``influx.operators.identity_chunks``),
which compile once.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influx._checks import scalar_loss

__all__ = ["CompiledModel", "batch_bucket", "compiled_model", "vector_bucket"]

#: Batch sizes up to this are padded to the next power of two; larger ones to
#: a multiple of a quarter of the next power of two (at most 33% padding).
POWER_OF_TWO_LIMIT = 256


def batch_bucket(count: int) -> int:
    """The padded size of a batch of ``count`` points.

    Powers of two up to :data:`POWER_OF_TWO_LIMIT`, then two buckets per
    octave (``3 * 2**k`` and ``4 * 2**k``), so that any number of distinct
    batch sizes compiles a logarithmic number of times: sizes 1 to 256 meet
    at most 9 buckets, 10 to 49 meet 3 (16, 32, 64).
    """
    if count <= 1:
        return 1
    power = 1 << (count - 1).bit_length()
    if power <= POWER_OF_TWO_LIMIT:
        return power
    three_quarters = 3 * power // 4
    return three_quarters if count <= three_quarters else power


def vector_bucket(count: int) -> int:
    """``count`` rounded up to a power of two up to 8, else to a multiple of 8.

    Padded rows cost as much as real ones, so the buckets are fine (100
    vectors run as 104, not 128), while a solver that halves its stack still
    meets only a few sizes.
    """
    if count <= 8:
        return 1 << max(count - 1, 0).bit_length()
    return -(-count // 8) * 8


# -- padding ------------------------------------------------------------------


@partial(jax.jit, static_argnums=1)
def _pad_with_first(x: Any, size: int) -> Any:
    """Rows of every leaf of ``x`` padded to ``size`` with copies of row 0."""

    def pad(leaf: Any) -> Any:
        extra = jnp.broadcast_to(leaf[:1], (size - leaf.shape[0], *leaf.shape[1:]))
        return jnp.concatenate([leaf, extra], axis=0)

    return jax.tree_util.tree_map(pad, x)


@partial(jax.jit, static_argnums=1)
def _pad_with_zeros(vectors: Any, size: int) -> Any:
    extra = jnp.zeros((size - vectors.shape[0], *vectors.shape[1:]), vectors.dtype)
    return jnp.concatenate([vectors, extra], axis=0)


@partial(jax.jit, static_argnums=(1, 2))
def _take_leading(array: Any, count: int, axis: int) -> Any:
    return jax.lax.slice_in_dim(array, 0, count, axis=axis)


def _on_host(tree: Any) -> bool:
    """Whether every leaf is numpy or a JAX array on the CPU (numpy reads it)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, np.ndarray):
            continue
        devices = getattr(leaf, "devices", None)
        if devices is None or any(d.platform != "cpu" for d in devices()):
            return False
    return True


def _host_pad(leaf: Any, size: int) -> Any:
    leaf = np.asarray(leaf)
    if leaf.shape[0] == size:
        return leaf
    extra = np.broadcast_to(leaf[:1], (size - leaf.shape[0], *leaf.shape[1:]))
    return np.concatenate([leaf, extra], axis=0)


def batch_size(x: Any) -> int:
    """Number of points in a batch (the leading axis of its first leaf)."""
    leaves = jax.tree_util.tree_leaves(x)
    return int(np.shape(leaves[0])[0])


def pad_batch(x: Any, y: Any) -> tuple[int, Any, Any, np.ndarray]:
    """``(count, x, y, mask)`` with ``x`` and ``y`` padded to a bucket size.

    Padded rows are copies of the first point (not zeros, which could give
    NaN in a log or a normalisation); ``mask`` (``[bucket]`` bool, on the
    host) marks the real points.
    """
    count = batch_size(x)
    size = batch_bucket(count)
    if _on_host((x, y)):  # numpy pads without compiling; always numpy, so that
        # padded and unpadded batches meet the same compiled function
        x = jax.tree_util.tree_map(lambda leaf: _host_pad(leaf, size), x)
        y = jax.tree_util.tree_map(lambda leaf: _host_pad(leaf, size), y)
    elif size != count:
        x = _pad_with_first(x, size)
        y = _pad_with_first(y, size)
    return count, x, y, np.arange(size) < count


def pad_vectors(vectors: Any) -> Any:
    """``vectors`` (``[K, P]``) padded with zero rows to :func:`vector_bucket`."""
    count = int(vectors.shape[0])
    size = vector_bucket(count)
    if _on_host(vectors):
        host = np.asarray(vectors)
        if size == count:
            return host
        extra = np.zeros((size - count, *host.shape[1:]), host.dtype)
        return np.concatenate([host, extra], axis=0)
    return vectors if size == count else _pad_with_zeros(vectors, size)


def take_leading(array: Any, count: int, axis: int = 0) -> Any:
    """The first ``count`` entries of ``array`` along ``axis``."""
    if int(array.shape[axis]) == count:
        return array
    if _on_host(array):
        index = (slice(None),) * axis + (slice(0, count),)
        return jnp.asarray(np.asarray(array)[index])
    return _take_leading(array, count, axis)


# -- the compiled functions ---------------------------------------------------


class _WeakCallable:
    """A callable held by weak reference (bound methods by their parts)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        if isinstance(fn, types.MethodType):
            self.refs = (weakref.ref(fn.__func__), weakref.ref(fn.__self__))
        else:
            self.refs = (weakref.ref(fn),)

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(id(ref()) for ref in self.refs)

    def referents(self) -> list[Any]:
        return [ref() for ref in self.refs]

    def __call__(self, *args: Any) -> Any:
        parts = self.referents()
        if any(part is None for part in parts):
            raise RuntimeError("the wrapped JAX function was garbage collected.")
        fn = parts[0] if len(parts) == 1 else types.MethodType(parts[0], parts[1])
        return fn(*args)


def _one(tree: Any) -> Any:
    """Each leaf of a single sample given a leading batch axis of one."""
    return jax.tree_util.tree_map(lambda leaf: leaf[None], tree)


class CompiledModel:
    """The jitted functions of one ``(apply_fn, loss, parameter structure)``.

    Every function takes the flat parameters ``theta`` (``[P]``) first, and a
    batch padded to a bucket size (:func:`pad_batch`) with its ``mask``
    (``[B]`` bool). Results have the padded batch size; callers drop the
    padded rows.
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        loss: Callable[[Any, Any], Any],
        unravel: Callable[[Any], Any],
    ) -> None:
        self._apply = apply_fn
        self._loss = loss
        self._unravel = unravel
        self.per_sample = jax.jit(
            jax.vmap(jax.value_and_grad(self._sample_loss), in_axes=(None, 0, 0))
        )
        self.grad = jax.jit(jax.grad(self._masked_loss))
        self.hvp = jax.jit(self._hvp)
        self.ggnvp = jax.jit(self._ggnvp)
        self.mixed = jax.jit(self._mixed)

    def _sample_loss(self, theta: Any, x: Any, y: Any) -> Any:
        """``l(z, theta)``: the loss on a batch of one."""
        return scalar_loss(
            self._loss(self._apply(self._unravel(theta), _one(x)), _one(y))
        )

    def _sample_losses(self, theta: Any, x: Any, y: Any) -> Any:
        """``[B]`` per-sample losses from one model evaluation on the batch."""
        predictions = self._apply(self._unravel(theta), x)

        def one(prediction: Any, target: Any) -> Any:
            return scalar_loss(self._loss(_one(prediction), _one(target)))

        return jax.vmap(one)(predictions, y)

    def _masked_loss(self, theta: Any, x: Any, y: Any, mask: Any) -> Any:
        """Mean of the per-sample losses over the real points of the batch."""
        losses = self._sample_losses(theta, x, y)
        total = jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)))
        return total / jnp.sum(mask).astype(losses.dtype)

    def _hvp(self, theta: Any, x: Any, y: Any, mask: Any, vectors: Any) -> Any:
        gradient = jax.grad(self._masked_loss)

        def single(v: Any) -> Any:
            return jax.jvp(lambda t: gradient(t, x, y, mask), (theta,), (v,))[1]

        return jax.vmap(single)(vectors)

    def _ggnvp(self, theta: Any, x: Any, y: Any, mask: Any, vectors: Any) -> Any:
        # J^T H_out J v: J v forward (linearize once, then a linear map per
        # vector), H_out (J v) as a forward-over-reverse product of the masked
        # mean loss in the outputs, J^T back with one shared VJP.
        def outputs(t: Any) -> Any:
            return self._apply(self._unravel(t), x)

        predictions, forward = jax.linearize(outputs, theta)
        _, backward = jax.vjp(outputs, theta)

        def output_loss(prediction: Any) -> Any:
            def one(row: Any, target: Any) -> Any:
                return scalar_loss(self._loss(_one(row), _one(target)))

            losses = jax.vmap(one)(prediction, y)
            total = jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)))
            return total / jnp.sum(mask).astype(losses.dtype)

        output_grad = jax.grad(output_loss)

        def single(v: Any) -> Any:
            tangent = forward(v)
            curved = jax.jvp(output_grad, (predictions,), (tangent,))[1]
            return backward(curved)[0]

        return jax.vmap(single)(vectors)

    def _mixed(self, theta: Any, x: Any, y: Any, mask: Any, vectors: Any) -> Any:
        # The sum of the real points' losses: sample b's term depends on x_b
        # only, so one input gradient gives all B rows (zero on padded rows).
        def total_loss(t: Any, xb: Any) -> Any:
            losses = self._sample_losses(t, xb, y)
            return jnp.sum(jnp.where(mask, losses, jnp.zeros_like(losses)))

        batch_grad = jax.grad(total_loss)

        def directional(xb: Any, v: Any) -> Any:
            return jnp.dot(batch_grad(theta, xb), v)

        return jax.vmap(jax.grad(directional), in_axes=(None, 0))(x, vectors)


_CACHE: dict[tuple[Any, ...], CompiledModel] = {}
_LOCK = threading.Lock()


def _structure(unravel: Callable[[Any], Any], theta: Any) -> tuple[Any, ...]:
    shapes = jax.eval_shape(unravel, jax.ShapeDtypeStruct(theta.shape, theta.dtype))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    return (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))


def compiled_model(
    apply_fn: Callable[[Any, Any], Any],
    loss: Callable[[Any, Any], Any],
    unravel: Callable[[Any], Any],
    theta: Any,
) -> CompiledModel:
    """The shared :class:`CompiledModel` of ``apply_fn`` and ``loss``.

    Wrappers of the same function objects with parameters of the same
    structure share one entry, and with it every compiled shape. The entry is
    dropped when ``apply_fn`` or ``loss`` is garbage collected. Callables that
    cannot be weakly referenced get their own, uncached functions.
    """
    try:
        weak_apply, weak_loss = _WeakCallable(apply_fn), _WeakCallable(loss)
    except TypeError:
        return CompiledModel(apply_fn, loss, unravel)
    key = (weak_apply.key, weak_loss.key, _structure(unravel, theta))
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            entry = CompiledModel(weak_apply, weak_loss, unravel)
            _CACHE[key] = entry
            for referent in weak_apply.referents() + weak_loss.referents():
                weakref.finalize(referent, _CACHE.pop, key, None)
    return entry
