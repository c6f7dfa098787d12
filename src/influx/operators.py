"""Linear operators on the flat parameter space.

An operator ``A`` of size ``P`` acts on a stack of vectors at once:
``op.mv(V)`` takes ``V`` of shape ``[K, P]`` and returns ``[K, P]`` whose row
``k`` is ``A @ V[k]``. Operators compose (``A + B``, ``c * A``,
``A.shift(lam)``) and carry tags (``"symmetric"``, ``"positive_semidefinite"``,
``"positive_definite"``) that solvers may rely on.

The central one is :class:`HessianOperator`, the Hessian of the training loss
averaged over *all* training points: batches of unequal size are weighted by
their size. The arithmetic is written once against the array API
(``array_api_compat.array_namespace``), so the same code runs on every backend.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from influx._checks import check_parameters, ensure_finite, evaluate
from influx._loss_check import LossConventionCheck, check_points
from influx._memory import check_dense_fits
from influx._progress import progress_iter
from influx.data import DataReader
from influx.errors import InputError
from influx.protocols import Backend, TwiceDifferentiable

__all__ = [
    "CURVATURES",
    "DenseOperator",
    "HessianOperator",
    "LinearOperator",
    "ScaledOperator",
    "ShiftedOperator",
    "SumOperator",
    "check_curvature",
    "split_shift",
]

SYMMETRIC = "symmetric"
PSD = "positive_semidefinite"
PD = "positive_definite"

#: A function ``V -> A_sample @ V`` whose expectation is ``A @ V``.
SampleMatvec = Callable[[Any], Any]


class LinearOperator(abc.ABC):
    """A square linear map on vectors of length :attr:`size`, applied row-wise."""

    #: Length ``P`` of the vectors the operator acts on.
    size: int
    #: Properties solvers may rely on.
    tags: frozenset[str] = frozenset()

    @property
    @abc.abstractmethod
    def like(self) -> Any:
        """A native array giving the operator's namespace, dtype and device."""

    @property
    def backend(self) -> Backend | None:
        """The backend of the operator's arrays, if it has one."""
        return None

    @property
    def dtype(self) -> Any:
        """Native dtype in which the operator computes."""
        return self.like.dtype

    @abc.abstractmethod
    def mv(self, vectors: Any) -> Any:
        """Apply the operator to each row of ``vectors``.

        Parameters
        ----------
        vectors
            Shape ``[K, P]``, any floating dtype of the operator's namespace.

        Returns
        -------
        Any
            Shape ``[K, P]``, in the dtype of ``vectors``.
        """

    def to_dense(self, progress: bool = False, *, dtype: Any = None) -> Any:
        """The operator as a matrix ``[P, P]``.

        The default applies :meth:`mv` to chunks of the identity
        (:func:`identity_chunks`).

        Parameters
        ----------
        progress
            Show a progress bar, where the operator has one.
        dtype
            Native dtype of the result, in which the products are accumulated;
            ``None`` means :attr:`dtype`.
        """
        xp = array_namespace(self.like)
        dtype = self.dtype if dtype is None else dtype
        itemsize = xp.finfo(dtype).bits // 8
        check_dense_fits(self.size, itemsize, 3, "materialising the Hessian")
        rows = [
            self.mv(chunk) for chunk in identity_chunks(self.size, self.like, dtype)
        ]
        return xp.concat(rows, axis=0)[: self.size].T

    def sample_matvecs(self, rng: np.random.Generator) -> Iterator[SampleMatvec]:
        """Endless stream of unbiased, cheap estimates of :meth:`mv`.

        Stochastic solvers (LiSSA) draw one per step. The default is exact.
        """
        while True:
            yield self.mv

    def batch_matvecs(self) -> list[SampleMatvec] | None:
        """Every distinct product that :meth:`sample_matvecs` can draw.

        Stochastic solvers use these to bound the spectrum of each batch
        operator ``A_t`` (with the unbiasing weight the draws apply). ``None``
        when the operator cannot list them; the default lists :meth:`mv` for
        an operator whose samples are exact.
        """
        return [self.mv] if self.samples_per_pass == 1 else None

    @property
    def samples_per_pass(self) -> int:
        """How many draws of :meth:`sample_matvecs` cost one :meth:`mv`.

        ``1`` for an operator whose samples are exact; the number of batches
        for the Hessian of a training set.
        """
        return 1

    def shift(self, amount: float) -> LinearOperator:
        """``A + amount * I``."""
        return ShiftedOperator(self, amount)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __mul__(self, factor: float) -> LinearOperator:
        if not isinstance(factor, int | float | np.floating | np.integer):
            return NotImplemented
        return ScaledOperator(self, float(factor))

    __rmul__ = __mul__

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy an array of the operator's namespace to the host."""
        backend = self.backend
        return backend.to_numpy(array) if backend is not None else np.asarray(array)

    def from_numpy(self, array: np.ndarray) -> Any:
        """Convert a host array to the operator's namespace, dtype and device."""
        backend = self.backend
        if backend is not None:
            return backend.asarray(array, like=self.like)
        xp = array_namespace(self.like)
        return xp.asarray(array, dtype=self.dtype, device=array_device(self.like))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, tags={sorted(self.tags)})"


