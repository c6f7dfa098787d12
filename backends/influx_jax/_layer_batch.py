"""Layer inputs and output gradients of a JAX model, compiled per batch bucket.

:class:`LayerStructure` holds a model traced on a batch of one
(:func:`influx_jax._layers.find_layers`) and one ``jax.jit``-compiled
function that, for a padded batch, evaluates every point on its own (a
``jax.vmap`` of the tapped model on a batch of one: ``T`` is the product of
the layer input's free axes), pulls the probes' cotangents on the outputs back
to the taps and to the *rest* parameter leaves, and returns the
:class:`~influx.layers.LayerBatch` arrays. Nothing ``[B, P]`` is formed: the
layers' weights are constants of the pull-back, only the rest leaves are
differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import influx.layers as layer_api
from influx._checks import scalar_loss
from influx.errors import InputError
from influx.layers import FISHER_TYPES, Layer, LayerBatch, Noise
from influx_jax._compiled import pad_batch, take_leading
from influx_jax._layers import TappedModel, find_layers, to_layers

__all__ = ["LayerStructure", "example_of"]


def example_of(x: Any) -> Any:
    """The first point of ``x`` as a batch of one (each leaf ``leaf[:1]``)."""
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf[:1]), x)


def structure_key(example: Any) -> tuple[Any, ...]:
    """Tree structure, shapes and dtypes of a batch of one."""
    leaves, treedef = jax.tree_util.tree_flatten(example)
    return (treedef, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves))


class LayerStructure:
    """The layers of ``apply_fn`` on inputs shaped like ``example``.

    Parameters
    ----------
    apply_fn, params, loss
        The wrapped model's apply function, differentiated pytree and
        batch-mean loss.
    example
        A batch of one point.
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        params: Any,
        loss: Callable[[Any, Any], Any],
        example: Any,
    ) -> None:
        closed, specs = find_layers(apply_fn, params, example)
        self.specs = specs
        self.layers: list[Layer] = to_layers(params, specs)
        self.tapped = TappedModel(closed, specs)
        self._loss = loss
        leaves = jax.tree_util.tree_leaves(params)
        in_layers = {spec.weight_leaf for spec in specs} | {
            spec.bias_leaf for spec in specs if spec.bias_leaf is not None
        }
        self.rest_leaves = [k for k in range(len(leaves)) if k not in in_layers]
        self.fixed_leaves = sorted(in_layers)
        out_shape = jax.eval_shape(apply_fn, params, example)
        self._out_tree = jax.tree_util.tree_structure(out_shape)
        self.num_outputs = sum(
            int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(out_shape)
        )
        self._batch = jax.jit(self._batch_fn, static_argnames=("fisher",))

    def same_layers(self, other: LayerStructure) -> bool:
        """Whether ``other`` found the same layers (another input shape)."""
        return len(self.layers) == len(other.layers) and all(
            a.kind == b.kind
            and np.array_equal(a.index(), b.index())
            and a.has_bias == b.has_bias
            for a, b in zip(self.layers, other.layers, strict=True)
        )

    def split(self, leaves: list[Any]) -> tuple[list[Any], list[Any]]:
        """``(rest, fixed)`` leaves."""
        return [leaves[k] for k in self.rest_leaves], [
            leaves[k] for k in self.fixed_leaves
        ]

    def layer_batch(
        self,
        leaves: list[Any],
        x: Any,
        y: Any,
        fisher: str,
        noise: Noise | None,
        dtype: Any,
    ) -> LayerBatch:
        """The :class:`~influx.layers.LayerBatch` of one batch (see the wrapper)."""
        if fisher not in FISHER_TYPES:
            raise InputError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
        limit = layer_api.MAX_OUTPUT_HESSIAN
        if fisher != "empirical" and self.num_outputs > limit:
            raise InputError(
                f"fisher={fisher!r} forms the [C, C] output Hessian of each point, "
                f"but the model has C={self.num_outputs} outputs per point (more "
                f"than {limit}): use fisher='empirical'."
            )
        count, x, y, _ = pad_batch(x, y)
        eps = None
        if fisher == "mc":
            eps = self._noise(
                noise, count, int(np.shape(jax.tree_util.tree_leaves(x)[0])[0]), dtype
            )
        rest, fixed = self.split(leaves)
        inputs, grads, rest_grads, losses = self._batch(
            rest, fixed, x, y, eps, fisher=fisher
        )
        return LayerBatch(
            inputs=tuple(take_leading(a, count) for a in inputs),
            output_grads=tuple(take_leading(g, count) for g in grads),
            rest_grads=take_leading(rest_grads, count),
            losses=take_leading(losses, count),
        )

    def _noise(self, noise: Noise | None, count: int, size: int, dtype: Any) -> Any:
        if noise is None or not callable(noise):
            raise InputError(
                "fisher='mc' needs noise=, a function noise(B, C) -> [B, S, C] of "
                "standard normal draws (the core supplies it)."
            )
        draws = np.asarray(noise(count, self.num_outputs))
        if (
            draws.ndim != 3
            or draws.shape[0] != count
            or draws.shape[2] != (self.num_outputs)
        ):
            raise InputError(
                f"noise(B, C) must return an array [B, S, C] = [{count}, S, "
                f"{self.num_outputs}], got shape {draws.shape}."
            )
        if size != count:
            extra = np.zeros((size - count, *draws.shape[1:]), draws.dtype)
            draws = np.concatenate([draws, extra], axis=0)
        return jnp.asarray(draws, dtype=dtype)

    # -- the compiled function ----------------------------------------------

    def _batch_fn(
        self, rest: list[Any], fixed: list[Any], x: Any, y: Any, eps: Any, fisher: str
    ) -> tuple[list[Any], list[Any], Any, Any]:
        sample = partial(self._sample, rest, fixed, fisher=fisher)
        if eps is None:
            return jax.vmap(lambda xn, yn: sample(xn, yn, None))(x, y)
        return jax.vmap(sample)(x, y, eps)

    def _sample(
        self,
        rest: list[Any],
        fixed: list[Any],
        xn: Any,
        yn: Any,
        eps: Any,
        *,
        fisher: str,
    ) -> tuple[list[Any], list[Any], Any, Any]:
        x1 = jax.tree_util.tree_map(lambda leaf: leaf[None], xn)
        y1 = jax.tree_util.tree_map(lambda leaf: leaf[None], yn)
        order = self.rest_leaves + self.fixed_leaves

        def forward(rest_values: list[Any], taps: list[Any]) -> Any:
            values = [*rest_values, *fixed]
            leaves = [values[order.index(k)] for k in range(len(order))]
            return self.tapped(leaves, x1, taps)

        outs, pullback, inputs = jax.vjp(
            forward, rest, self.tapped.zero_taps(), has_aux=True
        )
        flat, unflatten = ravel_pytree(outs)

        def loss_of(values: Any) -> Any:
            prediction = jax.tree_util.tree_unflatten(self._out_tree, unflatten(values))
            return scalar_loss(self._loss(prediction, y1))

        loss = loss_of(flat)
        if fisher == "empirical":
            probes = jax.grad(loss_of)(flat)[None]
        else:
            hessian = jax.hessian(loss_of)(flat)
            values, vectors = jnp.linalg.eigh(hessian)
            root = (vectors * jnp.sqrt(jnp.maximum(values, 0))) @ vectors.T
            probes = root.T if fisher == "ggn" else eps @ root.T  # [S, C]
        rest_cot, tap_cot = jax.vmap(lambda u: pullback(unflatten(u)))(probes)
        count = probes.shape[0]
        rest_grads = [jnp.reshape(r, (count, -1)) for r in rest_cot]
        rest_flat = (
            jnp.concatenate(rest_grads, axis=1)
            if rest_grads
            else jnp.zeros((count, 0), flat.dtype)
        )
        grads = [
            spec.output_grads(g) for spec, g in zip(self.specs, tap_cot, strict=True)
        ]
        return inputs, grads, rest_flat, loss
