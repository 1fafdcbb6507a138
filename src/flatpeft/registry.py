"""The method registry: registry names are the public contract (SPEC §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MethodConfig
    from .method import Method

__all__ = ["get_method", "list_methods", "make_config", "register"]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a :class:`~flatpeft.method.Method` subclass under its config's name."""
    name = cls.config_class.method
    if not name:
        raise TypeError(f"{cls.__name__}.config_class must set a non-empty `method` name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the known names.
    """
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(method: str | MethodConfig, **overrides: Any) -> MethodConfig:
    """A validated config from a registry name or a config instance, with ``overrides`` applied."""
    from .config import MethodConfig

    if isinstance(method, MethodConfig):
        get_method(method.method)
        return method.replace(**overrides) if overrides else method
    cls = get_method(method).config_class
    cls._check_keys(overrides)
    return cls(**overrides)
