"""The machinery every influence computation shares, in one place.

:class:`influx.Influence` and the seed's functions (``influx.influence``) both
run through these: argument checks, per-sample gradients streamed batch by
batch (each batch checked to be finite, the loss convention checked once per
data argument), the scoring loop that turns influence factors and a data
argument into blocks ``[N_test, B]`` (or ``[N_test, B, *S]``) for a sink, and
the host mode of JAX on the CPU (``influx._host``): the solver's steps and the
dot products run in numpy, only the model's derivatives in JAX.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from influx._checks import ensure_finite, evaluate
from influx._host import host_view
from influx._loss_check import LossConventionCheck, check_points
from influx._output import BlockSink, check_out, check_out_up_front, count_points
from influx._progress import progress_iter
from influx.backends import check_model_backend
from influx.data import DataReader
from influx.errors import InputError
from influx.layers import LayerBatch, LayerLayout, has_layers, parameter_groups
from influx.methods import InfluenceType
from influx.protocols import TwiceDifferentiable
from influx.solvers._base import working_dtype

__all__ = [
    "BY_LAYER_UP_ONLY",
    "LayerScorer",
    "check_factors",
    "check_model",
    "check_out_by_layer",
    "check_regularization",
    "concat",
    "gradients",
    "layer_arrays",
    "on_host",
    "read_gradients",
    "resolve_regularization",
    "score",
    "up_blocks",
]


#: The error of ``by_layer=True`` with the perturbation influence.
BY_LAYER_UP_ONLY = (
    "by_layer=True splits the up-weighting influence <s_test, grad l(z)> over the "
    "parameter groups; the perturbation influence is a gradient in the inputs, "
    "which does not split that way. Use influence_type='up' with by_layer=True, "
    "or by_layer=False for the perturbation influence."
)


def check_out_by_layer(
    out: Any,
    model: Any,
    input_data: Any,
    *,
    rows: int | None = None,
    test_data: Any = None,
) -> None:
    """Check ``out`` against ``[N_test, M, L]`` before any expensive work.

    ``L`` is the number of :func:`influx.layers.parameter_groups` of ``model``;
    ``N_test`` is ``rows`` or counted from ``test_data``, ``M`` from
    ``input_data`` (where they can be counted cheaply).
    """
    if out is None:
        return
    check_out(out)
    try:
        names: list[str] | None = [name for name, _ in parameter_groups(model)]
    except InputError:  # layers found by tracing a batch (JAX), none seen yet
        names = None
    got = tuple(int(n) for n in out.shape)
    if rows is None:
        counted = count_points(test_data)
        rows = None if counted is None else counted[0]
    inputs = count_points(input_data)
    points = None if inputs is None else inputs[0]
    expected = (rows, points, None if names is None else len(names))
    if len(got) == 3 and all(
        e is None or g == e for g, e in zip(got, expected, strict=True)
    ):
        return
    shown = tuple("?" if e is None else e for e in expected)
    listed = "" if names is None else ": " + ", ".join(map(repr, names[:6]))
    listed += ", ..." if names is not None and len(names) > 6 else ""
    raise InputError(
        f"out has shape {got} but the result of by_layer=True is [N_test, M, L] = "
        f"{shown} (N_test test points or influence factors, M input points, L "
        f"parameter groups{listed}). Allocate out with that shape."
    )


def check_model(model: Any) -> None:
    """Raise a TypeError unless ``model`` is a wrapped model of a known backend."""
    if not isinstance(model, TwiceDifferentiable):
        raise TypeError(
            f"model must be a twice-differentiable wrapper, got "
            f"{type(model).__module__}.{type(model).__name__}. Wrap it first: "
            "influx.twice_differentiable(model, loss) (or params=... for JAX)."
        )
    check_model_backend(model)


def resolve_regularization(regularization: Any, perturbation: Any) -> float:
    """The ``lambda`` of ``hessian_regularization`` or ``hessian_perturbation``.

    The two names mean the same; each is checked, both given must agree, and
    neither given is 0.
    """
    given = {
        name: value
        for name, value in (
            ("hessian_regularization", regularization),
            ("hessian_perturbation", perturbation),
        )
        if value is not None
    }
    for name, value in given.items():
        check_regularization(value, name)
    values = {float(value) for value in given.values()}
    if len(values) > 1:
        raise TypeError(
            f"hessian_regularization={regularization!r} and hessian_perturbation="
            f"{perturbation!r} are two names of the same lambda added to the "
            "Hessian's diagonal, given different values: pass only one."
        )
    return values.pop() if values else 0.0


def check_regularization(value: Any, name: str) -> None:
    """Raise unless ``value`` is a finite number ``>= 0``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise InputError(
            f"{name} must be a finite number >= 0, got {value!r}. Use 0 for no "
            "regularisation, or a small positive value (1e-3 to 1e-1) to make the "
            "Hessian positive definite."
        )


