"""K-FAC and EK-FAC: Kronecker-factored Gauss-Newton curvature per layer.

Both approximate the Gauss-Newton (Fisher) matrix of the training loss by a
block-diagonal matrix with one block per recognised layer (see
:mod:`influx.layers`), plus a diagonal for the parameters in no layer (the
*rest*). They need a model with the layer structure capability
(:func:`influx.layers.has_layers`); they never multiply by the operator they
are given and only read its shift ``lambda`` (``hessian_regularization``).

For a layer with augmented inputs ``a`` (``[d_a]``, a constant 1 appended for
a bias) and output gradients ``g`` (``[d_out]``), over ``N`` training points
(statistics in :mod:`influx._kronecker`):

- ``A = (1/N) sum_n (1/T) sum_t a a^T`` and ``G = (1/N) sum_n sum_s sum_t g
  g^T``, ``T`` the weight-sharing positions (1 for a dense layer; a
  convolution's output positions: then this is the KFC approximation of
  Grosse and Martens, 2016, with derivatives at different positions taken as
  uncorrelated), ``s`` the probes of ``fisher``;
- the block acts on a layer matrix ``V`` (``[d_out, d_a]``) as ``G V A``;
  with ``A = Q_A diag(alpha) Q_A^T`` and ``G = Q_G diag(gamma) Q_G^T`` it is
  diagonal in the rotated basis, with eigenvalues ``Lambda[o, i]``:
  ``gamma[o] alpha[i]`` for K-FAC, and for EK-FAC (George et al., 2018) the
  second moments of the rotated per-sample gradients, ``(1/N) sum_n sum_s
  ((Q_G^T G[n, s] Q_A)[o, i])^2`` with ``G[n, s] = sum_t g[n, s, t] a[n,
  t]^T``, which fit the diagonal in that basis exactly;
- solve: ``X = Q_G ((Q_G^T V Q_A) / (Lambda + lambda)) Q_A^T``;
- rest: ``d = (1/N) sum_n sum_s rest_grads[n, s]^2``, solved as ``v / (d +
  lambda)``.

Probes (``fisher``): ``"mc"`` (default, as kronfluence) samples the output
Hessian, ``u = H_n^{1/2} eps`` with ``mc_samples`` standard normal draws per
point seeded from ``(seed, batch index)``; ``"empirical"`` uses the observed
labels' loss gradient; ``"ggn"`` uses the columns of ``H_n^{1/2}`` (exact
Gauss-Newton blocks' factors, ``C`` probes per point: for small outputs).

Costs: K-FAC reads the training data once (per batch, the layer inputs and
output gradients; ``O(B T (d_a^2 + S d_out^2))`` per layer), EK-FAC twice;
then one eigendecomposition of each factor, ``O(d_a^3 + d_out^3)``. Memory:
the factors and their eigenvectors, ``O(d_a^2 + d_out^2)`` per layer, nothing
``[P, P]`` or ``[N, P]``. A query costs one gradient per test point plus per
layer two rotations, ``O(K (d_out^2 d_a + d_out d_a^2))`` for ``K`` vectors;
the self-influence ``<g, C^{-1} g>`` comes from the rotated coefficients
without a second rotation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from array_api_compat import array_namespace

from influx._checks import ensure_finite, evaluate
from influx._distributed_fit import (
    PartitionedData,
    kfac_correction_sums,
    kfac_factor_sums,
)
from influx._host import host_view
from influx._kronecker import (
    CHUNK_ELEMENTS,
    check_batch,
    correction_sums,
    factor_sums,
)
from influx._loss_check import LossConventionCheck, check_points
from influx._progress import progress_iter
from influx.data import DataReader
from influx.errors import InputError
from influx.layers import (
    Layer,
    LayerBatch,
    LayerLayout,
    augmented_inputs,
    has_layers,
    parameter_groups,
)
from influx.operators import LinearOperator, split_shift
from influx.solvers._base import (
    SolveInfo,
    Solver,
    accumulation_dtype,
    from_host,
    integer_option,
    row_norms,
    to_host,
    working_dtype,
)

__all__ = ["EkfacSolver", "KfacSolver", "KfacState"]

#: The probes the solvers accept (``influx.layers.FISHER_TYPES``).
FISHERS = ("mc", "empirical", "ggn")


@dataclass(frozen=True, eq=False)
class KfacState:
    """A fitted K-FAC or EK-FAC approximation ``C`` (regularised: ``C + lambda I``).

    Arrays are in the accumulation dtype (float64 where the backend has it),
    native, or numpy in host mode.

    Attributes
    ----------
    method
        ``"kfac"`` or ``"ekfac"``.
    layout
        Moves between ``[K, P]`` and per-layer ``[K, d_out, d_a]`` blocks.
    a_eigenvalues, a_eigenvectors
        Per layer ``alpha`` ``[d_a]`` and ``Q_A`` ``[d_a, d_a]`` (columns) of
        ``A``; negative rounding clipped to 0.
    g_eigenvalues, g_eigenvectors
        Per layer ``gamma`` ``[d_out]`` and ``Q_G`` ``[d_out, d_out]`` of ``G``.
    eigenvalues
        Per layer ``Lambda`` ``[d_out, d_a]``, without ``lambda``:
        ``gamma alpha^T`` (K-FAC) or the corrected ones (EK-FAC).
    rest_diagonal
        ``[P_rest]`` ``d`` of the parameters in no layer, without ``lambda``.
    regularization
        ``lambda``, added to ``Lambda`` and ``d``.
    num_samples
        ``N``.
    fisher
        The probes the statistics were built from.
    rest_parameters
        Names of the parameter groups (:func:`influx.layers.parameter_groups`)
        that went to the rest diagonal, i.e. were not Kronecker-factored.
    operator
        The operator given to ``init`` (its namespace, device and backend).
    """

    method: str
    layout: LayerLayout
    a_eigenvalues: list[Any]
    a_eigenvectors: list[Any]
    g_eigenvalues: list[Any]
    g_eigenvectors: list[Any]
    eigenvalues: list[Any]
    rest_diagonal: Any
    regularization: float
    num_samples: int
    fisher: str
    rest_parameters: tuple[str, ...]
    operator: LinearOperator

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The Kronecker-factored layers, in the model's order."""
        return tuple(layer.name for layer in self.layout.layers)

    def factors(self, index: int) -> tuple[Any, Any]:
        """``(A, G)`` of layer ``index`` (``[d_a, d_a]``, ``[d_out, d_out]``).

        Rebuilt from the eigendecompositions (after clipping), for inspection.
        """
        q_a, q_g = self.a_eigenvectors[index], self.g_eigenvectors[index]
        return (
            (q_a * self.a_eigenvalues[index]) @ q_a.T,
            (q_g * self.g_eigenvalues[index]) @ q_g.T,
        )


