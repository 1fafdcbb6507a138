"""Typed, frozen, validated method configurations.

Every method has one config dataclass derived from :class:`MethodConfig`. Fields are declared with
:func:`option`, which records the help text and the allowed range; validation is generic (types,
``Literal`` choices, finiteness, ranges) so a config class is only a list of documented fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

__all__ = ["MethodConfig", "option"]


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    strength: bool = False,
) -> Any:
    """Declare a config field with its help text and allowed numeric range.

    Args:
        default: Default value (immutable).
        help: One-line description shown by ``flatpeft methods`` and in error messages.
        min: Smallest allowed value (inclusive unless ``min_exclusive``).
        max: Largest allowed value (inclusive).
        min_exclusive: Whether ``min`` itself is excluded.
        strength: Marks the perturbation strength (ρ, σ); setting every strength field to 0 must make
            the method reproduce plain ``loss.backward()``.
    """
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "strength": strength}
    return dataclasses.field(default=default, metadata=meta)


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    left = "(" if meta.get("min_exclusive") else "["
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


@dataclass(frozen=True)
class MethodConfig:
    """Base class of every method configuration.

    Subclasses set the class attribute ``method`` (the registry name) and declare their fields with
    :func:`option`. Instances are immutable; use :meth:`replace` to derive a modified copy.
    """

    method: ClassVar[str] = ""

    seed: int = option(0, "Seed of every random draw the method makes (same seed, same run).", min=0)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = self._check_field(f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ``ValueError`` naming the fields."""

    def _check_field(self, f: dataclasses.Field, hint: Any, value: Any) -> Any:
        name = f"{type(self).__name__}.{f.name}"
        optional = False
        if get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in get_args(hint) if a is not type(None)]
            optional = len(args) < len(get_args(hint))
            hint = args[0] if len(args) == 1 else hint
        if value is None:
            if optional:
                return None
            raise ValueError(f"{name} must not be None")
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
            return value
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool (true/false), got {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        elif hint is str and not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r}")
        meta = f.metadata
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)):
            too_low = lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo)
            too_high = hi is not None and value > hi
            if too_low or too_high:
                raise ValueError(f"{name} must be in {_range_text(meta)}, got {value!r}")
        return value

    # -- serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, including the ``method`` name."""
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self, **kwargs: Any) -> str:
        """The config as a JSON string (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        cls._check_keys(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MethodConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> MethodConfig:
        """A validated copy with ``overrides`` applied; unknown fields raise ``ValueError``."""
        self._check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def _check_keys(cls, keys: Any) -> None:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(keys) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {cls.method!r}; known options: {known}")

    @classmethod
    def has_field(cls, name: str) -> bool:
        """Whether this config declares a field ``name`` (e.g. ``total_steps``)."""
        return any(f.name == name for f in dataclasses.fields(cls))

    @classmethod
    def strength_fields(cls) -> list[str]:
        """Names of the fields declared with ``strength=True`` (ρ, σ, ...)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("strength")]

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """``(name, default, help)`` for every field, for listings and ``--help``."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
