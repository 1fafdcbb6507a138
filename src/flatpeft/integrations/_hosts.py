"""What the axolotl plugin and the LLaMA-Factory launcher share (SPEC §2).

Both hosts read a YAML file; flatpeft adds two keys to it::

    flatpeft_method: flat_lora        # a registry name (flatpeft methods lists them)
    flatpeft_config: {sigma: 0.05}    # the method's options, as in flatpeft.attach(model, method, **options)

This module validates those keys with the registry's own checks (the same errors as
:func:`flatpeft.attach`), builds a host's trainer class with :class:`FlatTrainerMixin` mixed in, and
puts a trained model's adapter in its stock PEFT form for a host that saves with
``model.save_pretrained`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .. import _peft
from ..method import _ATTR, Method
from ..registry import get_method, make_config
from .transformers import FlatTrainerMixin, _with_placeholder_steps

__all__ = ["KEYS", "attached_method", "export_adapter", "flat_trainer_class", "read_method"]

#: The YAML keys flatpeft adds to a host's config file.
KEYS = ("flatpeft_method", "flatpeft_config")


def read_method(values: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The validated ``(method, options)`` of a host config, or ``None`` without ``flatpeft_method``.

    Args:
        values: The host's config (a mapping holding the keys of :data:`KEYS`).

    Raises:
        ValueError: unknown method or option, an invalid option value (the messages of
            :func:`flatpeft.attach`), or ``flatpeft_config`` without ``flatpeft_method``.
        TypeError: ``flatpeft_method`` not a string or ``flatpeft_config`` not a mapping.
    """
    method, options = values.get("flatpeft_method"), values.get("flatpeft_config")
    if method is None:
        if options:
            raise ValueError(
                "flatpeft_config is set but flatpeft_method is not; add e.g. `flatpeft_method: flat_lora`"
            )
        return None
    if not isinstance(method, str):
        raise TypeError(f"flatpeft_method must be a method name such as flat_lora, got {method!r}")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(
            "flatpeft_config must be a mapping of option names to values, e.g. {sigma: 0.05}, "
            f"got {options!r}"
        )
    options = {str(k): v for k, v in options.items()}
    make_config(method, **_with_placeholder_steps(method, options))  # raises as attach() would
    return method, options


def is_bilevel(method: str) -> bool:
    """Whether ``method`` trains on two data splits in a level order (``needs_upper_loss``)."""
    return get_method(method).needs_upper_loss


def flat_trainer_class(base: type, method: str, options: Mapping[str, Any]) -> type:
    """``base`` (a ``transformers.Trainer`` subclass) with :class:`FlatTrainerMixin` mixed in, training
    with ``method`` and ``options`` unless its constructor is given ``method``/``method_config``."""
    options = dict(options)

    class Flat(FlatTrainerMixin, base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("method", method)
            kwargs.setdefault("method_config", dict(options))
            super().__init__(*args, **kwargs)

    Flat.__name__ = Flat.__qualname__ = f"Flat{base.__name__}"
    Flat.__module__ = __name__
    return Flat


def attached_method(model: nn.Module) -> Method | None:
    """The flatpeft method attached to ``model`` (a PEFT model, possibly wrapped), if any."""
    return getattr(_peft.unwrap_model(model), _ATTR, None)


def export_adapter(model: nn.Module) -> bool:
    """Detach the method attached to ``model``, leaving the stock PEFT LoRA adapter a plain
    ``model.save_pretrained`` writes (auxiliary adapters removed, a per-rank scale folded in).

    Idempotent: returns whether a method was detached (``False`` when none is attached).
    """
    method = attached_method(model)
    if method is None:
        return False
    method.detach()
    return True
