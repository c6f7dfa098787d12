"""Exceptions and warnings raised by influx."""

from __future__ import annotations

__all__ = [
    "InfluxWarning",
    "InputError",
    "NotConvergedWarning",
    "NotPositiveDefiniteWarning",
]


class InputError(ValueError):
    """Bad input: the message names the argument and says how to fix it."""


class InfluxWarning(UserWarning):
    """Base class of the warnings influx emits."""


class NotConvergedWarning(InfluxWarning):
    """An iterative solver stopped before reaching its tolerance."""


class NotPositiveDefiniteWarning(InfluxWarning):
    """The regularised Hessian is not positive definite."""
