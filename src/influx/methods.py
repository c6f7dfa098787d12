"""The names of the inversion methods and influence types."""

from __future__ import annotations

from enum import Enum

from influx.errors import InputError

__all__ = ["InfluenceType", "InversionMethod"]


class InversionMethod(str, Enum):
    """How the inverse Hessian-vector products are computed.

    Plain strings (``"cg"``) are accepted wherever a member is.
    """

    Direct = "direct"
    Cg = "cg"
    Lissa = "lissa"
    Arnoldi = "arnoldi"
    Kfac = "kfac"
    Ekfac = "ekfac"
    Block = "block"

    def __str__(self) -> str:
        return self.value


class InfluenceType(str, Enum):
    """Which influence to compute.

    ``Up`` is the effect of up-weighting a training point, ``Perturbation``
    the effect of perturbing its input.
    """

    Up = "up"
    Perturbation = "perturbation"

    def __str__(self) -> str:
        return self.value


def _parse(enum: type[Enum], value: object, argument: str) -> Enum:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        for member in enum:  # type: ignore[var-annotated]
            if value.strip().lower() == member.value:
                return member
    valid = ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]
    raise InputError(f"Unknown {argument} {value!r}. Valid values: {valid}.")


def parse_inversion_method(value: object) -> InversionMethod:
    """``value`` (a member or its string) as an :class:`InversionMethod`."""
    return _parse(InversionMethod, value, "inversion_method")  # type: ignore[return-value]


def parse_influence_type(value: object) -> InfluenceType:
    """``value`` (a member or its string) as an :class:`InfluenceType`."""
    return _parse(InfluenceType, value, "influence_type")  # type: ignore[return-value]