def check_factors(model: TwiceDifferentiable, factors: Any) -> Any:
    """``factors`` as a native ``[N, P]`` array of the model's dtype."""
    backend = model.backend
    if not backend.is_native_array(factors):
        factors = backend.asarray(factors, like=model.parameters)
    shape = tuple(factors.shape)
    if len(shape) != 2 or shape[1] != model.num_params:
        raise InputError(
            f"influence_factors must have shape [N, P] with P={model.num_params} "
            f"(the model's parameter count), got {shape}. Compute them with "
            "compute_influence_factors for this model."
        )
    xp = array_namespace(factors)
    return xp.astype(factors, model.dtype)


def gradients(
    model: TwiceDifferentiable, reader: DataReader, progress: bool, desc: str
) -> Iterator[Any]:
    """Per-sample gradients ``[B, P]``, batch by batch, checked to be finite.

    The loss convention is checked on the first batch of two points or more.
    """
    check = LossConventionCheck(model, reader.name)
    for index, x, y in progress_iter(reader, progress, desc, total=reader.num_batches):
        grads, losses = evaluate(reader.name, index, x, model.per_sample_grads, x, y)
        check(index, x, y, (grads, losses))
        ensure_finite(losses, f"{reader.name} batch {index}: the loss")
        ensure_finite(grads, f"{reader.name} batch {index}: the loss gradient")
        yield grads


def read_gradients(
    model: TwiceDifferentiable,
    data: Any,
    name: str,
    progress: bool,
    desc: str,
    *,
    host: bool = False,
) -> Any:
    """All per-sample gradients of ``data`` in its order, ``[N, P]``.

    ``host``: as numpy arrays (JAX on the CPU, for a solver in host mode).
    """
    reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
    batches = gradients(model, reader, progress, desc)
    return concat([on_host(g) for g in batches] if host else list(batches))


def concat(arrays: list[Any]) -> Any:
    """Join arrays of one namespace along axis 0."""
    return array_namespace(arrays[0]).concat(arrays, axis=0)


def on_host(array: Any) -> Any:
    """A host numpy view of a CPU JAX array (see ``influx._host``), else ``array``."""
    view = host_view(array)
    return array if view is None else view


def up_blocks(
    model: TwiceDifferentiable,
    reader: DataReader,
    factors: Any,
    progress: bool,
    desc: str,
    *,
    by_layer: bool = False,
) -> Iterator[Any]:
    """Up-weighting influences ``factors @ grads.T``, a ``[N_test, B]`` block a batch.

    With ``by_layer``, blocks ``[N_test, B, L]``: one column per group of
    :func:`influx.layers.parameter_groups` (``factors[:, idx] @
    grads[:, idx].T``), summing over the last axis to the total.

    A model with the layer structure (:func:`influx.layers.has_layers`) is
    scored from its layers' inputs and output gradients, without per-sample
    gradients ``[B, P]`` (:class:`LayerScorer`); any other model from its
    per-sample gradients. On the host (numpy factors, or JAX on the CPU) the
    products run in numpy; for half-precision models the dot products over
    ``P`` run in float32 and the blocks come back in the model's dtype
    (float32 on the host). Every caller (:func:`score`, top-k) gets the same
    numbers from this one loop.
    """
    xp = array_namespace(factors)
    wide = working_dtype(factors)
    host_factors = host_view(factors)
    if host_factors is not None and host_factors.itemsize < 4:
        host_factors = host_factors.astype(np.float32)  # numpy: no compiles
    if host_factors is not None:
        compute, out_dtype = host_factors, host_factors.dtype
    else:
        compute = factors if wide == factors.dtype else xp.astype(factors, wide)
        out_dtype = factors.dtype
    if offers_layers(model):
        scorer = LayerScorer(model, compute, by_layer=by_layer)
        blocks = scorer.blocks(reader, progress, desc, host=host_factors is not None)
    else:
        groups = parameter_groups(model) if by_layer else None
        blocks = _flat_blocks(model, reader, compute, groups, progress, desc)
    for block in blocks:
        if host_factors is None and block.dtype != out_dtype:
            block = array_namespace(block).astype(block, out_dtype)
        yield block


