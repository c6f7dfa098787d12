"""Dense and convolution layers of a JAX model, found in its jaxpr.

One mechanism covers plain apply functions, flax linen and nnx, and equinox:
the model is traced once on a batch of one, ``jax.make_jaxpr(apply_fn)``, with
every parameter leaf an input of the jaxpr, and the equations are read as
follows (:func:`find_layers`):

- a *view* of a parameter leaf is the leaf passed through ``transpose``,
  ``reshape``, ``squeeze``, ``convert_element_type`` or ``copy`` (and, for a
  bias only, ``broadcast_in_dim``); views carry the ``theta`` position of each
  of their entries (a numpy integer array of the view's shape), so no layout
  is guessed;
- a **dense layer** is a ``dot_general`` with one operand a view (the weight)
  and the other not, no batch dimensions and one contracting dimension; the
  other operand is the layer input, its free dimensions the weight-sharing
  positions ``T`` (tokens of a sequence);
- a **convolution** is a ``conv_general_dilated`` whose kernel is a view, with
  ``feature_group_count == batch_group_count == 1``; its inputs are the
  patches of ``jax.lax.conv_general_dilated_patches`` (same strides, padding,
  dilations and dimension numbers), its positions the output's spatial
  positions;
- the **bias** is an ``add`` of the layer output (through ``transpose``,
  ``reshape``, ``squeeze``, each its only use) and a view of a leaf of
  ``d_out`` entries that is constant along every axis but the output
  features;
- calls (``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
  ``remat``) are followed into their sub-jaxprs, where flax and equinox put
  their layers.

A leaf used anywhere else (a second layer, a normalisation, ``scan``, a
slice), or only partly, belongs to no layer: its parameters are the *rest*.

:class:`TappedModel` evaluates the jaxpr again with an interpreter that
records each layer's inputs and adds a zero *tap* to each layer's output (the
``dot_general`` or ``conv_general_dilated`` result, before the bias): the
gradient with respect to a tap is the gradient with respect to the layer's
pre-activation output. Calls that contain a layer are inlined (their custom
derivative rules, if any, give way to plain differentiation); every other
equation is bound as traced.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

from influx.layers import Layer

__all__ = ["LayerSpec", "TappedModel", "find_layers"]

#: Primitives whose output is a rearrangement of one operand's entries.
_VIEWS = frozenset(
    {"transpose", "reshape", "squeeze", "convert_element_type", "copy", "copy_p"}
)

#: Call primitives and the parameter that holds their sub-jaxpr.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclass
class LayerSpec:
    """A recognised layer: its equation and how to read its inputs and outputs.

    Attributes
    ----------
    path
        Positions of the layer's equation in the nested jaxprs.
    kind
        ``"linear"`` or ``"conv"``.
    weight_leaf, bias_leaf
        Indices of the parameter leaves (``bias_leaf`` ``None`` without one).
    weight_index, bias_index
        ``[d_out, d_in]`` and ``[d_out]`` positions in ``theta``.
    input_operand
        Which operand of the equation is the layer input (0 or 1).
    contracting
        For a dense layer, the input's contracting axis.
    filter_shape
        For a convolution, the kernel's spatial sizes (in kernel-axis order).
    out_shape, out_dtype
        The shape and dtype of the equation's output (one sample), the tap's.
    """

    path: tuple[int, ...]
    kind: str
    weight_leaf: int
    weight_index: np.ndarray
    input_operand: int
    out_shape: tuple[int, ...]
    out_dtype: Any
    contracting: int = -1
    filter_shape: tuple[int, ...] = ()
    bias_leaf: int | None = None
    bias_index: np.ndarray | None = None
    bias_use: Any = field(default=None, repr=False)
    eqn: Any = field(default=None, repr=False)

    @property
    def d_out(self) -> int:
        return int(self.weight_index.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.weight_index.shape[1])

    def inputs(self, eqn: Any, operands: Sequence[Any]) -> Any:
        """``[T, d_in]``: the layer inputs of one sample (patches for a conv)."""
        a = operands[self.input_operand]
        if self.kind == "linear":
            return jnp.reshape(jnp.moveaxis(a, self.contracting, -1), (-1, self.d_in))
        params = eqn.params
        patches = jax.lax.conv_general_dilated_patches(
            a,
            self.filter_shape,
            params["window_strides"],
            params["padding"],
            lhs_dilation=params["lhs_dilation"],
            rhs_dilation=params["rhs_dilation"],
            dimension_numbers=params["dimension_numbers"],
        )
        return jnp.reshape(
            jnp.transpose(patches, self._out_order(eqn)), (-1, self.d_in)
        )

    def output_grads(self, grads: Any) -> Any:
        """``[..., T, d_out]`` from tap cotangents ``[..., *out_shape]``."""
        lead = grads.shape[: grads.ndim - len(self.out_shape)]
        if self.kind == "linear":
            if self.input_operand == 0:  # outputs: input's free axes, then d_out
                return jnp.reshape(grads, (*lead, -1, self.d_out))
            flat = jnp.reshape(grads, (*lead, self.d_out, -1))
            return jnp.swapaxes(flat, -1, -2)
        order = [len(lead) + axis for axis in self._out_order(self.eqn)]
        moved = jnp.transpose(grads, (*range(len(lead)), *order))
        return jnp.reshape(moved, (*lead, -1, self.d_out))

    @staticmethod
    def _out_order(eqn: Any) -> tuple[int, ...]:
        """Output axes ordered as (batch, spatial..., features)."""
        out_spec = eqn.params["dimension_numbers"].out_spec
        return (out_spec[0], *out_spec[2:], out_spec[1])


# -- finding the layers ------------------------------------------------------


@dataclass
class _View:
    leaf: int
    index: np.ndarray  # theta positions, the view's shape
    broadcast: bool = False


@dataclass
class _Chain:
    spec: LayerSpec
    features: np.ndarray  # output feature of each entry, the value's shape


@dataclass
class _Found:
    specs: list[LayerSpec] = field(default_factory=list)
    uses: dict[int, list[Any]] = field(default_factory=dict)

    def use(self, leaf: int, what: Any) -> None:
        self.uses.setdefault(leaf, []).append(what)


def _view_of(eqn: Any, view: _View) -> _View | None:
    """The view an equation makes of its first operand, or ``None``."""
    name, params = eqn.primitive.name, eqn.params
    index = view.index
    if name in ("convert_element_type", "copy", "copy_p"):
        return view
    if name == "transpose":
        return _View(view.leaf, np.transpose(index, params["permutation"]))
    if name == "reshape":
        if params.get("dimensions") is not None or len(eqn.invars) != 1:
            return None
        return _View(view.leaf, np.reshape(index, params["new_sizes"]), view.broadcast)
    if name == "squeeze":
        return _View(
            view.leaf,
            np.squeeze(index, axis=tuple(params["dimensions"])),
            view.broadcast,
        )
    if name == "broadcast_in_dim" and len(eqn.invars) == 1:
        shape = tuple(params["shape"])
        expanded = [1] * len(shape)
        for axis, target in enumerate(params["broadcast_dimensions"]):
            expanded[int(target)] = index.shape[axis]
        spread = np.broadcast_to(np.reshape(index, expanded), shape)
        return _View(view.leaf, spread, True)
    return None


def _chain_of(eqn: Any, features: np.ndarray) -> np.ndarray | None:
    """The output-feature map through a rearranging equation, or ``None``."""
    name, params = eqn.primitive.name, eqn.params
    if name in ("convert_element_type", "copy", "copy_p"):
        return features
    if name == "transpose":
        return np.transpose(features, params["permutation"])
    if name == "reshape" and params.get("dimensions") is None:
        return np.reshape(features, params["new_sizes"])
    if name == "squeeze":
        return np.squeeze(features, axis=tuple(params["dimensions"]))
    return None


def _sub_jaxpr(eqn: Any) -> tuple[Jaxpr, list[Any]] | None:
    key = _CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    if isinstance(sub, ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    if isinstance(sub, Jaxpr):
        return sub, []
    return None


def _dense(eqn: Any, views: list[_View | None], path: tuple[int, ...]) -> Any:
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if batch_l or batch_r or len(contract_l) != 1:
        return None
    weight_at = 0 if views[0] is not None else 1
    view = views[weight_at]
    if view is None or view.broadcast or views[1 - weight_at] is not None:
        return None
    weight_contract = int((contract_l, contract_r)[weight_at][0])
    free = [axis for axis in range(view.index.ndim) if axis != weight_contract]
    index = np.transpose(view.index, (*free, weight_contract))
    d_out = math.prod(index.shape[:-1])
    out = eqn.outvars[0].aval
    return LayerSpec(
        path=path,
        kind="linear",
        weight_leaf=view.leaf,
        weight_index=np.reshape(index, (d_out, index.shape[-1])),
        input_operand=1 - weight_at,
        contracting=int((contract_l, contract_r)[1 - weight_at][0]),
        out_shape=tuple(out.shape),
        out_dtype=out.dtype,
        eqn=eqn,
    )


def _conv(eqn: Any, views: list[_View | None], path: tuple[int, ...]) -> Any:
    params = eqn.params
    view = views[1]
    if (
        view is None
        or view.broadcast
        or views[0] is not None
        or params["feature_group_count"] != 1
        or params["batch_group_count"] != 1
    ):
        return None
    rhs_spec = params["dimension_numbers"].rhs_spec
    out_axis, in_axis = int(rhs_spec[0]), int(rhs_spec[1])
    spatial = [a for a in range(view.index.ndim) if a not in (out_axis, in_axis)]
    index = np.transpose(view.index, (out_axis, in_axis, *spatial))
    out = eqn.outvars[0].aval
    return LayerSpec(
        path=path,
        kind="conv",
        weight_leaf=view.leaf,
        weight_index=np.reshape(index, (index.shape[0], -1)),
        input_operand=0,
        filter_shape=tuple(int(view.index.shape[a]) for a in spatial),
        out_shape=tuple(out.shape),
        out_dtype=out.dtype,
        eqn=eqn,
    )


def _features(spec: LayerSpec, eqn: Any) -> np.ndarray:
    """The output feature (``0..d_out-1``) of every entry of the layer output."""
    shape = spec.out_shape
    if spec.kind == "linear":
        positions = math.prod(shape) // spec.d_out
        if spec.input_operand == 0:  # input's free axes first, then d_out
            grid = np.broadcast_to(np.arange(spec.d_out), (positions, spec.d_out))
        else:
            grid = np.broadcast_to(
                np.arange(spec.d_out)[:, None], (spec.d_out, positions)
            )
        return np.reshape(grid, shape)
    out_spec = eqn.params["dimension_numbers"].out_spec
    expanded = [1] * len(shape)
    expanded[out_spec[1]] = spec.d_out
    return np.broadcast_to(np.reshape(np.arange(spec.d_out), expanded), shape)


def _bias(chain: _Chain, view: _View, shape: tuple[int, ...]) -> np.ndarray | None:
    """``[d_out]`` bias positions if ``view`` is a bias of the chain's layer."""
    if tuple(chain.features.shape) != shape:
        return None
    try:
        positions = np.broadcast_to(view.index, shape)
    except ValueError:
        return None
    d_out = chain.spec.d_out
    bias = np.full(d_out, -1, dtype=np.int64)
    bias[chain.features.ravel()] = positions.ravel()
    if (bias[chain.features] != positions).any() or (bias < 0).any():
        return None
    return bias


