"""Declared schemas: a dataclass's type hints are its schema, checked strictly by pydantic in the dataclass itself.

Why in the dataclass: a value from the command line, a checkpoint or the Python API reaches the same dataclass
(``ScheduleConfig``, a solver, a warm start's knobs), so a check there cannot exist on one path only. Why strict:
``"no"`` is not a boolean, ``2.5`` and ``True`` are not integers, ``"16"`` is not a number, and a float must be
finite (NaN passes every ``<`` range test). Ranges are declared next to the type, ``Annotated[float, Gt(0)]``.
Every failure is one :class:`FieldError` line naming the key, the value and what is allowed; a caller that knows
the user's spelling of the key (``solver.options.``) re-keys it with :meth:`FieldError.under`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval, Le, Lt, MinLen
from pydantic import ConfigDict, TypeAdapter, ValidationError

from policy_accel.errors import ConfigError

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}

# Shorthands for the common declarations.
PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
UnitInterval = Annotated[float, Interval(ge=0, le=1)]


class FieldError(ConfigError):
    """One value that does not match its declaration: ``key=value is not allowed: <reason>``."""

    def __init__(self, key: str, value: Any, reason: str):
        super().__init__(f"{key}={value!r} is not allowed: {reason}")
        self.key, self.value, self.reason = key, value, reason

    def under(self, prefix: str) -> FieldError:
        """The same error with the key as the user spelled it (``prefix`` + the field's own name)."""
        return FieldError(prefix + self.key.rsplit(".", 1)[-1], self.value, self.reason)


def exact_int(value: Any) -> int:
    """An integer as written: an int, or a float without a fraction (96.0 from a JSON writer). ``96.5``, ``"96"``,
    ``true`` and ``inf`` raise ``ValueError`` instead of being truncated into a value nobody wrote."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or isinstance(value, float)
        and not math.isfinite(value)
        or int(value) != value
    ):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def describe(hint: Any) -> str:
    """What a type hint allows, in the words the error messages use ("an integer >= 1 or null")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        bounds = []
        for meta in args[1:]:
            for name, sign in _BOUNDS.items():
                bound = getattr(meta, name, None)
                if bound is not None:
                    bounds.append(f"{sign} {bound:g}")
            if getattr(meta, "min_length", None):
                bounds.append(f"of length >= {meta.min_length}")
        return " ".join([describe(args[0]), *bounds])
    if origin in (typing.Union, types.UnionType):
        named = [describe(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"a list of values, each {describe(args[0])}"
    if origin is Callable or hint is Callable:
        return "a callable"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint, config=_STRICT)


def check_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` if it matches ``hint`` exactly (strict, finite, in range); else a :class:`FieldError` for ``key``."""
    try:
        _adapter(hint).validate_python(value)
    except ValidationError:
        raise FieldError(key, value, "expected " + describe(hint)) from None
    return value


def check_fields(obj: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Check every init field of dataclass instance ``obj`` against its declared type (call from ``__post_init__``)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        if f.init and f.name not in skip:
            check_value(getattr(obj, f.name), hints[f.name], prefix + f.name)


def check_mapping(values: Mapping[str, Any], cls: type, prefix: str = "", owner: str = "") -> None:
    """Check a mapping meant for dataclass ``cls`` (options, a checkpoint's config): unknown keys, then each value.

    ``owner`` names what the options belong to in the unknown-key message;
    """
    if not isinstance(values, Mapping):
        raise FieldError(prefix.rstrip(".") or cls.__name__, values, "expected a mapping of options")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            where = f" of {owner}" if owner else ""
            raise FieldError(prefix + str(key), values[key], f"not an option{where} (options: {', '.join(names)})")
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, value in values.items():
        check_value(value, hints[name], prefix + name)


__all__ = [
    "FieldError",
    "Ge",
    "Gt",
    "Interval",
    "Le",
    "Lt",
    "MinLen",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "UnitInterval",
    "check_fields",
    "check_mapping",
    "check_options",
    "check_value",
    "exact_int",
    "describe",
]


def check_options(cfg: Any, schema: Mapping[str, Any]) -> None:
    """Check an entry point's config values (an OmegaConf config) against ``{key: hint}`` before any work starts."""
    from omegaconf import OmegaConf

    for key, hint in schema.items():
        value = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        check_value(value, hint, key)
