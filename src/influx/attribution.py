"""Fit once, query many: :class:`Influence`.

``Influence(model, method=..., hessian_regularization=...)`` holds what does not
depend on the test points: ``fit(training_data)`` builds the regularised
Hessian operator ``H = hessian(L) + lambda I`` and runs the solver's ``init``
(a Cholesky factor, a Nystrom preconditioner, eigenpairs) once. Every query
(:meth:`Influence.factors`, :meth:`~Influence.influences`,
:meth:`~Influence.self_influence`, :meth:`~Influence.top_k`) reuses it. The
conventions (signs, averaging over all ``N`` training points, shapes) are those
of :func:`influx.compute_influences`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, BinaryIO

import numpy as np
from array_api_compat import array_namespace

from influx._host import computes_on_host
from influx._output import check_out_up_front
from influx._scoring import (
    BY_LAYER_UP_ONLY,
    check_model,
    check_out_by_layer,
    check_regularization,
    concat,
    gradients,
    layer_arrays,
    on_host,
    read_gradients,
    score,
    up_blocks,
)
from influx._store import is_store_path
from influx.data import DataReader
from influx.errors import InputError
from influx.layers import has_layers, parameter_groups
from influx.methods import InfluenceType, parse_influence_type
from influx.operators import (
    HessianOperator,
    LinearOperator,
    ModelPlacedOperator,
    check_curvature,
)
from influx.protocols import TwiceDifferentiable
from influx.solvers import (
    ArnoldiSolver,
    BlockSolver,
    CgSolver,
    DirectSolver,
    EkfacSolver,
    KfacSolver,
    LissaSolver,
    SolveInfo,
    Solver,
    make_solver,
)
from influx.solvers import arnoldi as _arnoldi
from influx.solvers import block as _block
from influx.solvers import cg as _cg
from influx.solvers import direct as _direct
from influx.solvers import kfac as _kfac
from influx.solvers import lissa as _lissa
from influx.solvers._base import working_dtype
from influx.solvers.preconditioners import NystromPreconditioner

__all__ = ["Influence"]

#: ``measurement(predictions, targets) -> [B]``, one value per point.
Measurement = Callable[[Any, Any], Any]

#: Measurement wrappers kept per Influence (each may hold compiled functions);
#: pass the same function object to reuse one.
MEASUREMENT_CACHE = 8
#: Version of the file layout :meth:`Influence.save` writes.
FORMAT_VERSION = 1
_FORMAT = "influx.Influence"


class Influence:
    """Influence functions with the expensive part done once.

    Parameters
    ----------
    model
        A wrapped model (:func:`influx.twice_differentiable`).
    method
        ``"direct"`` (default), ``"cg"``, ``"lissa"``, ``"arnoldi"``,
        ``"block"`` (or an :class:`~influx.InversionMethod`), or a
        :class:`~influx.Solver` instance, which is used as is.
    hessian_regularization
        ``lambda >= 0`` added to the Hessian's diagonal.
    curvature
        ``"hessian"`` or ``"ggn"``, the matrix ``H`` the method inverts: the
        Hessian of the training loss, or its generalised Gauss-Newton matrix
        ``J^T H_out J`` (positive semi-definite for convex losses such as
        cross-entropy and squared error, so it suits a model not trained to
        a minimum). ``None`` (default) means the Hessian, except for K-FAC and
        EK-FAC, which approximate the Gauss-Newton matrix by construction
        (``"hessian"`` is an error for them).
    progress
        Show progress bars.
    **method_options
        Options of the named method (see :func:`influx.compute_influence_factors`;
        Arnoldi also takes ``residuals=True`` to report the residuals of each
        solve against the full operator, at one pass over the training data per
        solve). Not allowed with a solver instance.

    Notes
    -----
    After :meth:`fit` the object does not change: queries only read the fitted
    state, so they may run from several threads at once (calls into a model
    that is not declared thread-safe, such as a torch module, are serialised
    per module). :meth:`fit` may run once; fit a new object for new data.

    Cost of a query with ``N_test`` test points, ``M`` input points and ``P``
    parameters: the test gradients, one solve of ``N_test`` right-hand sides
    (direct: two triangular solves, ``O(N_test P^2)``; arnoldi: ``O(N_test P
    r)`` projections; cg and lissa: their iterations, each a pass over the
    training data), and for influences one pass over the input data.

    Examples
    --------
    >>> inf = influx.Influence(model, "cg", 1e-3).fit(train)  # doctest: +SKIP
    >>> scores = inf.influences(test)  # [N_test, N_train]  # doctest: +SKIP
    >>> values, indices = inf.top_k(test, train, k=5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: TwiceDifferentiable,
        method: str | Solver = "direct",
        hessian_regularization: float = 0.0,
        *,
        curvature: str | None = None,
        progress: bool = False,
        **method_options: Any,
    ) -> None:
        check_model(model)
        check_regularization(hessian_regularization, "hessian_regularization")
        if isinstance(method, Solver):
            if method_options:
                raise TypeError(
                    f"method is a solver instance ({method!r}); its options are set "
                    f"on it, so the options {sorted(method_options)} are not "
                    "allowed. Build the solver with them, or pass the method's name."
                )
            solver = method
        elif isinstance(method, type) and issubclass(method, Solver):
            raise TypeError(
                f"method must be a name or a solver instance, got the class "
                f"{method.__name__}: instantiate it, e.g. {method.__name__}()."
            )
        else:
            solver = make_solver(method, **method_options)
        self._curvature, self._operator_curvature = _resolve_curvature(
            curvature, solver, model
        )
        self._model = model
        self._guarded = _guard(model)
        self._solver = solver
        self._regularization = float(hessian_regularization)
        self._progress = bool(progress)
        self._lock = threading.RLock()
        self._fitted: _Fitted | None = None
        self._info: SolveInfo | None = None
        self._measured_models: dict[Any, TwiceDifferentiable] = {}

    # -- properties ----------------------------------------------------------

    @property
    def model(self) -> TwiceDifferentiable:
        """The wrapped model."""
        return self._model

    @property
    def solver(self) -> Solver:
        """The solver (built from the method's name, or the instance given)."""
        return self._solver

    @property
    def method(self) -> str:
        """The inversion method's name."""
        return self._solver.name

    @property
    def curvature(self) -> str:
        """``"hessian"`` or ``"ggn"``: the curvature matrix the method inverts."""
        return self._curvature

    @property
    def hessian_regularization(self) -> float:
        """``lambda``, added to the Hessian's diagonal."""
        return self._regularization

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) has run."""
        return self._fitted is not None

    @property
    def num_training_samples(self) -> int | None:
        """``N``, the training points the Hessian averages over (once fitted)."""
        return None if self._fitted is None else self._fitted.num_samples

    @property
    def info(self) -> SolveInfo | None:
        """The :class:`~influx.SolveInfo` of the last solve; ``None`` before.

        Shared by all threads: under concurrent queries it is whichever solve
        finished last.
        """
        return self._info

    # -- fitting -------------------------------------------------------------

    def fit(self, training_data: Any, *, client: Any = None) -> Influence:
        """Build the Hessian operator on ``training_data`` and run the solver's init.

        Parameters
        ----------
        training_data
            Re-iterable of ``(x, y)`` batches, ``N`` points; the Hessian
            averages over all of them. With a ``client``, a data source
            (:class:`~influx.ArraySource`, :class:`~influx.FactorySource`)
            whose partitions the workers read themselves.
        client
            A ``dask.distributed.Client``: the fit's statistics (curvature
            products and dense blocks, Nystrom sketches, K-FAC factors and
            EK-FAC corrections) are computed on the workers, one task per
            partition of the source, and added in a tree; the model is sent
            to each worker once. ``None`` (default) computes here. LiSSA's
            stochastic steps read single batches here in both cases (they
            are sequential); so does the loss-convention check (first
            batch). Products with the fitted Hessian in later queries (cg,
            lissa, arnoldi residuals) also run on ``client``, which must
            stay open while they are made. The fitted state equals the
            single-process one up to rounding (the sums are added in another
            order).

        Returns
        -------
        Influence
            ``self``, fitted.

        Raises
        ------
        RuntimeError
            If the object is already fitted (build a new one for new data).
        InputError
            If ``client`` is given and ``training_data`` is not a source.
        """
        self._fit(training_data, client=client)
        return self

    def _fitted_rhs(self, training_data: Any, test_data: Any) -> tuple[_Fitted, Any]:
        """Fit, and the gradients of ``test_data`` (the seed functions' order)."""
        rhs = self._fit(training_data, test_data)
        return self._require_fitted(), rhs

    def _fit(
        self, training_data: Any, test_data: Any = None, client: Any = None
    ) -> Any:
        """:meth:`fit`; with ``test_data``, also its gradients (returned).

        The test gradients are computed after the training data is checked and
        before the solver's ``init``, so that errors in the test data come
        before the expensive part (the order of the seed's functions).
        """
        with self._lock:
            if self._fitted is not None:
                raise RuntimeError(
                    "This Influence is already fitted, and a fitted Influence does "
                    "not change (queries may be running on it). Build a new "
                    "influx.Influence(...) to fit other training data."
                )
            # JAX on the CPU: the solver's small steps run in numpy (nothing to
            # compile), only the model's derivatives in JAX.
            host = computes_on_host(self._model.parameters)
            init_data = training_data
            if client is None:
                hessian = HessianOperator(
                    self._guarded,
                    training_data,
                    progress=self._progress,
                    host=host,
                    curvature=self._operator_curvature,
                )
            else:
                from influx._distributed_fit import partitioned_fit

                hessian, init_data = partitioned_fit(
                    self._model,
                    self._guarded,
                    training_data,
                    client,
                    progress=self._progress,
                    host=host,
                    curvature=self._operator_curvature,
                )
            rhs = None
            if test_data is not None:
                rhs = self._test_gradients(test_data, training_data, None, host)
            operator = hessian.shift(self._regularization)
            state = self._solver.init(
                operator,
                model=self._model,
                training_data=init_data,
                progress=self._progress,
            )
            self._fitted = _Fitted(state, operator, training_data, hessian.reader, host)
        return rhs

    # -- queries -------------------------------------------------------------

    def factors(self, test_data: Any, *, measurement: Measurement | None = None) -> Any:
        """Influence factors ``s_test = H^{-1} grad f(z_test)``, ``[N_test, P]``.

        Parameters
        ----------
        test_data
            Re-iterable of ``(x, y)`` batches, ``N_test`` points.
        measurement
            ``f(predictions, targets) -> [B]``, one value per point, attributed
            instead of the loss (for example the margin of the true class);
            ``None`` means the loss. Written in the model's framework; the
            model is wrapped again with ``mean(measurement)`` as its loss, once
            per function object (keep the function to reuse the wrapper).

        Returns
        -------
        Any
            Native array ``[N_test, P]``.
        """
        fitted = self._require_fitted()
        rhs = self._test_gradients(
            test_data, fitted.training_data, measurement, fitted.host
        )
        return self._solve(fitted, rhs)[0]

    def _solve(self, fitted: _Fitted, rhs: Any) -> tuple[Any, SolveInfo]:
        """Native solutions ``[K, P]`` of the right-hand sides ``rhs``, and the info."""
        solution, info = self._solver.solve(fitted.state, rhs, progress=self._progress)
        self._set_info(info)
        return self._native(fitted, solution), info

    def influences(
        self,
        test_data: Any,
        input_data: Any = None,
        *,
        influence_type: InfluenceType | str = InfluenceType.Up,
        out: Any = None,
        measurement: Measurement | None = None,
        by_layer: bool = False,
        client: Any = None,
        overwrite: bool = False,
    ) -> Any:
        """Influence of every input point on every test point.

        Parameters
        ----------
        test_data
            Points whose loss (or ``measurement``) is explained, ``N_test``.
        input_data
            Points whose influence is computed, ``M``; ``None`` means the
            training data.
        influence_type
            ``"up"`` (default) or ``"perturbation"``.
        out
            Optional host array (numpy, ``numpy.memmap``, zarr) of the result's
            shape that takes it block by block; it is returned. Or the path
            (``str`` or ``os.PathLike``) of a resumable zarr store, created or
            reopened: the result is written chunk by chunk (a source's
            partitions, else groups of consecutive batches), each chunk marked
            done once written, and a call with the same job (same model,
            method, options, test data, input size and query; the store's
            fingerprint) computes only the chunks still missing. The store's
            ``"scores"`` zarr array is returned; see :func:`influx.open_results`.
            With a client the workers write into it: the path must name the
            same directory on every worker (a local cluster, or a shared file
            system).
        measurement
            See :meth:`factors`.
        by_layer
            Split each up-weighting influence ``<s_test, grad l(z)>`` over the
            parameter groups of :attr:`layer_names` (each layer's weight and
            bias, then each remaining parameter tensor): the result gets a
            last axis ``L`` that sums to the total (to rounding). Up-weighting
            only; ``out`` must then be ``[N_test, M, L]``.
        client
            A ``dask.distributed.Client``: the test factors are computed here
            and sent to every worker once; each worker scores partitions of
            ``input_data``, which must then be an :class:`influx.ArraySource`
            or :class:`influx.FactorySource` (the workers read it
            themselves), and writes its blocks into the ``out`` store, or
            sends them back (``out=None``: the same native array as without a
            client). ``None``: this process.
        overwrite
            With ``out`` a store path: delete a store of another job (or of
            this one) there and start over, instead of refusing it (another
            job) or resuming it (this one).

        Returns
        -------
        Any
            Native array ``[N_test, M]`` for ``"up"``, ``[N_test, M, L]`` with
            ``by_layer``, ``[N_test, M, *S]`` for ``"perturbation"``; ``out``
            when given; the store's ``"scores"`` zarr array when ``out`` is a
            path.
        """
        kind = parse_influence_type(influence_type)
        if not isinstance(by_layer, bool | np.bool_):
            raise TypeError(f"by_layer must be True or False, got {by_layer!r}.")
        if by_layer and kind is not InfluenceType.Up:
            raise InputError(BY_LAYER_UP_ONLY)
        fitted = self._require_fitted()
        data, name = self._input(fitted, input_data)
        if uses_chunks(out, client):
            from influx._distributed_scoring import distributed_influences

            return distributed_influences(
                self, kind, data, name, test_data, measurement, bool(by_layer), out,
                client, overwrite,
            )  # fmt: skip
        if by_layer:
            check_out_by_layer(out, self._model, data, test_data=test_data)
        else:
            check_out_up_front(out, kind is InfluenceType.Up, data, test_data=test_data)
        factors = self.factors(test_data, measurement=measurement)
        return self._score(kind, data, name, factors, out, bool(by_layer))

    @property
    def layer_names(self) -> list[str]:
        """Names of the parameter groups of ``influences(..., by_layer=True)``.

        One per entry of the result's last axis ``L``, in order: the model's
        recognised layers (weight and bias together), when its adapter offers
        the layer structure, then each remaining parameter tensor (a model
        without the layer structure: each parameter tensor); see
        :func:`influx.layers.parameter_groups`. An adapter that finds its
        layers by tracing a batch (JAX) knows them once the model has seen
        one (after :meth:`fit`).
        """
        return [name for name, _ in parameter_groups(self._model)]

    def _score(
        self,
        kind: InfluenceType,
        data: Any,
        name: str,
        factors: Any,
        out: Any,
        by_layer: bool = False,
    ) -> Any:
        """Influences of ``kind`` of ``data`` for ``factors`` (the shared loop)."""
        model, progress = self._guarded, self._progress
        return score(kind, model, data, factors, progress, name, out, by_layer=by_layer)

    def self_influence(
        self,
        data: Any,
        *,
        out: Any = None,
        client: Any = None,
        overwrite: bool = False,
    ) -> Any:
        """``<H^{-1} g_i, g_i>`` of every point, ``g_i = grad l(z_i)``; ``[N]``.

        The diagonal of ``influences(data, data)``, without the ``[N, N]``
        matrix. Cost per method, for ``N`` points, a batch of ``B``:

        - direct: one triangular solve per batch with the Cholesky factor,
          ``||L^{-1} g_i||^2`` (``O(N P^2)`` in all); with the eigen fallback,
          projections on the eigenvectors;
        - arnoldi: projections on the ``r`` kept eigenvectors plus the
          remainder term (``remainder="floor"``), ``O(N P r)``;
        - kfac, ekfac: per layer one rotation of each gradient into the
          Kronecker eigenbasis, ``sum (Q_G^T G Q_A)^2 / (Lambda + lambda)``,
          from the layer inputs and output gradients (never the per-sample
          gradients ``[B, P]``; for a dense layer ``O(B (d_out^2 + d_a^2))``);
        - cg, lissa (and any other solver): one batched solve of each batch's
          ``B`` gradients, as costly as computing ``B`` influence factors.

        :attr:`info` is set by the solves of cg and lissa (one entry per
        point); direct, arnoldi, kfac and ekfac solve nothing here and leave it
        as it was.

        There is no ``measurement=``: the self-influence of a measurement,
        ``<H^{-1} grad m(z_i), grad l(z_i)>``, is no longer a quadratic form
        (the cheap paths above do not apply) and needs the gradients of both
        the measurement and the loss of every point. Take the diagonal of
        ``influences(data, data, measurement=m)`` for a few points.

        Parameters
        ----------
        data
            Re-iterable of ``(x, y)`` batches, ``N`` points, read in order.
        out
            ``None``, or the path of a resumable zarr store (see
            :meth:`influences`); with a ``client``, also a host array ``[N]``
            that the workers' blocks are copied into.
        client
            A ``dask.distributed.Client``: ``data`` must then be a source
            (:class:`influx.ArraySource`, :class:`influx.FactorySource`); the
            fitted state goes to every worker once (:meth:`save`'s bytes,
            loaded there; cg and lissa also need the training data there, so
            they must have been fitted on a source), and each worker computes
            the values of its partitions. :attr:`info` is then not set.
        overwrite
            See :meth:`influences`.

        Returns
        -------
        Any
            Native array ``[N]``; ``out`` when given; the store's ``"scores"``
            zarr array when ``out`` is a path.
        """
        fitted = self._require_fitted()
        name = _data_name(data, fitted, "data")
        if uses_chunks(out, client):
            from influx._distributed_scoring import distributed_self_influence

            return distributed_self_influence(self, data, name, out, client, overwrite)
        if out is not None:
            raise InputError(
                "self_influence's out must be the path of a zarr store, or used "
                "with client=...: pass out='self.zarr', or take the returned array."
            )
        model = self._guarded
        reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
        if isinstance(fitted.state, _kfac.KfacState) and has_layers(model):
            return self._native(fitted, self._kfac_self_influence(fitted, reader))
        values, infos = [], []
        for native in gradients(model, reader, self._progress, "Self-influence"):
            grads = on_host(native) if fitted.host else native
            quadratic = _quadratic_form(self._solver, fitted.state, grads)
            if quadratic is None:
                solution, info = self._solver.solve(fitted.state, grads)
                xp = array_namespace(grads)
                quadratic = xp.sum(solution * grads, axis=1)
                infos.append(info)
            values.append(quadratic)
        if infos:
            self._set_info(_join_infos(infos))
        return self._native(fitted, concat(values))

    def _kfac_self_influence(self, fitted: _Fitted, reader: DataReader) -> Any:
        """K-FAC's and EK-FAC's self-influence from the layer arrays, ``[N]``.

        No per-sample gradients ``[B, P]``: each batch's layer inputs and
        output gradients are rotated into the Kronecker eigenbases
        (:func:`influx.solvers.kfac.layer_quadratic_form`).
        """
        state = fitted.state
        xp = array_namespace(state.rest_diagonal)
        # the model's dtype (float32 for half precision), numpy's in host mode
        dtype = working_dtype(fitted.operator.like)
        values = [
            _kfac.layer_quadratic_form(state, inputs, output_grads, rest)
            for inputs, output_grads, rest, _ in layer_arrays(
                self._guarded,
                reader,
                self._progress,
                "Self-influence",
                host=fitted.host,
                xp=xp,
                dtype=dtype,
            )
        ]
        return concat(values)

    def top_k(
        self,
        test_data: Any,
        input_data: Any,
        k: int,
        *,
        largest: bool = True,
        measurement: Measurement | None = None,
        client: Any = None,
    ) -> tuple[Any, Any]:
        """The ``k`` most influential input points of each test point.

        Streams over ``input_data`` batch by batch and keeps a running top
        ``k`` per test point: memory ``O(N_test * (k + B))``, never the whole
        ``[N_test, M]`` score matrix. Ties go to the smaller input index.

        Parameters
        ----------
        test_data
            ``N_test`` test points.
        input_data
            ``M >= k`` input points; ``None`` means the training data.
        k
            How many to keep per test point.
        largest
            ``True``: the largest up-weighting influences (the points whose
            up-weighting lowers the test loss most); ``False``: the most
            negative.
        measurement
            See :meth:`factors`.
        client
            A ``dask.distributed.Client``: ``input_data`` must then be a
            source; each worker keeps the top ``k`` of its partitions, merged
            here (the same result, ties to the smaller index).

        Returns
        -------
        values, indices
            Native arrays ``[N_test, k]``: the influences in the model's dtype,
            sorted (descending for ``largest``, else ascending), and the input
            points' indices in the order of ``input_data`` (int64; int32 on
            JAX without ``jax_enable_x64``).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise TypeError(f"k must be a positive int, got {type(k).__name__}.")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}.")
        k = int(k)
        fitted = self._require_fitted()
        data, name = self._input(fitted, input_data)
        known = getattr(data, "num_samples", None)
        if isinstance(known, int) and known < k:
            raise InputError(
                f"k={k} is larger than the {known} points of {name}: lower k."
            )
        if client is not None:
            from influx._distributed_scoring import distributed_top_k

            return distributed_top_k(
                self, test_data, data, name, k, largest, measurement, client
            )
        factors = self.factors(test_data, measurement=measurement)
        model = self._guarded
        reader = DataReader(data, name, model.backend, model.parameters, ordered=True)
        best = _RunningTopK(k, largest)
        # The same blocks as influences(): top_k equals sorting its result.
        desc = "Top-k influences"
        for block in up_blocks(model, reader, factors, self._progress, desc):
            best.add(_to_host(block))
        if best.seen < k:
            raise InputError(
                f"k={k} is larger than the {best.seen} points of {name}: lower k."
            )
        values, indices = best.result()
        backend = model.backend
        return backend.asarray(values, like=model.parameters), backend.asarray(indices)

    # -- saving --------------------------------------------------------------

    def save(self, path: str | os.PathLike[str] | BinaryIO) -> None:
        """Write the fitted state to ``path`` (a ``.npz`` file, no pickle).

        ``path`` may also be a binary file object (``io.BytesIO``), which gets
        the same bytes (a distributed query sends them to its workers).

        The file holds the solver's state arrays and a JSON header with the
        method and its options, ``lambda``, ``P``, the dtype, the backend and
        framework version, influx's version, the SHA-256 of the parameters and
        the number ``N`` of training points. The training data is not saved:
        methods whose queries multiply by the Hessian (cg, lissa) need it
        again at :meth:`load`.

        Raises
        ------
        TypeError
            For a solver or option whose state cannot be saved.
        """
        fitted = self._require_fitted()
        exporter = _state_io(self._solver)[0]
        state_arrays, state_meta = exporter(fitted.state)
        options, option_arrays = _encode_options(self._solver)
        header = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            **_model_facts(self._model),
            "method": self._solver.name,
            "options": options,
            "hessian_regularization": self._regularization,
            "curvature": self._curvature,
            "num_training_samples": self.num_training_samples,
            "influx_version": _influx_version(),
            "state": state_meta,
        }
        arrays = {f"state.{key}": value for key, value in state_arrays.items()}
        arrays.update(option_arrays)
        text = json.dumps(header, sort_keys=True).encode()
        arrays["header"] = np.frombuffer(text, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        if hasattr(path, "write"):
            path.write(buffer.getvalue())  # type: ignore[union-attr]
            return
        target = os.fspath(path)
        temporary = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(temporary, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(temporary, target)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | BinaryIO,
        model: TwiceDifferentiable,
        training_data: Any = None,
        *,
        progress: bool = False,
    ) -> Influence:
        """A fitted :class:`Influence` from :meth:`save`'s file, for ``model``.

        Parameters
        ----------
        path
            The file :meth:`save` wrote, or a binary file object of its bytes.
        model
            The wrapped model it was fitted on: same backend, parameter count,
            dtype and parameter values (checked by their SHA-256).
        training_data
            The training data; required for cg and lissa (whose queries
            multiply by the Hessian), for arnoldi with ``residuals=True``, and
            for queries whose ``input_data`` defaults to it. Its size must
            match the saved one.
        progress
            Show progress bars.

        Raises
        ------
        InputError
            If the file is not an Influence file, the model differs from the
            one saved, or ``training_data`` is missing or of another size.
        """
        check_model(model)
        source = path if hasattr(path, "read") else os.fspath(path)  # type: ignore[arg-type]
        with np.load(source, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        header = _read_header(arrays, path)
        _check_same_model(header, model, path)
        method, options = header["method"], _decode_options(header["options"], arrays)
        inf = cls(
            model,
            method,
            header["hessian_regularization"],
            curvature=header.get("curvature", "hessian"),
            progress=progress,
            **options,
        )
        needs_data = method in ("cg", "lissa") or (
            method == "arnoldi" and options.get("residuals", False)
        )
        expected = int(header["num_training_samples"])
        host = computes_on_host(model.parameters)
        if training_data is None:
            if needs_data:
                raise InputError(
                    f"{method} queries multiply by the training Hessian: pass the "
                    f"training data ({expected} points) to Influence.load(path, "
                    "model, training_data)."
                )
            base: LinearOperator = _DetachedOperator(inf._guarded, host)
            reader = None
        else:
            hessian = HessianOperator(
                inf._guarded,
                training_data,
                progress=progress,
                host=host,
                curvature=inf._operator_curvature,
            )
            reader = hessian.reader
            count = hessian.reader.num_samples
            if count != expected:
                raise InputError(
                    f"training_data has {count} points but the saved Influence was "
                    f"fitted on {expected}: pass the same training data."
                )
            base = hessian
        operator = base.shift(inf._regularization)
        state_arrays = {
            name[len("state.") :]: value
            for name, value in arrays.items()
            if name.startswith("state.")
        }
        importer = _state_io(inf._solver)[1]
        state = importer(state_arrays, header["state"], operator)
        inf._fitted = _Fitted(state, operator, training_data, reader, host, expected)
        return inf

    # -- helpers -------------------------------------------------------------

    def _require_fitted(self) -> _Fitted:
        fitted = self._fitted
        if fitted is None:
            raise RuntimeError(
                "This Influence is not fitted yet: call fit(training_data) first."
            )
        return fitted

    def _set_info(self, info: SolveInfo) -> None:
        with self._lock:
            self._info = info

    def _input(self, fitted: _Fitted, input_data: Any) -> tuple[Any, str]:
        if input_data is not None:
            return input_data, _data_name(input_data, fitted, "input_data")
        if fitted.training_data is None:
            raise InputError(
                "input_data defaults to the training data, which this Influence "
                "was loaded without: pass input_data, or training_data to "
                "Influence.load."
            )
        return fitted.training_data, "training_data"

    def _test_gradients(
        self,
        test_data: Any,
        training_data: Any,
        measurement: Measurement | None,
        host: bool,
    ) -> Any:
        """Gradients ``[N_test, P]`` of the loss (or measurement), in order.

        On the host (numpy) when the solver runs there.
        """
        model = self._guarded if measurement is None else self._measured(measurement)
        # When the test points are the training data, errors name the argument
        # the user actually passed.
        name = "training_data" if test_data is training_data else "test_data"
        desc = "Test gradients"
        return read_gradients(model, test_data, name, self._progress, desc, host=host)

    def _native(self, fitted: _Fitted, array: Any) -> Any:
        """A host-mode result (numpy) as the model's native array."""
        if fitted.host and isinstance(array, np.ndarray):
            return self._model.backend.asarray(array, like=self._model.parameters)
        return array

    def _measured(self, measurement: Measurement) -> TwiceDifferentiable:
        """The model wrapped again with ``mean(measurement)`` as its loss, cached."""
        if not callable(measurement):
            raise TypeError(
                f"measurement must be a callable measurement(predictions, targets) "
                f"-> [B], got {type(measurement).__name__}."
            )
        with self._lock:
            cached = self._measured_models.get(measurement)
            if cached is None:
                cached = _guard(_rewrap(self._model, _MeanOf(measurement)))
                if len(self._measured_models) >= MEASUREMENT_CACHE:
                    del self._measured_models[next(iter(self._measured_models))]
                self._measured_models[measurement] = cached
        return cached

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return (
            f"Influence({self._solver!r}, hessian_regularization="
            f"{self._regularization:g}, {state})"
        )


@dataclass(frozen=True)
class _Fitted:
    """What :meth:`Influence.fit` produces, never changed afterwards.

    ``host``: the solver runs in numpy (JAX on the CPU, ``influx._host``).
    ``N`` is ``count`` when known (a loaded state), else read from ``reader``
    when first asked (a pass over the data only if nothing read it yet).
    """

    state: Any
    operator: LinearOperator
    training_data: Any
    reader: DataReader | None
    host: bool = False
    count: int | None = None

    @property
    def num_samples(self) -> int:
        if self.count is not None:
            return self.count
        assert self.reader is not None
        return self.reader.num_samples


def _resolve_curvature(
    curvature: str | None, solver: Solver, model: TwiceDifferentiable
) -> tuple[str, str]:
    """``(curvature, the operator's curvature)`` of an :class:`Influence`.

    A solver that approximates a curvature itself (K-FAC: the Gauss-Newton
    matrix, from the layers) never multiplies by its operator's, which is then
    the plain Hessian; asking it for another curvature is an error.
    """
    own = getattr(solver, "curvature", None)
    if own is None:
        name = check_curvature("hessian" if curvature is None else curvature, model)
        return name, name
    if curvature is not None and str(curvature).strip().lower() != own:
        raise InputError(
            f"curvature={curvature!r} is not available with method "
            f"{solver.name!r}, which approximates the {own!r} curvature by "
            f"construction: leave curvature unset (or pass {own!r}), or pick a "
            "method of the exact curvature (direct, block, cg, arnoldi)."
        )
    return own, "hessian"


def uses_chunks(out: Any, client: Any) -> bool:
    """Whether a query runs chunk by chunk (a client, or ``out`` a store path)."""
    return client is not None or is_store_path(out)


def _data_name(data: Any, fitted: _Fitted, default: str) -> str:
    """``"training_data"`` when ``data`` is the training data, else ``default``."""
    return "training_data" if data is fitted.training_data else default


# -- measurements ----------------------------------------------------------------


class _MeanOf:
    """The loss ``mean(measurement(predictions, targets))``.

    Its per-sample gradient (the loss on a batch of one) is the gradient of the
    measurement of that point.
    """

    def __init__(self, measurement: Measurement) -> None:
        self.measurement = measurement

    def __call__(self, predictions: Any, targets: Any) -> Any:
        values = self.measurement(predictions, targets)
        shape = tuple(getattr(values, "shape", ()) or ())
        count = int(predictions.shape[0])
        if shape != (count,):
            raise InputError(
                f"measurement must return one value per point, shape [B]=({count},), "
                f"got {type(values).__name__} of shape {shape}. Reduce the other "
                "axes in the measurement (for example select the true class)."
            )
        return values.mean()


def _rewrap(model: TwiceDifferentiable, loss: Callable[[Any, Any], Any]) -> Any:
    """``model``'s network wrapped again with another loss, on the same backend."""
    if hasattr(model, "with_loss"):
        rewrapped = model.with_loss(loss)
    elif hasattr(model, "apply_fn") and hasattr(model, "params"):
        rewrapped = model.backend.twice_differentiable(
            model.apply_fn, loss, params=model.params
        )
    elif hasattr(model, "model"):
        rewrapped = model.backend.twice_differentiable(model.model, loss)
    else:
        raise TypeError(
            f"measurement needs the model wrapped again with another loss, and "
            f"{type(model).__name__} offers no way to (a with_loss(loss) method, "
            "or model / apply_fn and params attributes)."
        )
    before, after = _parameter_hash(model), _parameter_hash(rewrapped)
    if before != after:
        raise InputError(
            "The model's parameters changed since it was wrapped (SHA-256 "
            f"{before[:16]}... then, {after[:16]}... now), so a measurement cannot "
            "be attributed consistently: wrap the model again and fit a new "
            "Influence."
        )
    return rewrapped


# -- thread safety ---------------------------------------------------------------

_MODULE_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_MODULE_LOCKS_LOCK = threading.Lock()


def _guard(model: TwiceDifferentiable) -> TwiceDifferentiable:
    """``model``, or a proxy that serialises its calls per wrapped network.

    JAX functions are pure, and a model may declare ``thread_safe = True`` (the
    torch adapter does: it serialises its calls per module itself); any other
    model, a third-party backend's, is called by one thread at a time, with a
    lock shared by every wrapper of the same network.
    """
    if getattr(model, "thread_safe", False) or model.backend.name == "jax":
        return model
    network = getattr(model, "model", model)
    with _MODULE_LOCKS_LOCK:
        try:
            lock = _MODULE_LOCKS.setdefault(network, threading.RLock())
        except TypeError:  # not weak-referenceable: one lock for this wrapper
            lock = threading.RLock()
    return _Serialised(model, lock)


#: Optional adapter methods that evaluate the model, serialised like the rest.
_OPTIONAL_DERIVATIVES = frozenset({"ggnvp", "layer_batch", "value_and_grad", "grad"})


class _Serialised:
    """A :class:`~influx.TwiceDifferentiable` whose derivatives hold a lock."""

    def __init__(self, model: TwiceDifferentiable, lock: threading.RLock) -> None:
        self._wrapped, self._call_lock = model, lock

    @property
    def backend(self) -> Any:
        return self._wrapped.backend

    @property
    def num_params(self) -> int:
        return self._wrapped.num_params

    @property
    def dtype(self) -> Any:
        return self._wrapped.dtype

    @property
    def parameters(self) -> Any:
        return self._wrapped.parameters

    def per_sample_grads(self, x: Any, y: Any) -> tuple[Any, Any]:
        with self._call_lock:
            return self._wrapped.per_sample_grads(x, y)

    def hvp(self, x: Any, y: Any, vectors: Any) -> Any:
        with self._call_lock:
            return self._wrapped.hvp(x, y, vectors)

    def mixed_grads(self, x: Any, y: Any, vectors: Any) -> Any:
        with self._call_lock:
            return self._wrapped.mixed_grads(x, y, vectors)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._wrapped, name)
        if name in _OPTIONAL_DERIVATIVES:  # present only if the model has them
            return functools.partial(self._locked, found)
        return found

    def _locked(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            return method(*args, **kwargs)


# -- per-method pieces -------------------------------------------------------------


def _quadratic_form(solver: Solver, state: Any, grads: Any) -> Any | None:
    """``<A^{-1} g_k, g_k>`` from a factorised state, or ``None`` to solve."""
    if isinstance(state, _direct.DirectState):
        return _direct.quadratic_form(state, grads)
    if isinstance(state, _block.BlockState):
        return _block.quadratic_form(state, grads)
    if isinstance(solver, ArnoldiSolver) and isinstance(state, _arnoldi.ArnoldiState):
        return _arnoldi.quadratic_form(solver, state, grads)
    if isinstance(state, _kfac.KfacState):
        return _kfac.quadratic_form(state, grads)
    return None


_STATE_IO: list[tuple[type[Solver], Any, Any]] = [
    (DirectSolver, _direct.export_state, _direct.import_state),
    (CgSolver, _cg.export_state, _cg.import_state),
    (LissaSolver, _lissa.export_state, _lissa.import_state),
    (ArnoldiSolver, _arnoldi.export_state, _arnoldi.import_state),
    (KfacSolver, _kfac.export_state, _kfac.import_state),
    (EkfacSolver, _kfac.export_state, _kfac.import_state),
    (BlockSolver, _block.export_state, _block.import_state),
]


def _state_io(solver: Solver) -> tuple[Any, Any]:
    for kind, exporter, importer in _STATE_IO:
        if type(solver) is kind:
            return exporter, importer
    raise TypeError(
        f"cannot save or load the state of {type(solver).__name__}: only the "
        "built-in solvers (direct, cg, lissa, arnoldi, block, kfac, ekfac) can "
        "be saved."
    )


def _join_infos(infos: list[SolveInfo]) -> SolveInfo:
    """One :class:`SolveInfo` for solves of consecutive right-hand sides."""
    if len(infos) == 1:
        return infos[0]
    messages = dict.fromkeys(info.message for info in infos if info.message)
    return SolveInfo(
        method=infos[0].method,
        iterations=np.concatenate([info.iterations for info in infos]),
        residual_norms=np.concatenate([info.residual_norms for info in infos]),
        rhs_norms=np.concatenate([info.rhs_norms for info in infos]),
        converged=np.concatenate([info.converged for info in infos]),
        message="; ".join(messages),
        extra=infos[-1].extra,
    )


class _RunningTopK:
    """The ``k`` best columns seen so far of each row, ties to the smaller index.

    Candidates are kept in index order among equal values, so a stable sort on
    the value alone breaks ties by index.
    """

    def __init__(self, k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        self.values: np.ndarray | None = None
        self.indices: np.ndarray | None = None
        self.seen = 0

    def add(self, block: np.ndarray) -> None:
        """Merge a block ``[N_test, B]`` of the next ``B`` columns."""
        width = int(block.shape[1])
        columns = np.arange(self.seen, self.seen + width, dtype=np.int64)
        new_indices = np.broadcast_to(columns, block.shape)
        self.seen += width
        if self.values is None:
            values, indices = block, new_indices
        else:
            values = np.concatenate([self.values, block], axis=1)
            indices = np.concatenate([self.indices, new_indices], axis=1)
        key = -values if self.largest else values
        order = np.argsort(key, axis=1, kind="stable")[:, : self.k]
        self.values = np.take_along_axis(values, order, axis=1)
        self.indices = np.take_along_axis(indices, order, axis=1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.values is not None and self.indices is not None
        return np.ascontiguousarray(self.values), np.ascontiguousarray(self.indices)


class _DetachedOperator(ModelPlacedOperator):
    """Stands in for the Hessian of a loaded state with no training data.

    Gives the size, namespace and backend that a factorised state needs; any
    product with the Hessian is an error that says to pass the training data.
    """

    def __init__(self, model: TwiceDifferentiable, host: bool = False) -> None:
        self.size = model.num_params
        self._place(model, host)

    def mv(self, vectors: Any) -> Any:
        raise InputError(
            "This Influence was loaded without training data, and this query "
            "multiplies by the training Hessian: pass training_data to "
            "Influence.load."
        )


# -- the saved file ----------------------------------------------------------------


def _parameter_hash(model: TwiceDifferentiable) -> str:
    """SHA-256 of the flat parameters' bytes, in the model's dtype."""
    host = np.ascontiguousarray(model.backend.to_numpy(model.parameters))
    return hashlib.sha256(host.tobytes()).hexdigest()


def _model_facts(model: TwiceDifferentiable) -> dict[str, Any]:
    backend = model.backend
    framework = getattr(backend, "framework_module", backend.name)
    try:
        version = metadata.version(framework)
    except metadata.PackageNotFoundError:
        version = "unknown"
    host = model.backend.to_numpy(model.parameters)
    return {
        "backend": backend.name,
        "framework": framework,
        "framework_version": version,
        "num_params": int(model.num_params),
        "dtype": str(np.asarray(host).dtype),
        "parameters_sha256": _parameter_hash(model),
    }


def _influx_version() -> str:
    import influx

    return str(getattr(influx, "__version__", "unknown"))


def _where(path: Any) -> str:
    """``path`` as shown in errors (a file object by its type)."""
    if hasattr(path, "read"):
        return f"the {type(path).__name__} given"
    return repr(os.fspath(path))


def _read_header(arrays: dict[str, np.ndarray], path: Any) -> dict[str, Any]:
    raw = arrays.get("header")
    header = None
    if raw is not None and raw.dtype == np.uint8:
        try:
            header = json.loads(raw.tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise InputError(
            f"{_where(path)} is not a file written by influx.Influence.save."
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{_where(path)} has format version {header.get('format_version')}, "
            f"this influx reads version {FORMAT_VERSION}: fit and save again."
        )
    return header


def _check_same_model(header: dict[str, Any], model: Any, path: Any) -> None:
    facts = _model_facts(model)
    for key, what in (
        ("backend", "backend"),
        ("num_params", "parameter count"),
        ("dtype", "dtype"),
        ("parameters_sha256", "parameters (SHA-256)"),
    ):
        if facts[key] != header[key]:
            raise InputError(
                f"The model does not match the one {_where(path)} was fitted "
                f"on: its {what} is {facts[key]}, the saved one {header[key]}. "
                "Load with the same model, with the same parameters, or fit again."
            )


def _encode_options(solver: Solver) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The solver's options as JSON, and the array-valued ones as arrays."""
    options: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in solver.option_names():
        if not hasattr(solver, name):
            continue
        value = getattr(solver, name)
        if value is None or isinstance(value, bool | str):
            options[name] = value
        elif isinstance(value, int | np.integer):
            options[name] = int(value)
        elif isinstance(value, float | np.floating):
            options[name] = float(value)
        elif isinstance(value, NystromPreconditioner):
            options[name] = {
                "preconditioner": value.name,
                "rank": value.rank,
                "seed": value.seed,
            }
        elif hasattr(value, "shape"):
            key = f"option.{name}"
            arrays[key] = np.asarray(_to_host(value))
            options[name] = {"array": key}
        else:
            raise TypeError(
                f"cannot save the {solver.name} option {name}={value!r}: only "
                "numbers, strings, arrays and the Nystrom preconditioner can be "
                "saved."
            )
    return options, arrays


def _decode_options(
    options: dict[str, Any], arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, dict) and "array" in value:
            decoded[name] = arrays[value["array"]]
        elif isinstance(value, dict) and value.get("preconditioner") == "nystrom":
            decoded[name] = NystromPreconditioner(
                rank=value["rank"], seed=value["seed"]
            )
        else:
            decoded[name] = value
    return decoded


def _to_host(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    from influx.backends import detect_backend

    owner = detect_backend(array)
    return owner.to_numpy(array) if owner is not None else np.asarray(array)
