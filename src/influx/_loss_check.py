"""Checking once per data argument that the loss is a mean of per-sample losses.

influx takes ``loss(predictions, targets)`` to be the mean over the batch of
the per-sample loss, which is that loss on a batch of one. A sum reduction, a
class-weighted cross entropy (normalised by the sum of the weights), targets
equal to an ``ignore_index`` or targets that broadcast against the
predictions break this silently. On the first batch of at least two points of
each data argument, the gradient of the batch loss is compared with the mean
of the per-sample gradients, through the protocol only: ``grad(x, y)`` (an
optional method, or ``value_and_grad(x, y)`` which also compares the loss
values; a backend without either is not checked) and ``per_sample_grads(x,
y)``.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from influx._checks import ensure_finite, evaluate
from influx._host import host_view
from influx.errors import InputError
from influx.protocols import TwiceDifferentiable

__all__ = [
    "LOSS_CHECK_ENTRIES",
    "LossConventionCheck",
    "check_points",
    "describe_loss",
]

#: How the fix reads for each kind of mismatch.
_MEAN_FIX = (
    "Use a loss that averages over the batch: reduction='mean' (torch) or "
    "jnp.mean over the batch (JAX)."
)
_PER_SAMPLE_FIX = (
    "influx needs loss(predictions, targets) to be the mean over the batch of "
    "the loss on each point alone. Possible causes: class weights (a weighted "
    "cross entropy divides by the sum of the weights of the batch's targets: "
    "write it as a per-sample mean, e.g. (weight[y] * cross_entropy(predictions, "
    "y, reduction='none')).mean()); targets that broadcast against the "
    "predictions (targets of shape {y_shape}; e.g. y of shape [B] against "
    "predictions [B, 1] in a mean squared error: reshape y to the predictions' "
    "shape); a model or loss that mixes the points of a batch (a statistic of "
    "the batch)."
)


def describe_loss(model: Any) -> str:
    """A short name of the model's loss for error messages, e.g. ``MSELoss``.

    Uses the optional ``loss`` attribute of the wrapper; options that change
    the reduction (``reduction``, ``weight``, ``ignore_index``) are shown.
    """
    loss = getattr(model, "loss", None)
    if loss is None:
        return "the loss"
    name = getattr(loss, "__qualname__", None) or type(loss).__name__
    options = []
    reduction = getattr(loss, "reduction", None)
    if isinstance(reduction, str):
        options.append(f"reduction={reduction!r}")
    if getattr(loss, "weight", None) is not None:
        options.append("weight=...")
    ignore_index = getattr(loss, "ignore_index", None)
    if isinstance(ignore_index, int):
        options.append(f"ignore_index={ignore_index}")
    return f"the loss {name}({', '.join(options)})" if options else f"the loss {name}"


def tolerance(dtype: Any, xp: Any) -> float:
    """Relative tolerance of the comparison: ``eps ** (1/4)`` of ``dtype``.

    About 2e-2 for float32, 1e-4 for float64, 0.18 for float16 and 0.3 for
    bfloat16. Summation order moves the gradients by a few ``eps`` relative to
    their size (TF32 matmuls on GPUs by about 1e-3), far below this; a sum
    reduction, class weights or broadcasting targets move them by O(1).
    """
    return float(xp.finfo(dtype).eps) ** 0.25


#: Largest ``B * P`` for which the loss convention is checked on a whole batch
#: where no per-sample gradients are computed anyway (layer-wise scoring,
#: K-FAC, Hessian products); beyond it, on the batch's first ``2**24 // P``
#: points (at least 2), so that the check's per-sample gradients stay small.
LOSS_CHECK_ENTRIES = 1 << 24


def check_points(x: Any, y: Any, num_params: int) -> tuple[Any, Any]:
    """``(x, y)``, or their first points when the check's ``[B, P]`` is large."""
    keep = max(2, LOSS_CHECK_ENTRIES // max(num_params, 1))
    if not (hasattr(x, "shape") and hasattr(y, "shape")) or int(x.shape[0]) <= keep:
        return x, y
    return x[:keep], y[:keep]


class LossConventionCheck:
    """Checks the loss convention once, on the first batch of >= 2 points.

    Parameters
    ----------
    model
        The wrapped model. Its optional method ``value_and_grad(x, y) ->
        (loss [], grad [P])`` of the batch loss (or else ``grad(x, y)``) is
        compared with ``per_sample_grads``; a model with neither is not
        checked.
    name
        The data argument's name (``"training_data"``), used in errors.
    """

    def __init__(self, model: TwiceDifferentiable, name: str) -> None:
        self.model = model
        self.name = name
        self.done = not hasattr(model, "value_and_grad") and not hasattr(model, "grad")

    def __call__(
        self, index: int, x: Any, y: Any, per_sample: tuple[Any, Any] | None = None
    ) -> None:
        """Check batch ``index`` unless already done or it has fewer than 2 points.

        Parameters
        ----------
        index, x, y
            One batch, leading dimension ``B``.
        per_sample
            ``(grads [B, P], losses [B])`` if already computed.

        Raises
        ------
        InputError
            If the batch loss is not the mean of the per-sample losses.
        """
        if self.done or int(x.shape[0]) < 2:
            return
        self.done = True
        model, name = self.model, self.name
        if per_sample is None:
            per_sample = evaluate(name, index, x, model.per_sample_grads, x, y)
        # JAX on the CPU: compare in numpy (eager JAX compiles every small op).
        grads, losses = (_on_host(array) for array in per_sample)
        value, batch_grad = _batch_value_and_grad(model, name, index, x, y)
        batch = (value, _on_host(batch_grad))
        per_sample = (grads, losses)
        where = f"{name} batch {index}"
        _check_finite_per_sample(model, where, losses, batch[1])
        ensure_finite(grads, f"{where}: the loss gradient")
        ensure_finite(batch[1], f"{where}: the gradient of the batch loss")
        y_shape = tuple(getattr(y, "shape", ()))
        _compare(model, where, per_sample, batch, y_shape)


def _batch_value_and_grad(
    model: Any, name: str, index: int, x: Any, y: Any
) -> tuple[Any, Any]:
    """``(loss [] or None, grad [P])`` of the batch loss, by the optional methods."""
    if hasattr(model, "value_and_grad"):
        return evaluate(name, index, x, model.value_and_grad, x, y)
    return None, evaluate(name, index, x, model.grad, x, y)


def _check_finite_per_sample(
    model: Any, where: str, losses: Any, batch_grad: Any
) -> None:
    """NaN per-sample losses under a finite batch gradient: not a per-sample mean."""
    xp = array_namespace(losses)
    finite = xp.isfinite(losses)
    if bool(xp.all(finite)):
        return
    if not bool(xp.all(xp.isfinite(batch_grad))):
        ensure_finite(losses, f"{where}: the loss")
    bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    raise InputError(
        f"{where}: {describe_loss(model)} is NaN or inf on {len(bad)} of "
        f"{int(losses.shape[0])} points taken one at a time (points {shown} of the "
        "batch), while its gradient on the whole batch is finite, so the batch "
        "loss is not the mean of per-sample losses. Targets equal to the loss's "
        "ignore_index (torch CrossEntropyLoss(ignore_index=-100) is 0/0 on such a "
        "point alone) or a loss that divides by a statistic of the batch do this. "
        "Drop those points from the data (they do not enter the training loss), "
        "or write the loss as a mean of per-sample losses."
    )


def _compare(
    model: Any,
    where: str,
    per_sample: tuple[Any, Any],
    batch: tuple[Any, Any],
    y_shape: tuple[int, ...],
) -> None:
    """Raise if the batch loss and gradient are not the per-sample means.

    ``per_sample`` is ``(grads [B, P], losses [B])``, ``batch`` is ``(loss []
    or None, grad [P])``. Half precision is compared in float32, to the half
    dtype's tolerance.
    """
    grads, losses = per_sample
    value, batch_grad = batch
    xp = array_namespace(grads)
    tol = tolerance(grads.dtype, xp)
    wide = xp.float32 if xp.finfo(grads.dtype).bits < 32 else grads.dtype
    grads, batch_grad = xp.astype(grads, wide), xp.astype(batch_grad, wide)
    count = int(grads.shape[0])
    mean = xp.mean(grads, axis=0)
    scale = float(xp.mean(xp.linalg.vector_norm(grads, axis=1)))
    grad_off = _relative(float(xp.linalg.vector_norm(batch_grad - mean)), scale)
    grad_sum = _relative(
        float(xp.linalg.vector_norm(batch_grad - count * mean)), count * scale
    )
    value_off = value_sum = 0.0
    ratio = None
    if value is not None:
        losses = xp.astype(losses, wide)
        mean_loss = float(xp.mean(losses))
        loss_scale = float(xp.mean(xp.abs(losses)))
        batch_loss = float(value)
        value_off = _relative(abs(batch_loss - mean_loss), loss_scale)
        value_sum = _relative(abs(batch_loss - count * mean_loss), count * loss_scale)
        ratio = batch_loss / mean_loss if mean_loss != 0 else None
    if max(grad_off, value_off) <= tol:
        return
    loss = describe_loss(model)
    mean_norm = float(xp.linalg.vector_norm(mean))
    if ratio is None and mean_norm > 0:
        ratio = float(xp.sum(batch_grad * mean)) / mean_norm**2
    if max(grad_sum, value_sum) <= tol and ratio is not None:
        what = (
            "the batch loss and its gradient are"
            if value is not None
            else ("the gradient of the batch loss is")
        )
        raise InputError(
            f"{where}: for {loss} on a batch of {count} points, {what} "
            f"{ratio:.1f}x the mean of the per-sample ones: a sum reduction? "
            f"influx needs the mean over the batch. {_MEAN_FIX}"
        )
    measured = f"its gradient by {grad_off:.3g} relative to the per-sample norm"
    if value is not None:
        measured = f"the loss by {value_off:.3g} relative and {measured}"
    raise InputError(
        f"{where}: for {loss} on a batch of {count} points, the batch loss differs "
        f"from the mean of the per-sample losses: {measured} (tolerance "
        f"{tol:.1e}). " + _PER_SAMPLE_FIX.format(y_shape=y_shape)
    )


def _on_host(array: Any) -> Any:
    """A numpy view of ``array`` where it lives on the host, else ``array``."""
    view = host_view(array)
    return array if view is None else view


def _relative(difference: float, scale: float) -> float:
    """``difference / scale``; 0 for ``0 / 0``, inf for ``x / 0``."""
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else math.inf