def _analyse(
    jaxpr: Jaxpr,
    views: dict[Any, _View],
    chains: dict[Any, _Chain],
    prefix: tuple[int, ...],
    found: _Found,
) -> tuple[dict[Any, _View], dict[Any, _Chain]]:
    """Walk one jaxpr; returns the views and chains of its outputs."""
    consumers: Counter[Any] = Counter()
    for eqn in jaxpr.eqns:
        consumers.update(v for v in eqn.invars if isinstance(v, Var))
    consumers.update(v for v in jaxpr.outvars if isinstance(v, Var))

    def view(v: Any) -> _View | None:
        return None if isinstance(v, Literal) else views.get(v)

    def chain(v: Any) -> _Chain | None:
        if isinstance(v, Literal) or consumers[v] != 1:
            return None
        return chains.get(v)

    for position, eqn in enumerate(jaxpr.eqns):
        path = (*prefix, position)
        operands = [view(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = _sub_jaxpr(eqn)
        if sub is not None and len(sub[0].invars) == len(eqn.invars):
            inner_views = {
                inner: op
                for inner, op in zip(sub[0].invars, operands, strict=True)
                if op is not None
            }
            inner_chains = {}
            for inner, outer in zip(sub[0].invars, eqn.invars, strict=True):
                link = chain(outer)
                if link is not None:
                    inner_chains[inner] = link
            out_views, out_chains = _analyse(
                sub[0], inner_views, inner_chains, path, found
            )
            for inner, outer in zip(sub[0].outvars, eqn.outvars, strict=True):
                if isinstance(inner, Var) and inner in out_views:
                    views[outer] = out_views[inner]
                if isinstance(inner, Var) and inner in out_chains:
                    chains[outer] = out_chains[inner]
            continue
        if operands and operands[0] is not None and len(eqn.outvars) == 1:
            made = _view_of(eqn, operands[0])
            if made is not None and all(op is None for op in operands[1:]):
                views[eqn.outvars[0]] = made
                continue
        link = chain(eqn.invars[0]) if eqn.invars else None
        if link is not None and name in _VIEWS and len(eqn.outvars) == 1:
            features = _chain_of(eqn, link.features)
            if features is not None:
                chains[eqn.outvars[0]] = _Chain(link.spec, features)
                continue
        spec = None
        if name == "dot_general":
            spec = _dense(eqn, operands, path)
        elif name == "conv_general_dilated":
            spec = _conv(eqn, operands, path)
        if spec is not None:
            found.specs.append(spec)
            found.use(spec.weight_leaf, spec)
            chains[eqn.outvars[0]] = _Chain(spec, _features(spec, eqn))
            continue
        if name == "add" and len(eqn.invars) == 2:
            for side in (0, 1):
                link, other = chain(eqn.invars[side]), operands[1 - side]
                if link is None or other is None or link.spec.bias_use is not None:
                    continue
                shape = tuple(eqn.outvars[0].aval.shape)
                bias = _bias(link, other, shape)
                if bias is not None:
                    link.spec.bias_use = (other.leaf, bias)
                    found.use(other.leaf, link.spec.bias_use)
                    break
            else:
                bias = None
            if bias is not None:
                continue
        for op in operands:  # any other use of a leaf
            if op is not None:
                found.use(op.leaf, eqn)
    for v in jaxpr.outvars:
        op = view(v)
        if op is not None:
            found.use(op.leaf, "output")
    return views, chains


def _whole(index: np.ndarray, size: int) -> bool:
    return index.size == size and np.unique(index).size == size


def find_layers(
    apply_fn: Callable[[Any, Any], Any], params: Any, example: Any
) -> tuple[ClosedJaxpr, list[LayerSpec]]:
    """Trace ``apply_fn(params, example)`` and find its dense and conv layers.

    Parameters
    ----------
    apply_fn
        ``apply_fn(params, x)``.
    params
        The parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    example
        One batch of one point (arrays or ``jax.ShapeDtypeStruct``).

    Returns
    -------
    tuple
        The closed jaxpr of ``f(leaves, x)`` (``leaves`` the parameter leaves
        in ``ravel_pytree`` order) and the recognised layers in forward order.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def flat(leaf_values: list[Any], x: Any) -> Any:
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_values), x)

    closed = jax.make_jaxpr(flat)(leaves, example)
    sizes = [math.prod(np.shape(leaf)) for leaf in leaves]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    views = {
        var: _View(k, offsets[k] + np.arange(sizes[k]).reshape(np.shape(leaf)))
        for k, (var, leaf) in enumerate(
            zip(closed.jaxpr.invars[: len(leaves)], leaves, strict=True)
        )
    }
    found = _Found()
    _analyse(closed.jaxpr, views, {}, (), found)
    specs = []
    for spec in found.specs:
        if found.uses.get(spec.weight_leaf) != [spec] or not _whole(
            spec.weight_index, sizes[spec.weight_leaf]
        ):
            continue
        if spec.bias_use is not None:
            leaf, bias = spec.bias_use
            if found.uses.get(leaf) == [spec.bias_use] and _whole(bias, sizes[leaf]):
                spec.bias_leaf, spec.bias_index = leaf, bias
        specs.append(spec)
    return closed, specs


def layer_names(params: Any, specs: Sequence[LayerSpec]) -> list[str]:
    """A name per layer: the pytree path of its weight's parent, else the weight's.

    The parent (``['Dense_0']`` of ``['Dense_0']['kernel']``; nnx's trailing
    ``.value`` dropped) is used when the bias, if any, shares it and no other
    layer has the same name.
    """
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]

    def parent(path: tuple[Any, ...]) -> tuple[Any, ...]:
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
            if path[-1].name == "value":
                path = path[:-1]
        return path[:-1]

    names = []
    for spec in specs:
        weight = paths[spec.weight_leaf]
        short = parent(weight)
        if not short or (
            spec.bias_leaf is not None and parent(paths[spec.bias_leaf]) != short
        ):
            short = weight
        names.append(jax.tree_util.keystr(short))
    counts = Counter(names)
    return [
        name if counts[name] == 1 else jax.tree_util.keystr(paths[spec.weight_leaf])
        for name, spec in zip(names, specs, strict=True)
    ]


def to_layers(params: Any, specs: Sequence[LayerSpec]) -> list[Layer]:
    """The :class:`~influx.layers.Layer` of each spec."""
    names = layer_names(params, specs)
    return [
        Layer(name, spec.kind, spec.weight_index, spec.bias_index)
        for name, spec in zip(names, specs, strict=True)
    ]


# -- evaluating with taps ------------------------------------------------------


class TappedModel:
    """A traced model evaluated with a zero tap on every layer's output.

    Parameters
    ----------
    closed
        The closed jaxpr of :func:`find_layers`.
    specs
        Its layers.
    """

    def __init__(self, closed: ClosedJaxpr, specs: Sequence[LayerSpec]) -> None:
        self.closed = closed
        self.specs = list(specs)
        self._layer_at = {spec.path: k for k, spec in enumerate(self.specs)}
        self._inline = {
            spec.path[:depth]
            for spec in self.specs
            for depth in range(1, len(spec.path))
        }

    def zero_taps(self) -> list[Any]:
        """One zero array per layer, the shape of its output (one sample)."""
        return [jnp.zeros(spec.out_shape, spec.out_dtype) for spec in self.specs]

    def __call__(
        self, leaves: Sequence[Any], x: Any, taps: Sequence[Any]
    ) -> tuple[Any, list[Any]]:
        """``(outputs, inputs)`` of one sample, ``taps`` added to the layers.

        ``outputs`` are the jaxpr's outputs (a list), ``inputs`` each layer's
        inputs ``[T, d_in]``.
        """
        args = [*leaves, *jax.tree_util.tree_leaves(x)]
        recorded: list[Any] = [None] * len(self.specs)
        outs = self._run(
            self.closed.jaxpr, list(self.closed.consts), args, (), taps, recorded
        )
        return outs, recorded

    def _run(
        self,
        jaxpr: Jaxpr,
        consts: list[Any],
        args: list[Any],
        prefix: tuple[int, ...],
        taps: Sequence[Any],
        recorded: list[Any],
    ) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for position, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, position)
            operands = [read(v) for v in eqn.invars]
            if path in self._inline:
                sub, sub_consts = _sub_jaxpr(eqn)  # type: ignore[misc]
                outs = self._run(sub, sub_consts, operands, path, taps, recorded)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                if isinstance(params, tuple):  # older jax: (subfuns, params)
                    subfuns, params = params
                    outs = eqn.primitive.bind(*subfuns, *operands, **params)
                else:
                    outs = eqn.primitive.bind(*operands, **params)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
                layer = self._layer_at.get(path)
                if layer is not None:
                    spec = self.specs[layer]
                    recorded[layer] = spec.inputs(eqn, operands)
                    outs = [outs[0] + taps[layer]]
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]