def _flat_blocks(
    model: TwiceDifferentiable,
    reader: DataReader,
    factors: Any,
    groups: list[tuple[str, np.ndarray]] | None,
    progress: bool,
    desc: str,
) -> Iterator[Any]:
    """Blocks from per-sample gradients ``[B, P]`` (``factors`` host or native)."""
    xp = array_namespace(factors)
    host = isinstance(factors, np.ndarray)
    pieces = None
    if groups is not None:
        pieces = [
            (xp.take(factors, _like_index(xp, index, factors), axis=1), index)
            for _, index in groups
        ]
    for native in gradients(model, reader, progress, desc):
        grads = on_host(native).astype(factors.dtype, copy=False) if host else native
        grads = (
            grads if grads.dtype == factors.dtype else xp.astype(grads, factors.dtype)
        )
        if pieces is None:
            yield factors @ grads.T
            continue
        columns = [
            part @ xp.take(grads, _like_index(xp, index, grads), axis=1).T
            for part, index in pieces
        ]
        yield xp.stack(columns, axis=-1)


class LayerScorer:
    """Up-weighting scores from layer inputs and output gradients.

    The score of point ``n`` for factor ``k`` in a layer computing ``s[t] = W
    a[t] + b`` is ``<S_k, G_n> = sum_t g[n, t]^T (S_k^W a[n, t] + S_k^b)``
    (``S_k`` the factor's ``[d_out, d_in + 1]`` block, ``g`` the output
    gradients, ``T`` the weight-sharing positions); the parameters in no
    layer add ``rest_grads @ S_rest^T``. The factors are split once, by
    :class:`influx.layers.LayerLayout`; per layer and batch the cheaper of two
    contractions runs:

    - ``K T <= K + T`` and ``K T <= d_in`` (dense layers, ``T = 1``, with
      fewer test points than inputs): the products ``S_k a[n, t]``, ``[B, T,
      K, d_out]``, contracted with ``g``; ``O(K B T d_out d_in)`` time and
      ``K B T d_out`` memory;
    - otherwise (convolutions, many test points): the per-sample layer
      gradients ``G_n`` ``[B, d_out, d_in]``, then ``G @ S^T``;
      ``O((T + K) B d_out d_in)`` time, ``B d_out d_in`` memory.

    Per-sample gradients ``[B, P]`` are never formed. Each batch is checked
    like :func:`gradients`: its losses and gradients finite, the loss
    convention once per data argument (on at most ``2**24 // P`` points of
    the first batch of two or more).

    The layers are read after the first batch's :meth:`layer_batch` (an
    adapter may find them by tracing a batch, as JAX's does).

    Parameters
    ----------
    model
        A wrapped model with the layer structure.
    factors
        ``[K, P]``, host (numpy) or native, in the dtype of the products.
    by_layer
        Blocks ``[K, B, L]``, one column per group of
        :func:`influx.layers.parameter_groups`, instead of ``[K, B]``.
    """

    def __init__(self, model: Any, factors: Any, *, by_layer: bool = False) -> None:
        self.model, self.factors, self.by_layer = model, factors, by_layer
        xp = array_namespace(factors)
        self.xp, self.dtype = xp, factors.dtype
        self.count = int(factors.shape[0])
        self.prepared = False

    def _prepare(self) -> None:
        """Split the factors by the model's layers (once, on the first batch)."""
        xp, factors = self.xp, self.factors
        self.layout = LayerLayout(self.model.layers, int(self.model.num_params))
        groups = parameter_groups(self.model) if self.by_layer else None
        blocks, rest = self.layout.split(factors)
        self.weights: list[Any] = []  # [K * d_out, d_in] per layer
        self.biases: list[Any] = []  # [K * d_out] or None per layer
        for layer, block in zip(self.layout.layers, blocks, strict=True):
            weight = xp.reshape(block[:, :, : layer.d_in], (-1, layer.d_in))
            self.weights.append(weight)
            bias = block[:, :, layer.d_in] if layer.has_bias else None
            self.biases.append(None if bias is None else xp.reshape(bias, (-1,)))
        del blocks
        # The rest: one piece per group (by_layer), else all of it at once.
        rest_positions = [np.arange(self.layout.rest.size, dtype=np.int64)]
        if groups is not None:
            rest_positions = [
                np.searchsorted(self.layout.rest, index)
                for _, index in groups[len(self.layout.layers) :]
            ]
        self.rest = [
            (xp.take(rest, _like_index(xp, pos, rest), axis=1), pos)
            for pos in rest_positions
            if pos.size
        ]
        self.factors, self.prepared = None, True

    def blocks(
        self, reader: DataReader, progress: bool, desc: str, *, host: bool
    ) -> Iterator[Any]:
        """One ``[K, B]`` (or ``[K, B, L]``) block per batch of ``reader``."""
        for arrays in layer_arrays(
            self.model, reader, progress, desc, host=host, xp=self.xp, dtype=self.dtype
        ):
            if not self.prepared:
                self._prepare()
            yield self.score(*arrays)

    def score(
        self, inputs: list[Any], output_grads: list[Any], rest_grads: Any, losses: Any
    ) -> Any:
        """The block of one batch, from its arrays in the factors' namespace."""
        xp = self.xp
        columns = [
            self._layer(weight, bias, a, g)
            for weight, bias, a, g in zip(
                self.weights, self.biases, inputs, output_grads, strict=True
            )
        ]
        count = int(losses.shape[0])
        rest = xp.reshape(rest_grads, (count, -1))
        for part, pos in self.rest:
            grads = rest if len(self.rest) == 1 and not self.by_layer else None
            if grads is None:
                grads = xp.take(rest, _like_index(xp, pos, rest), axis=1)
            columns.append(part @ grads.T)
        if self.by_layer:
            return xp.stack(columns, axis=-1)
        if not columns:
            return xp.zeros((self.count, count), dtype=self.dtype)
        total = columns[0]
        for column in columns[1:]:
            total = total + column
        return total

    def _layer(self, weight: Any, bias: Any, a: Any, g: Any) -> Any:
        """``[K, B]``: one layer's scores.

        ``a`` ``[B, T, d_in]`` inputs, ``g`` ``[B, 1, T, d_out]`` output
        gradients, ``weight`` ``[K * d_out, d_in]``, ``bias`` ``[K * d_out]``.
        """
        xp = self.xp
        count, positions, d_in = (int(n) for n in a.shape)
        d_out = int(g.shape[-1])
        k = self.count
        if contract_outputs(k, positions, d_in):
            # S_k a[n, t] for every k: [B * T, K * d_out], contracted with g.
            outputs = xp.reshape(a, (count * positions, d_in)) @ weight.T
            if bias is not None:
                outputs = outputs + bias
            outputs = xp.reshape(outputs, (count, positions, k, d_out))
            outputs = xp.permute_dims(outputs, (0, 2, 1, 3))
            outputs = xp.reshape(outputs, (count, k, positions * d_out))
            grads = xp.reshape(g, (count, positions * d_out, 1))
            return xp.reshape(outputs @ grads, (count, k)).T
        # Per-sample layer gradients G_n = sum_t g[n, t] a[n, t]^T.
        g = xp.reshape(g, (count, positions, d_out))
        layer_grads = xp.permute_dims(g, (0, 2, 1)) @ a  # [B, d_out, d_in]
        flat = xp.reshape(layer_grads, (count, d_out * d_in))
        scores = xp.reshape(weight, (k, d_out * d_in)) @ flat.T
        if bias is not None:
            scores = scores + xp.reshape(bias, (k, d_out)) @ xp.sum(g, axis=1).T
        return scores