class DenseOperator(LinearOperator):
    """An explicit matrix ``[P, P]`` as an operator.

    Parameters
    ----------
    matrix
        Square array of any array-API namespace.
    tags
        Properties known of ``matrix`` (``"symmetric"``, ...).
    backend
        The backend of ``matrix``, for conversions to and from numpy.
    """

    def __init__(
        self,
        matrix: Any,
        tags: frozenset[str] = frozenset(),
        backend: Backend | None = None,
    ) -> None:
        shape = tuple(matrix.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise InputError(f"matrix must be square, got shape {shape}.")
        self.matrix = matrix
        self.size = shape[0]
        self.tags = frozenset(tags)
        self._backend = backend

    @property
    def like(self) -> Any:
        return self.matrix

    @property
    def backend(self) -> Backend | None:
        return self._backend

    def mv(self, vectors: Any) -> Any:
        xp = array_namespace(vectors)
        matrix = xp.astype(self.matrix, vectors.dtype)
        return vectors @ matrix.T

    def to_dense(self, progress: bool = False, *, dtype: Any = None) -> Any:
        if dtype is None:
            return self.matrix
        return array_namespace(self.matrix).astype(self.matrix, dtype)


class _CompositeOperator(LinearOperator):
    """Shares ``like``, ``backend`` and sampling cost with the first operand."""

    _base: LinearOperator

    @property
    def samples_per_pass(self) -> int:
        second = getattr(self, "second", None)
        own = self._base.samples_per_pass
        return own if second is None else max(own, second.samples_per_pass)

    @property
    def like(self) -> Any:
        return self._base.like

    @property
    def backend(self) -> Backend | None:
        return self._base.backend


class ShiftedOperator(_CompositeOperator):
    """``A + amount * I``; positive definite when ``A`` is PSD and ``amount > 0``."""

    def __init__(self, base: LinearOperator, amount: float) -> None:
        amount = float(amount)
        if not np.isfinite(amount):
            raise InputError(f"the shift must be finite, got {amount}.")
        self._base, self.amount, self.size = base, amount, base.size
        tags = set(base.tags)
        if amount < 0:
            tags -= {PSD, PD}
        elif PSD in base.tags and amount > 0:
            tags.add(PD)
        self.tags = frozenset(tags)

    @property
    def base(self) -> LinearOperator:
        """The unshifted operator ``A``."""
        return self._base

    def mv(self, vectors: Any) -> Any:
        return self._base.mv(vectors) + self.amount * vectors

    def to_dense(self, progress: bool = False, *, dtype: Any = None) -> Any:
        dense = _dense(self._base, progress, dtype)
        if self.amount == 0.0:
            return dense
        xp = array_namespace(dense)
        eye = xp.eye(self.size, dtype=dense.dtype, device=array_device(dense))
        return dense + self.amount * eye

    def sample_matvecs(self, rng: np.random.Generator) -> Iterator[SampleMatvec]:
        for sample in self._base.sample_matvecs(rng):
            yield lambda v, sample=sample: sample(v) + self.amount * v

    def batch_matvecs(self) -> list[SampleMatvec] | None:
        products = self._base.batch_matvecs()
        if products is None:
            return None
        return [lambda v, p=p: p(v) + self.amount * v for p in products]


class ScaledOperator(_CompositeOperator):
    """``factor * A``."""

    def __init__(self, base: LinearOperator, factor: float) -> None:
        self._base, self.factor, self.size = base, float(factor), base.size
        tags = set(base.tags) & {SYMMETRIC}
        if factor > 0:
            tags |= set(base.tags) & {PSD, PD}
        self.tags = frozenset(tags)

    def mv(self, vectors: Any) -> Any:
        return self.factor * self._base.mv(vectors)

    def to_dense(self, progress: bool = False, *, dtype: Any = None) -> Any:
        return self.factor * _dense(self._base, progress, dtype)

    def sample_matvecs(self, rng: np.random.Generator) -> Iterator[SampleMatvec]:
        for sample in self._base.sample_matvecs(rng):
            yield lambda v, sample=sample: self.factor * sample(v)

    def batch_matvecs(self) -> list[SampleMatvec] | None:
        products = self._base.batch_matvecs()
        if products is None:
            return None
        return [lambda v, p=p: self.factor * p(v) for p in products]


class SumOperator(_CompositeOperator):
    """``A + B`` of two operators of the same size."""

    def __init__(self, first: LinearOperator, second: LinearOperator) -> None:
        if first.size != second.size:
            raise InputError(
                f"cannot add operators of sizes {first.size} and {second.size}."
            )
        self._base, self.second, self.size = first, second, first.size
        common = first.tags & second.tags
        tags = set(common & {SYMMETRIC, PSD})
        if PSD in common and (PD in first.tags or PD in second.tags):
            tags.add(PD)
        self.tags = frozenset(tags)

    def mv(self, vectors: Any) -> Any:
        return self._base.mv(vectors) + self.second.mv(vectors)

    def to_dense(self, progress: bool = False, *, dtype: Any = None) -> Any:
        first = _dense(self._base, progress, dtype)
        return first + _dense(self.second, progress, dtype)

    def sample_matvecs(self, rng: np.random.Generator) -> Iterator[SampleMatvec]:
        for a, b in zip(
            self._base.sample_matvecs(rng),
            self.second.sample_matvecs(rng),
            strict=False,
        ):
            yield lambda v, a=a, b=b: a(v) + b(v)

    def batch_matvecs(self) -> list[SampleMatvec] | None:
        # Only when one operand is exact: two sampled operands are drawn
        # independently, so their pairs are not a short list.
        first, second = self._base, self.second
        if second.samples_per_pass > 1:
            first, second = second, first
        if second.samples_per_pass > 1:
            return None
        products = first.batch_matvecs()
        if products is None:
            return None
        return [lambda v, p=p: p(v) + second.mv(v) for p in products]


def _dense(operator: LinearOperator, progress: bool, dtype: Any) -> Any:
    """``operator.to_dense``, passing ``dtype`` only when one is asked for.

    An operator written before ``to_dense`` took ``dtype`` keeps working.
    """
    if dtype is None:
        return operator.to_dense(progress)
    return operator.to_dense(progress, dtype=dtype)


#: Rows of the identity in one batched product when materialising a matrix.
IDENTITY_CHUNK = 256


def identity_chunks(size: int, like: Any, dtype: Any) -> Iterator[Any]:
    """The rows of the ``[P, P]`` identity, a chunk ``[C, P]`` at a time.

    ``ceil(P / 256)`` chunks of one size ``C <= 256``; the last one is padded
    with zero rows (fewer than the number of chunks), so that a backend that
    compiles per shape (JAX) compiles one. Each chunk is built when needed:
    never the whole identity.

    Parameters
    ----------
    size
        ``P``.
    like
        A native array: the namespace and device of the chunks.
    dtype
        Their native dtype.

    Yields
    ------
    Any
        ``[C, P]``; row ``r`` of chunk ``i`` is ``e_{i C + r}`` (or zero past
        ``P``).
    """
    xp = array_namespace(like)
    count = -(-size // IDENTITY_CHUNK)
    rows = -(-size // count)
    for start in range(0, size, rows):
        yield xp.eye(rows, size, k=start, dtype=dtype, device=array_device(like))


def split_shift(operator: LinearOperator) -> tuple[LinearOperator, float]:
    """``(H, mu)`` for ``operator = H + mu I`` (nested shifts add up).

    An operator that is not a shift comes back as ``(operator, 0.0)``.
    """
    shift = 0.0
    while isinstance(operator, ShiftedOperator):
        shift += operator.amount
        operator = operator.base
    return operator, shift


class ModelPlacedOperator(LinearOperator):
    """An operator whose arrays are a model's, or numpy views in host mode.

    In host mode (JAX on the CPU, see :mod:`influx._host`) the solvers work on
    numpy arrays and the operator has no backend; otherwise its arrays are the
    model's native ones.
    """

    model: TwiceDifferentiable
    host: bool = False
    _host_like: Any = None

    def _place(self, model: TwiceDifferentiable, host: bool) -> None:
        self.model, self.host = model, bool(host)
        self._host_like = (
            np.asarray(model.backend.to_numpy(model.parameters)) if host else None
        )

    @property
    def like(self) -> Any:
        return self._host_like if self.host else self.model.parameters

    @property
    def backend(self) -> Backend | None:
        return None if self.host else self.model.backend


#: The curvature matrices :class:`HessianOperator` can average over the data.
CURVATURES = ("hessian", "ggn")


def check_curvature(curvature: Any, model: TwiceDifferentiable) -> str:
    """``curvature`` checked and lower-cased; ``"ggn"`` needs the model's ``ggnvp``.

    Raises
    ------
    InputError
        For a name other than ``"hessian"`` or ``"ggn"``, or ``"ggn"`` with a
        model whose adapter has no Gauss-Newton products.
    """
    if not isinstance(curvature, str) or curvature.strip().lower() not in CURVATURES:
        raise InputError(
            f"curvature must be 'hessian' or 'ggn', got {curvature!r}. 'ggn' is "
            "the generalised Gauss-Newton matrix J^T H_out J (positive semi-"
            "definite for convex losses such as cross-entropy and squared error)."
        )
    name = curvature.strip().lower()
    if name == "ggn" and not callable(getattr(model, "ggnvp", None)):
        raise InputError(
            f"curvature='ggn' needs Gauss-Newton products, and the "
            f"{model.backend.name!r} backend's {type(model).__name__} has no "
            "ggnvp(x, y, vectors) method: use curvature='hessian', or a backend "
            "that implements it (torch and jax do)."
        )
    return name


class HessianOperator(ModelPlacedOperator):
    """Curvature of the training loss ``L(theta) = (1/N) sum_i l(z_i, theta)``.

    The Hessian of ``L`` (default), or with ``curvature="ggn"`` its
    generalised Gauss-Newton matrix ``(1/N) sum_i J_i^T H_i J_i`` (``J_i`` the
    Jacobian of the model's outputs for point ``i`` in ``theta``, ``H_i`` the
    Hessian of the loss in those outputs), which leaves out the second
    derivatives of the network and is positive semi-definite for a loss
    convex in the outputs.

    Each product reads the whole training set once and weights every batch by
    its size, so a short last batch counts for exactly its points. Products
    are computed in the model's dtype and accumulated in the dtype of the
    vectors passed in (pass float64 vectors to accumulate in float64).

    Parameters
    ----------
    model
        The wrapped model.
    training_data
        A re-iterable of ``(x, y)`` batches.
    progress
        Show a progress bar while materialising the Hessian.
    curvature
        ``"hessian"`` (default; the adapter's ``hvp``) or ``"ggn"`` (its
        ``ggnvp``).
    host
        Run the operator's own arithmetic in numpy on the host: products and
        the Hessian come back as numpy arrays, and ``like`` is a numpy view
        of the parameters, so a solver on top runs in numpy too. Only the
        model's derivatives run in its framework. For frameworks that compile
        each eager operation (JAX on the CPU, see ``influx._host``).

    Attributes
    ----------
    num_passes
        How many times the training data has been read for products.
    """

    tags = frozenset({SYMMETRIC})

    def __init__(
        self,
        model: TwiceDifferentiable,
        training_data: Any,
        *,
        progress: bool = False,
        name: str = "training_data",
        host: bool = False,
        curvature: str = "hessian",
    ) -> None:
        check_parameters(model)
        self.curvature = check_curvature(curvature, model)
        if self.curvature == "ggn":
            self.tags = frozenset({SYMMETRIC})  # PSD only for convex losses
        self.model = model
        self.size = model.num_params
        self.reader = DataReader(training_data, name, model.backend, model.parameters)
        self.progress = progress
        self.num_passes = 0
        self._loss_check = LossConventionCheck(model, name)
        self._place(model, host)

    def _native(self, compute: Any, *args: Any) -> Any:
        """``compute(*args)`` on the model; its result on the host in host mode."""
        if not self.host:
            return compute(*args)
        # Host mode is for JAX on the CPU, whose compiled functions take numpy.
        return np.asarray(self.model.backend.to_numpy(compute(*args)))

    def _batch_hvp(
        self,
        index: int,
        x: Any,
        y: Any,
        vectors: Any,
        what: str = "the Hessian-vector product",
    ) -> Any:
        xp = array_namespace(vectors)
        name = self.reader.name
        model_vectors = xp.astype(vectors, self.dtype)
        self._loss_check(index, *check_points(x, y, self.size))
        compute = self.model.ggnvp if self.curvature == "ggn" else self.model.hvp
        product = evaluate(name, index, x, self._native, compute, x, y, model_vectors)
        ensure_finite(product, f"{name} batch {index}: {what}")
        return xp.astype(product, vectors.dtype)

    def mv(self, vectors: Any) -> Any:
        total, count = self.weighted_sum(vectors)
        self.num_passes += 1
        return total / count

    def weighted_sum(self, vectors: Any) -> tuple[Any, int]:
        """One pass: ``(sum_b n_b A_b V, N)``, the product before the mean.

        ``A_b`` is batch ``b``'s curvature, ``n_b`` its size; :meth:`mv` is
        the sum divided by ``N``. A distributed operator adds the sums of the
        training partitions (``influx._distributed_fit``).

        Parameters
        ----------
        vectors
            ``[K, P]``; the sum is accumulated in their dtype.

        Returns
        -------
        tuple
            The sum ``[K, P]`` and the number of points read.
        """
        total, count = None, 0
        for index, x, y in self.reader:
            n = int(x.shape[0])
            term = n * self._batch_hvp(index, x, y, vectors)
            total = term if total is None else total + term
            count += n
        return total, count

    def to_dense(self, progress: bool | None = None, *, dtype: Any = None) -> Any:
        """The Hessian ``[P, P]``, from batched :meth:`hvp` products, in one pass.

        Every batch multiplies the chunks of the identity
        (:func:`identity_chunks`, at most 256 rows each, all of one size so
        that a compiled backend compiles one shape); each chunk's products
        are accumulated over the batches, weighted by the batch sizes. About
        two ``[P, P]`` matrices are alive at once (the chunks' sums, then the
        result); the memory guard allows for three.

        Parameters
        ----------
        progress
            Show a progress bar over the batches; ``None`` means the
            operator's ``progress``.
        dtype
            Native dtype of the vectors, the products' accumulation and the
            result; ``None`` means the model's. A wider one (float32 for a
            half-precision model) accumulates in it while the model computes
            in its own.
        """
        show = self.progress if progress is None else progress
        xp = array_namespace(self.like)
        dtype = self.dtype if dtype is None else dtype
        itemsize = xp.finfo(dtype).bits // 8
        check_dense_fits(self.size, itemsize, 3, "materialising the Hessian")
        dense, count = self.dense_sum(show, dtype)
        self.num_passes += 1
        # Row k is H e_k; the transpose makes it H itself (equal up to rounding).
        return dense.T / count

    def dense_sum(self, progress: bool, dtype: Any) -> tuple[Any, int]:
        """One pass: ``(S, N)`` with row ``k`` of ``S`` ``sum_b n_b A_b e_k``.

        :meth:`to_dense` is ``S^T / N``. A distributed operator adds the sums
        of the training partitions (``influx._distributed_fit``).

        Parameters
        ----------
        progress
            Show a progress bar over the batches.
        dtype
            Native dtype of the products' accumulation.

        Returns
        -------
        tuple
            ``S`` ``[P, P]`` and the number of points read.
        """
        xp = array_namespace(self.like)
        totals: list[Any] | None = None
        count = 0
        batches = progress_iter(
            self.reader, progress, "Hessian", total=self.reader.num_batches
        )
        for index, x, y in batches:
            n = int(x.shape[0])
            terms = [
                n * self._batch_hvp(index, x, y, chunk, "the Hessian")
                for chunk in identity_chunks(self.size, self.like, dtype)
            ]
            if totals is None:
                totals = terms
            else:
                totals = [t + term for t, term in zip(totals, terms, strict=True)]
            del terms
            count += n
        if totals is None:  # an empty reader raises before this
            raise InputError(f"{self.reader.name} is empty: pass at least one point.")
        dense = xp.concat(totals, axis=0)[: self.size]
        del totals
        return dense, count

    @property
    def samples_per_pass(self) -> int:
        known = self.reader.num_batches
        return known if known is not None else sum(1 for _ in self.reader)

    def sample_matvecs(self, rng: np.random.Generator) -> Iterator[SampleMatvec]:
        """One batch per step, uniformly at random among the batches.

        Each estimate is scaled by ``num_batches * batch_size / N`` so that it
        is unbiased also when batch sizes differ. Each step draws its batch
        from ``rng`` independently, with replacement: visiting the batches in
        a fixed or per-epoch order correlates the batch with the iterate and
        biases the LiSSA fixed point. A sequence (a list,
        :func:`influx.batches`) is indexed directly; any other iterable (a
        ``DataLoader``, read in order as by the other products) is read once
        and its converted batches are kept in memory for the draws.
        """
        reader = self.reader
        data = reader.source
        if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            num_batches = len(data)

            def draw(i: int) -> tuple[int, Any, Any] | None:
                prepared = reader.prepare(i, data[i])
                return None if prepared is None else (i, *prepared)

        else:
            cache = list(reader)
            num_batches = len(cache)

            def draw(i: int) -> tuple[int, Any, Any] | None:
                return cache[i]

        num_samples = reader.num_samples
        while True:
            for i in rng.integers(num_batches, size=num_batches):
                item = draw(int(i))
                if item is not None:
                    yield self._sample(item, num_batches, num_samples)

    def batch_matvecs(self) -> list[SampleMatvec] | None:
        """One product per batch (zero for an empty one), weighted as the draws."""
        reader = self.reader
        data = reader.data
        num_samples = reader.num_samples
        if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            cache = list(reader)  # as sample_matvecs does
            return [self._sample(item, len(cache), num_samples) for item in cache]
        num_batches = len(data)

        def product(vectors: Any, i: int) -> Any:
            prepared = reader.prepare(i, data[i])  # read when applied, not kept
            if prepared is None:
                return 0.0 * vectors
            return self._sample((i, *prepared), num_batches, num_samples)(vectors)

        return [functools.partial(product, i=i) for i in range(num_batches)]

    def _sample(
        self, item: tuple[int, Any, Any], num_batches: int, num_samples: int
    ) -> SampleMatvec:
        index, x, y = item
        weight = num_batches * int(x.shape[0]) / num_samples
        return lambda v: weight * self._batch_hvp(index, x, y, v)
