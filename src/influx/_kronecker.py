"""Kronecker-factored curvature statistics from a model's layer structure.

The passes over the training data that K-FAC and EK-FAC
(:mod:`influx.solvers.kfac`) need, written once on the arrays of a
:class:`~influx.layers.LayerBatch` with the array API (numpy, torch, JAX).
For layer ``l`` with augmented inputs ``a[n, t]`` (``[d_a]``, a constant 1
appended for a bias) and output gradients ``g[n, s, t]`` (``[d_out]``, probe
``s``), over ``N`` training points:

- ``A = (1/N) sum_n (1/T) sum_t a[n, t] a[n, t]^T`` (``[d_a, d_a]``);
- ``G = (1/N) sum_n sum_s sum_t g[n, s, t] g[n, s, t]^T`` (``[d_out, d_out]``);
- the rest diagonal ``d = (1/N) sum_n sum_s rest_grads[n, s]^2`` (``[P_rest]``);
- EK-FAC's eigenvalues in the Kronecker eigenbasis ``Q_G``, ``Q_A``:
  ``Lambda = (1/N) sum_n sum_s (Q_G^T G[n, s] Q_A)^2`` (elementwise square,
  ``[d_out, d_a]``) with ``G[n, s] = sum_t g[n, s, t] a[n, t]^T``.

Batches are weighted by their size: every statistic is a sum over points,
divided by ``N`` at the end. For ``T > 1`` (a convolution's positions, a
sequence's tokens) ``A`` and ``G`` are the KFC approximation of Grosse and
Martens (2016): the derivatives at different positions are taken as
uncorrelated and their statistics as the same at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from influx.errors import InputError
from influx.layers import Layer, LayerBatch, augmented_inputs

__all__ = ["CHUNK_ELEMENTS", "check_batch", "correction_sums", "factor_sums"]

#: Most entries of the rotated per-sample layer gradients ``[b, S, d_out, d_a]``
#: that EK-FAC's second pass forms at once for ``T > 1`` (32 MiB of float64),
#: unless a single point needs more.
CHUNK_ELEMENTS = 1 << 22


def check_batch(
    batch: LayerBatch, layers: Sequence[Layer], count: int, rest_size: int, where: str
) -> int:
    """Check the shapes of a :class:`LayerBatch` of ``count`` points.

    Returns
    -------
    int
        ``S``, the number of probes per point.

    Raises
    ------
    InputError
        Naming the layer and the array whose shape is wrong (an adapter bug).
    """
    inputs, grads = tuple(batch.inputs), tuple(batch.output_grads)
    if len(inputs) != len(layers) or len(grads) != len(layers):
        raise InputError(
            f"{where}: layer_batch returned {len(inputs)} inputs and {len(grads)} "
            f"output gradients for {len(layers)} layers: the adapter's layer "
            "structure is wrong."
        )
    rest_shape = tuple(int(d) for d in batch.rest_grads.shape)
    if len(rest_shape) != 3 or rest_shape[0] != count or rest_shape[2] != rest_size:
        raise InputError(
            f"{where}: layer_batch's rest_grads must be [B, S, P_rest] = "
            f"[{count}, S, {rest_size}], got {rest_shape}: the adapter's layer "
            "structure is wrong."
        )
    probes = rest_shape[1]
    for layer, a, g in zip(layers, inputs, grads, strict=True):
        a_shape = tuple(int(d) for d in a.shape)
        g_shape = tuple(int(d) for d in g.shape)
        ok = (
            len(a_shape) == 3
            and a_shape[0] == count
            and a_shape[2] == layer.d_in
            and g_shape == (count, probes, a_shape[1], layer.d_out)
        )
        if not ok:
            raise InputError(
                f"{where}: layer {layer.name!r} has inputs of shape {a_shape} and "
                f"output gradients of shape {g_shape}; expected [B, T, d_in] = "
                f"[{count}, T, {layer.d_in}] and [B, S, T, d_out] = [{count}, "
                f"{probes}, T, {layer.d_out}]: the adapter's layer structure is "
                "wrong."
            )
    return probes


def factor_sums(
    batch: LayerBatch, layers: Sequence[Layer], dtype: Any
) -> tuple[list[Any], list[Any], Any]:
    """One batch's sums over points of ``A``, ``G`` and the rest diagonal.

    Parameters
    ----------
    batch
        The batch's layer statistics (arrays of one namespace).
    layers
        The model's layers.
    dtype
        The accumulation dtype (of the batch's namespace).

    Returns
    -------
    a_sums, g_sums, rest_sum
        Per layer ``sum_n (1/T) sum_t a a^T`` ``[d_a, d_a]`` and ``sum_n sum_s
        sum_t g g^T`` ``[d_out, d_out]``; ``sum_n sum_s rest_grads^2``
        ``[P_rest]``.
    """
    a_sums, g_sums = [], []
    for layer, inputs, grads in zip(
        layers, batch.inputs, batch.output_grads, strict=True
    ):
        xp = array_namespace(inputs)
        a = augmented_inputs(xp.astype(inputs, dtype), layer)  # [B, T, d_a]
        positions = int(a.shape[1])
        flat_a = xp.reshape(a, (-1, layer.d_a))
        a_sums.append((flat_a.T @ flat_a) / positions)
        flat_g = xp.reshape(xp.astype(grads, dtype), (-1, layer.d_out))
        g_sums.append(flat_g.T @ flat_g)
    xp = array_namespace(batch.rest_grads)
    rest = xp.astype(batch.rest_grads, dtype)
    return a_sums, g_sums, xp.sum(rest * rest, axis=(0, 1))


def correction_sums(
    batch: LayerBatch,
    layers: Sequence[Layer],
    a_vectors: Sequence[Any],
    g_vectors: Sequence[Any],
    dtype: Any,
) -> list[Any]:
    """One batch's sums over points of EK-FAC's ``(Q_G^T G[n, s] Q_A)^2``.

    For ``T = 1`` the rotated gradient is an outer product, so its square is
    ``(Q_G^T g)^2 ((Q_A^T a)^2)^T`` and the sum over points is one matrix
    product ``[d_out, B] @ [B, d_a]``: no per-sample ``[d_out, d_a]`` matrix.
    For ``T > 1`` the rotated per-sample matrices ``(g Q_G)^T (a Q_A)`` are
    formed for chunks of points, at most :data:`CHUNK_ELEMENTS` entries at once
    (or one point's ``S * d_out * d_a`` when that is more).

    Parameters
    ----------
    batch, layers, dtype
        As for :func:`factor_sums`.
    a_vectors, g_vectors
        Per layer the eigenvectors ``Q_A`` ``[d_a, d_a]`` and ``Q_G``
        ``[d_out, d_out]`` (columns), in ``dtype``.

    Returns
    -------
    list
        Per layer ``[d_out, d_a]``.
    """
    sums = []
    for layer, inputs, grads, q_a, q_g in zip(
        layers, batch.inputs, batch.output_grads, a_vectors, g_vectors, strict=True
    ):
        xp = array_namespace(inputs)
        a = augmented_inputs(xp.astype(inputs, dtype), layer)  # [B, T, d_a]
        g = xp.astype(grads, dtype)  # [B, S, T, d_out]
        count, probes, positions = (int(d) for d in g.shape[:3])
        if positions == 1:
            rotated_g = g[:, :, 0, :] @ q_g  # [B, S, d_out]
            weights = xp.sum(rotated_g * rotated_g, axis=1)  # [B, d_out]
            rotated_a = a[:, 0, :] @ q_a  # [B, d_a]
            sums.append(weights.T @ (rotated_a * rotated_a))
            continue
        per_point = max(1, probes * layer.d_out * layer.d_a)
        chunk = max(1, CHUNK_ELEMENTS // per_point)
        total = None
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            rotated_g = g[start:stop] @ q_g  # [b, S, T, d_out]
            rotated_a = a[start:stop] @ q_a  # [b, T, d_a]
            matrices = xp.permute_dims(rotated_g, (0, 1, 3, 2)) @ rotated_a[:, None]
            term = xp.sum(matrices * matrices, axis=(0, 1))  # [d_out, d_a]
            total = term if total is None else total + term
        sums.append(total)
    return sums