def contract_outputs(count: int, positions: int, d_in: int) -> bool:
    """Whether :class:`LayerScorer` contracts ``S_k a[n, t]`` with ``g`` for a layer.

    ``K T <= K + T`` (fewer operations than the per-sample layer gradients)
    and ``K T <= d_in`` (no more memory): ``K`` factors, ``T`` positions,
    ``d_in`` inputs per position.
    """
    work = count * positions
    return work <= count + positions and work <= d_in


def offers_layers(model: Any) -> bool:
    """Whether ``model`` has the layer structure (:func:`influx.layers.has_layers`).

    An adapter whose ``layers`` needs a batch first (JAX traces one) raises
    an :class:`~influx.InputError` from it: it offers the structure, read after
    a :meth:`layer_batch`.
    """
    try:
        return has_layers(model)
    except InputError:
        return callable(getattr(model, "layer_batch", None))


def layer_arrays(
    model: Any,
    reader: DataReader,
    progress: bool,
    desc: str,
    *,
    host: bool,
    xp: Any,
    dtype: Any,
) -> Iterator[tuple[list[Any], list[Any], Any, Any]]:
    """Each batch's layer arrays for the observed labels, checked as :func:`gradients`.

    Per batch ``(inputs, output_grads, rest_grads, losses)`` of
    ``model.layer_batch(x, y)`` (``fisher="empirical"``), in ``xp`` and
    ``dtype`` (numpy on the host with ``host``); finite, and the loss
    convention checked once on at most ``2**24 // P`` points.
    """
    name = reader.name
    check = LossConventionCheck(model, name)
    batches = progress_iter(reader, progress, desc, total=reader.num_batches)
    for index, x, y in batches:
        batch = evaluate(name, index, x, model.layer_batch, x, y)
        check(index, *check_points(x, y, int(model.num_params)))
        arrays = _batch_arrays(batch, host, xp, dtype)
        _check_batch(arrays, f"{name} batch {index}")
        yield arrays