class KfacSolver(Solver):
    """K-FAC: ``G (x) A`` per layer, a diagonal for the rest (module docstring).

    Approximates the Gauss-Newton (Fisher) matrix whatever operator it is
    given (:attr:`curvature` is ``"ggn"``), so for a model away from a minimum
    its influences differ from those of the exact Hessian. One pass over the
    training data; ``init`` raises :class:`~influx.InputError` if some
    ``Lambda + lambda`` is not positive (raise ``hessian_regularization``).

    Parameters
    ----------
    fisher
        ``"mc"`` (default; the output Hessian sampled, ``mc_samples`` draws
        per point), ``"empirical"`` (the observed labels' gradients) or
        ``"ggn"`` (the exact output Hessian's square root: ``C`` probes per
        point, for small outputs).
    mc_samples
        Draws per point for ``"mc"``.
    seed
        Seed of the ``"mc"`` draws (each batch's from ``(seed, batch
        index)``, so they do not depend on threads or order); ``None`` draws
        fresh entropy at each fit.
    """

    name = "kfac"
    #: The curvature the solver approximates, whatever operator it gets.
    curvature: ClassVar[str] = "ggn"
    #: Whether ``init`` makes EK-FAC's second pass.
    corrected: ClassVar[bool] = False

    def __init__(
        self, *, fisher: str = "mc", mc_samples: int = 1, seed: int | None = 0
    ) -> None:
        if not isinstance(fisher, str) or fisher.strip().lower() not in FISHERS:
            raise InputError(
                f"fisher must be one of {', '.join(map(repr, FISHERS))}, got "
                f"{fisher!r}."
            )
        self.fisher = fisher.strip().lower()
        self.mc_samples = integer_option(mc_samples, "mc_samples", minimum=1)
        self.seed = integer_option(seed, "seed", optional=True)

    # -- init ------------------------------------------------------------------

    def init(
        self,
        operator: LinearOperator,
        *,
        model: Any = None,
        training_data: Any = None,
        progress: bool = False,
    ) -> KfacState:
        """Accumulate the factors (and EK-FAC's eigenvalues) over ``training_data``."""
        _, regularization = split_shift(operator)
        if model is None or training_data is None:
            raise InputError(
                f"method={self.name!r} builds its curvature from the model's layers "
                "and the training data: pass both (influx.Influence.fit and the "
                "functional API do)."
            )
        if not has_layers(model):
            backend = getattr(getattr(model, "backend", None), "name", "this")
            raise InputError(
                f"method={self.name!r} needs the model's layer structure, and the "
                f"{backend} backend offers none for {type(model).__name__} (no "
                "'layers' and 'layer_batch'). Use a method that needs only "
                "products: 'block', 'cg', 'arnoldi', 'lissa' or 'direct'."
            )
        host = isinstance(operator.like, np.ndarray)
        dtype = accumulation_dtype(operator.like)
        reader = DataReader(
            training_data, "training_data", model.backend, model.parameters
        )
        seed = self.seed
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        # The layout is read after the first batch: an adapter may find the
        # layers by tracing the model on one (JAX).
        layouts: list[LayerLayout] = []
        batches = functools.partial(self._batches, model, reader, layouts, host, seed)

        # A distributed fit (Influence.fit(..., client=...)) maps both passes
        # over the training partitions: influx._distributed_fit.
        partitioned = isinstance(training_data, PartitionedData)
        a_sums, g_sums, rest_sum, count = None, None, None, 0
        if partitioned:
            a_sums, g_sums, rest_sum, count, layout = kfac_factor_sums(
                self, model, training_data, host, dtype, seed, progress
            )
            layouts.append(layout)
        here = not partitioned
        for n, batch in batches("K-FAC factors", progress, check=True) if here else ():
            a_terms, g_terms, rest_term = factor_sums(batch, layouts[0].layers, dtype)
            if a_sums is None:
                a_sums, g_sums, rest_sum = a_terms, g_terms, rest_term
            else:
                a_sums = [s + t for s, t in zip(a_sums, a_terms, strict=True)]
                g_sums = [s + t for s, t in zip(g_sums, g_terms, strict=True)]
                rest_sum = rest_sum + rest_term
            count += n
        assert a_sums is not None and g_sums is not None  # the reader raises if empty
        layout = layouts[0]
        layers = layout.layers
        a_values, a_vectors = _eigh_all([s / count for s in a_sums])
        g_values, g_vectors = _eigh_all([s / count for s in g_sums])
        rest_diagonal = rest_sum / count

        if self.corrected:
            sums = None
            if partitioned:
                sums = kfac_correction_sums(
                    self,
                    model,
                    training_data,
                    host,
                    dtype,
                    seed,
                    a_vectors,
                    g_vectors,
                    progress,
                )
            for _, batch in batches("EK-FAC eigenvalues", progress) if here else ():
                terms = correction_sums(batch, layers, a_vectors, g_vectors, dtype)
                sums = (
                    terms
                    if sums is None
                    else [s + t for s, t in zip(sums, terms, strict=True)]
                )
            assert sums is not None
            eigenvalues = [s / count for s in sums]
        else:
            eigenvalues = [
                gamma[:, None] * alpha[None, :]
                for gamma, alpha in zip(g_values, a_values, strict=True)
            ]
        _check_positive(eigenvalues, rest_diagonal, regularization, operator)
        groups = parameter_groups(model)
        state = KfacState(
            method=self.name,
            layout=layout,
            a_eigenvalues=a_values,
            a_eigenvectors=a_vectors,
            g_eigenvalues=g_values,
            g_eigenvectors=g_vectors,
            eigenvalues=eigenvalues,
            rest_diagonal=rest_diagonal,
            regularization=float(regularization),
            num_samples=count,
            fisher=self.fisher,
            rest_parameters=tuple(name for name, _ in groups[len(layers) :]),
            operator=operator,
        )
        return state

    def _batches(
        self,
        model: Any,
        reader: DataReader,
        layouts: list[LayerLayout],
        host: bool,
        seed: int,
        desc: str,
        progress: bool,
        check: bool = False,
        check_loss: bool = True,
    ) -> Any:
        """Yield ``(B, LayerBatch)`` per batch, checked (numpy in host mode).

        ``layouts`` receives the model's layout after the first batch if empty.
        ``check``: check the arrays' values, and with ``check_loss`` the loss
        convention (a distributed fit checks it once, on the client).
        """
        name = reader.name
        loss_check = LossConventionCheck(model, name) if check and check_loss else None
        batches = progress_iter(reader, progress, desc, total=reader.num_batches)
        for index, x, y in batches:
            count = int(x.shape[0])
            if loss_check is not None:
                loss_check(index, *check_points(x, y, int(model.num_params)))
            noise = None
            if self.fisher == "mc":
                noise = functools.partial(_draw, seed, index, self.mc_samples)
            compute = functools.partial(
                model.layer_batch, fisher=self.fisher, noise=noise
            )
            batch = evaluate(name, index, x, compute, x, y)
            if host:
                batch = LayerBatch(
                    tuple(on_host(a) for a in batch.inputs),
                    tuple(on_host(g) for g in batch.output_grads),
                    on_host(batch.rest_grads),
                    on_host(batch.losses),
                )
            if not layouts:
                layouts.append(LayerLayout(tuple(model.layers), int(model.num_params)))
            layout = layouts[0]
            where = f"{name} batch {index}"
            check_batch(batch, layout.layers, count, layout.rest.size, where)
            if check:
                ensure_finite(batch.losses, f"{where}: the loss")
                for layer, a, g in zip(
                    layout.layers, batch.inputs, batch.output_grads, strict=True
                ):
                    ensure_finite(a, f"{where}: the inputs of layer {layer.name!r}")
                    ensure_finite(
                        g, f"{where}: the output gradients of layer {layer.name!r}"
                    )
                ensure_finite(batch.rest_grads, f"{where}: the rest gradients")
            yield count, batch

    # -- solve -----------------------------------------------------------------

    def solve(
        self, state: KfacState, rhs: Any, *, x0: Any = None, progress: bool = False
    ) -> tuple[Any, SolveInfo]:
        """``(C + lambda I)^{-1} b_k`` for every row; ``x0`` is ignored (exact)."""
        xp = array_namespace(rhs)
        b = xp.astype(rhs, working_dtype(rhs))
        blocks, rest = state.layout.split(b)
        solved = []
        for block, (q_a, q_g, damped) in zip(
            blocks, _query_factors(state, b.dtype), strict=True
        ):
            rotated = q_g.T @ block @ q_a  # [K, d_out, d_a]
            solved.append(q_g @ (rotated / damped) @ q_a.T)
        rest = rest / xp.astype(state.rest_diagonal + state.regularization, b.dtype)
        x = state.layout.join(solved, rest)
        k = int(b.shape[0])
        info = SolveInfo(
            method=self.name,
            iterations=np.zeros(k, dtype=np.int64),
            residual_norms=np.full(k, np.nan),
            rhs_norms=to_host(row_norms(b), state.operator),
            converged=np.ones(k, dtype=bool),
            extra={
                "residual": "not computed (the solve is exact for the "
                "Kronecker-factored curvature, which approximates the Hessian)",
                "layers": state.layer_names,
                "rest_parameters": state.rest_parameters,
                "fisher": state.fisher,
            },
        )
        return xp.astype(x, rhs.dtype), info

    def quadratic_form(self, state: KfacState, rhs: Any) -> Any:
        """``<b_k, (C + lambda I)^{-1} b_k>`` per row, ``[K, P] -> [K]``.

        ``sum (Q_G^T V Q_A)^2 / (Lambda + lambda)`` over the layers plus
        ``sum rest^2 / (d + lambda)``: one rotation per layer, not two.
        """
        return quadratic_form(state, rhs)