def _batch_arrays(
    batch: LayerBatch, host: bool, xp: Any, dtype: Any
) -> tuple[list[Any], list[Any], Any, Any]:
    """A :class:`LayerBatch`'s arrays in the factors' namespace and dtype."""
    probes = int(batch.rest_grads.shape[1]) if batch.rest_grads.ndim == 3 else -1
    if probes != 1:
        raise InputError(
            "layer_batch(..., fisher='empirical') must return one probe per point "
            f"(rest_grads [B, 1, P_rest]), got rest_grads of shape "
            f"{tuple(batch.rest_grads.shape)}: the adapter's layer structure is wrong."
        )

    def convert(array: Any) -> Any:
        if host:
            return on_host(array).astype(dtype, copy=False)
        return array if array.dtype == dtype else xp.astype(array, dtype)

    return (
        [convert(a) for a in batch.inputs],
        [convert(g) for g in batch.output_grads],
        convert(batch.rest_grads),
        batch.losses,
    )


def _check_batch(arrays: tuple[list[Any], list[Any], Any, Any], where: str) -> None:
    """:func:`gradients`' finiteness checks, on a batch's layer arrays."""
    inputs, output_grads, rest_grads, losses = arrays
    ensure_finite(losses, f"{where}: the loss")
    for array in (*inputs, *output_grads, rest_grads):
        ensure_finite(array, f"{where}: the loss gradient")


def _like_index(xp: Any, index: np.ndarray, like: Any) -> Any:
    """``index`` as an integer array of ``like``'s namespace and device."""
    if isinstance(like, np.ndarray):
        return index
    return xp.asarray(index, device=array_device(like))


def score(
    kind: InfluenceType,
    model: TwiceDifferentiable,
    data: Any,
    influence_factors: Any,
    progress: bool,
    name: str,
    out: Any = None,
    *,
    by_layer: bool = False,
) -> Any:
    """Influences of ``kind`` of every point of ``data``, named ``name`` in errors.

    Blocks of ``[N_factors, B]`` (up), ``[N_factors, B, L]`` (up, ``by_layer``)
    or ``[N_factors, B, *S]`` (perturbation) are computed batch by batch and
    joined along the input axis, or written into ``out`` as they come.
    ``out`` is checked against the full shape before the first gradient.

    Returns
    -------
    Any
        Native array ``[N_factors, M]``, ``[N_factors, M, L]`` or
        ``[N_factors, M, *S]``; ``out`` when given.
    """
    check_model(model)
    factors = check_factors(model, influence_factors)
    reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
    rows = int(factors.shape[0])
    up = kind is InfluenceType.Up
    if by_layer:
        if not up:
            raise InputError(BY_LAYER_UP_ONLY)
        check_out_by_layer(out, model, reader.source, rows=rows)
    else:
        check_out_up_front(out, up, reader.source, rows=rows)
    sink = BlockSink(model, rows, out)
    if up:
        desc = "Up-weighting influences"
        for block in up_blocks(
            model, reader, factors, progress, desc, by_layer=by_layer
        ):
            sink.add(block)
    else:
        batches = progress_iter(
            reader, progress, "Perturbation influences", total=reader.num_batches
        )
        check = LossConventionCheck(model, name)
        for index, x, y in batches:
            check(index, x, y)
            block = evaluate(name, index, x, model.mixed_grads, x, y, factors)
            ensure_finite(block, f"{name} batch {index}: the perturbation influence")
            sink.add(block)
    result = sink.result()
    if out is None and isinstance(result, np.ndarray):
        result = model.backend.asarray(result, like=model.parameters)
    return result