class EkfacSolver(KfacSolver):
    """EK-FAC: K-FAC's eigenbasis with corrected eigenvalues (module docstring).

    A second pass over the training data replaces ``gamma alpha^T`` by the
    second moments of the per-sample gradients rotated into the Kronecker
    eigenbasis. Options as :class:`KfacSolver`; the ``"mc"`` draws of both
    passes are the same.
    """

    name = "ekfac"
    corrected: ClassVar[bool] = True


def on_host(array: Any) -> Any:
    """A numpy view of a host array (JAX on the CPU), else ``array`` itself."""
    view = host_view(array)
    return array if view is None else view


def _draw(seed: int, index: int, samples: int, count: int, outputs: int) -> Any:
    """``[count, samples, outputs]`` standard normal / ``sqrt(samples)``.

    Seeded from ``(seed, index)``: the same draws for a batch at every call.
    """
    rng = np.random.default_rng([seed, index])
    return rng.standard_normal((count, samples, outputs)) / math.sqrt(samples)


def _eigh_all(matrices: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Eigenvalues (negative rounding clipped to 0) and eigenvectors of each."""
    values, vectors = [], []
    for matrix in matrices:
        xp = array_namespace(matrix)
        result = xp.linalg.eigh((matrix + matrix.T) / 2)
        found = result.eigenvalues
        values.append(xp.where(found > 0, found, xp.zeros_like(found)))
        vectors.append(result.eigenvectors)
    return values, vectors


def _check_positive(
    eigenvalues: Sequence[Any],
    rest_diagonal: Any,
    regularization: float,
    operator: LinearOperator,
) -> None:
    """Raise if some ``Lambda + lambda`` or ``d + lambda`` is not positive.

    Values at or below ``max(Lambda, d) * max(dim) * eps`` count as zero: a
    rank-deficient factor's eigenvalues come out at that size.
    """
    host = [to_host(values, operator).ravel() for values in eigenvalues]
    host.append(to_host(rest_diagonal, operator))
    values = np.concatenate(host)
    if values.size == 0:
        return
    largest = max(float(np.max(values)), 0.0)
    width = max([1] + [max(entry.shape) for entry in eigenvalues])
    eps = float(array_namespace(rest_diagonal).finfo(rest_diagonal.dtype).eps)
    cutoff = largest * width * eps
    smallest = float(np.min(values)) + regularization
    if smallest > cutoff:
        return
    suggestion = 0.1 * float(np.mean(values))
    raise InputError(
        "The Kronecker-factored curvature plus hessian_regularization="
        f"{regularization:g} is singular or not positive definite (smallest "
        f"eigenvalue {smallest:.3e}, "
        f"largest {largest + regularization:.3e}): some directions have no "
        "curvature in the training data (unused inputs or parameters, fewer points "
        "than dimensions, a softmax cross-entropy's output Hessian, flat along "
        "the all-ones logit direction). Pass hessian_regularization > 0, e.g. "
        f"{suggestion:.3g} (0.1 x the mean eigenvalue)."
    )


# -- fitted state, for influx.Influence (quadratic forms, save and load) -------


def quadratic_form(state: KfacState, rhs: Any) -> Any:
    """``<b_k, (C + lambda I)^{-1} b_k>`` for every row (``[K, P] -> [K]``)."""
    xp = array_namespace(rhs)
    b = xp.astype(rhs, working_dtype(rhs))
    blocks, rest = state.layout.split(b)
    rest_damped = xp.astype(state.rest_diagonal + state.regularization, b.dtype)
    total = xp.sum(rest * rest / rest_damped, axis=1)
    for block, (q_a, q_g, damped) in zip(
        blocks, _query_factors(state, b.dtype), strict=True
    ):
        rotated = q_g.T @ block @ q_a
        total = total + xp.sum(rotated * rotated / damped, axis=(1, 2))
    return xp.astype(total, rhs.dtype)


def layer_quadratic_form(
    state: KfacState, inputs: Sequence[Any], output_grads: Sequence[Any], rest: Any
) -> Any:
    """:func:`quadratic_form` of per-sample gradients given by their layer arrays.

    ``<g_n, (C + lambda I)^{-1} g_n>`` for the ``B`` points of one batch, from
    the layers' inputs ``[B, T, d_in]`` and output gradients ``[B, 1, T,
    d_out]`` and the rest gradients ``[B, 1, P_rest]`` (one probe: the
    observed labels), without forming the gradients ``[B, P]``. The rotated
    gradient of a point is ``(g Q_G)^T (a Q_A)`` (``[d_out, d_a]``); for a
    dense layer (``T = 1``) its squares are the outer product of ``(g Q_G)^2``
    and ``(a Q_A)^2``, so the form is ``(g Q_G)^2 (Lambda + lambda)^{-1}
    ((a Q_A)^2)^T``: ``O(B (d_out^2 + d_a^2 + d_out d_a))`` per layer; with
    ``T > 1`` the rotated matrices are formed for a chunk of points at a
    time (at most :data:`CHUNK_ELEMENTS` entries).

    Returns
    -------
    Any
        ``[B]`` in the arrays' dtype.
    """
    xp = array_namespace(rest)
    count = int(rest.shape[0])
    dtype = rest.dtype
    rest_damped = xp.astype(state.rest_diagonal + state.regularization, dtype)
    total = xp.sum(xp.reshape(rest, (count, -1)) ** 2 / rest_damped, axis=1)
    factors = _query_factors(state, dtype)
    for layer, a, g, (q_a, q_g, damped) in zip(
        state.layout.layers, inputs, output_grads, factors, strict=True
    ):
        rotated_a = augmented_inputs(a, layer) @ q_a  # [B, T, d_a]
        rotated_g = g[:, 0] @ q_g  # [B, T, d_out]
        if int(a.shape[1]) == 1:
            squares = (rotated_g[:, 0] ** 2) @ (1 / damped)  # [B, d_a]
            total = total + xp.sum(squares * rotated_a[:, 0] ** 2, axis=1)
            continue
        per_point = layer.d_out * layer.d_a
        step = max(1, CHUNK_ELEMENTS // max(per_point, 1))
        parts = []
        for start in range(0, count, step):
            stop = min(start + step, count)
            matrices = (
                xp.permute_dims(rotated_g[start:stop], (0, 2, 1))
                @ rotated_a[start:stop]
            )  # [c, d_out, d_a]
            parts.append(xp.sum(matrices * matrices / damped, axis=(1, 2)))
        total = total + xp.concat(parts, axis=0)
    return total


def _query_factors(state: KfacState, dtype: Any) -> list[tuple[Any, Any, Any]]:
    """Per layer ``(Q_A, Q_G, Lambda + lambda)`` in the queries' ``dtype``.

    The factors are accumulated and decomposed in the accumulation dtype
    (float64 where the backend has it); a query of a float32 model rotates
    in float32, as its gradients are float32 anyway (the rotations are its
    largest cost: ``O(K d_out d_a (d_out + d_a))`` per layer).
    """
    xp = array_namespace(state.rest_diagonal)
    return [
        (
            xp.astype(q_a, dtype),
            xp.astype(q_g, dtype),
            xp.astype(values + state.regularization, dtype),
        )
        for q_a, q_g, values in zip(
            state.a_eigenvectors, state.g_eigenvectors, state.eigenvalues, strict=True
        )
    ]


def export_state(state: KfacState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host arrays and JSON metadata that :func:`import_state` restores.

    The layers' indices are saved with the factors, so the file alone rebuilds
    the layout.
    """
    op = state.operator
    arrays: dict[str, np.ndarray] = {"rest_diagonal": op.to_numpy(state.rest_diagonal)}
    layers = []
    for i, layer in enumerate(state.layout.layers):
        arrays[f"layer{i}.weight_index"] = layer.weight_index
        if layer.bias_index is not None:
            arrays[f"layer{i}.bias_index"] = layer.bias_index
        for key, values in (
            ("a_eigenvalues", state.a_eigenvalues),
            ("a_eigenvectors", state.a_eigenvectors),
            ("g_eigenvalues", state.g_eigenvalues),
            ("g_eigenvectors", state.g_eigenvectors),
            ("eigenvalues", state.eigenvalues),
        ):
            arrays[f"layer{i}.{key}"] = op.to_numpy(values[i])
        layers.append({"name": layer.name, "kind": layer.kind})
    meta = {
        "method": state.method,
        "layers": layers,
        "regularization": state.regularization,
        "num_samples": state.num_samples,
        "fisher": state.fisher,
        "rest_parameters": list(state.rest_parameters),
    }
    return arrays, meta


def import_state(
    arrays: dict[str, np.ndarray], meta: dict[str, Any], operator: LinearOperator
) -> KfacState:
    """The state :func:`export_state` wrote, on ``operator``'s device."""
    xp = array_namespace(operator.like)
    like = xp.astype(operator.like, accumulation_dtype(operator.like))

    def native(key: str) -> Any:
        return from_host(np.asarray(arrays[key]), like, operator)

    layers = []
    for i, entry in enumerate(meta["layers"]):
        bias = arrays.get(f"layer{i}.bias_index")
        layers.append(
            Layer(
                str(entry["name"]),
                str(entry["kind"]),
                np.asarray(arrays[f"layer{i}.weight_index"]),
                None if bias is None else np.asarray(bias),
            )
        )
    count = range(len(layers))
    _, regularization = split_shift(operator)
    return KfacState(
        method=str(meta["method"]),
        layout=LayerLayout(layers, operator.size),
        a_eigenvalues=[native(f"layer{i}.a_eigenvalues") for i in count],
        a_eigenvectors=[native(f"layer{i}.a_eigenvectors") for i in count],
        g_eigenvalues=[native(f"layer{i}.g_eigenvalues") for i in count],
        g_eigenvectors=[native(f"layer{i}.g_eigenvectors") for i in count],
        eigenvalues=[native(f"layer{i}.eigenvalues") for i in count],
        rest_diagonal=native("rest_diagonal"),
        regularization=float(regularization),
        num_samples=int(meta["num_samples"]),
        fisher=str(meta["fisher"]),
        rest_parameters=tuple(meta["rest_parameters"]),
        operator=operator,
    )
