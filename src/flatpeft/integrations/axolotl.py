"""axolotl plugin: train with a flatpeft method from an axolotl YAML file (SPEC §2).

Three lines in an axolotl (0.21) config with ``adapter: lora`` (or ``qlora``)::

    plugins:
      - flatpeft.integrations.axolotl.FlatPeftPlugin
    flatpeft_method: flat_lora
    flatpeft_config: {sigma: 0.05}

then ``axolotl train config.yaml`` (``accelerate launch -m axolotl.cli.train`` for several GPUs) as
usual. The plugin

- declares the two keys (:class:`FlatPeftArgs`, axolotl drops undeclared keys) and validates them with
  the registry's own checks, so an unknown method or option gets the error of :func:`flatpeft.attach`;
- trains with axolotl's own trainer class with
  :class:`~flatpeft.integrations.transformers.FlatTrainerMixin` mixed in (:meth:`get_trainer_cls`);
- turns axolotl's fused LoRA kernels (:data:`KERNEL_KEYS`) off when the YAML leaves them unset
  (axolotl switches them on for ``adapter: lora``) and refuses a YAML that sets one to ``true``: they
  bypass PEFT's ``lora.Linear.forward``, where Flat-LoRA's perturbed base and Bi-LoRA's second adapter
  act, so the method would silently not run;
- refuses RL and reward-model trainers (``rl``, ``reward_model``, ``process_reward_model``: TRL and
  axolotl trainers with steps of their own that the mixin does not wrap), a config without a LoRA
  adapter, and bi-level methods (BiLoRA) with ``sample_packing`` (axolotl's multipack sampler would
  replace the sampler that orders D1 and D2 batches by level);
- exports in :meth:`post_train`, which axolotl calls before its final ``model.save_pretrained``: the
  method is detached, so the adapter saved is stock PEFT with no auxiliary keys (idempotent: axolotl
  calls ``post_train`` again after saving, and then nothing is left to do).

The module imports without axolotl (its pure logic is tested without it); :class:`FlatPeftPlugin`
derives from axolotl's ``BasePlugin`` when axolotl is installed.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from ._hosts import KEYS, export_adapter, flat_trainer_class, is_bilevel, read_method

__all__ = ["KERNEL_KEYS", "FlatPeftArgs", "FlatPeftPlugin", "check_config", "trainer_base"]

log = logging.getLogger(__name__)

#: axolotl's fused LoRA kernel switches; each replaces PEFT's LoRA forward with a fused autograd function.
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")

# key -> why a true value is refused
_REFUSED = {
    "rl": "axolotl's RL trainers (DPO, KTO, ORPO, GRPO, ...) are TRL trainers with steps of their own that "
    "flatpeft does not wrap",
    "reward_model": "the reward-model trainer computes a pairwise loss flatpeft does not wrap",
    "process_reward_model": "the process-reward-model trainer is not the causal trainer flatpeft extends",
}

try:  # axolotl is optional: the plugin's logic is importable (and tested) without it
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - depends on the environment
    BasePlugin = object  # type: ignore[assignment,misc]

try:
    from pydantic import BaseModel, model_validator
except ImportError:  # pragma: no cover - pydantic comes with axolotl
    BaseModel = None  # type: ignore[assignment,misc]


def check_config(cfg: MutableMapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Validate flatpeft's keys of an axolotl config and apply the kernel rule, in place.

    Called on the raw YAML mapping before axolotl validates it (so the kernel switches set here win
    over axolotl's automatic ones). Without ``flatpeft_method`` the config is left alone.

    Returns:
        ``(method, options)``, or ``None`` without ``flatpeft_method``.

    Raises:
        ValueError: an unknown method or option (the errors of :func:`flatpeft.attach`), a fused LoRA
            kernel set to true, an RL or reward trainer, no LoRA adapter, or a bi-level method with
            ``sample_packing``; each message names the key.
    """
    found = read_method(cfg)
    if found is None:
        return None
    method = found[0]
    for key, why in _REFUSED.items():
        if cfg.get(key):
            raise ValueError(f"{key}: {cfg[key]} cannot be used with flatpeft_method ({why}); remove it")
    adapter = cfg.get("adapter")
    if adapter not in ("lora", "qlora"):
        raise ValueError(
            f"flatpeft_method needs adapter: lora or adapter: qlora (the methods act on PEFT LoRA "
            f"adapters), got adapter: {adapter}"
        )
    for key in KERNEL_KEYS:
        if cfg.get(key) is None:
            cfg[key] = False
        elif cfg[key]:
            raise ValueError(
                f"{key}: true cannot be used with flatpeft_method: axolotl's fused LoRA kernels bypass "
                "PEFT's lora.Linear.forward, where the method acts (Flat-LoRA's perturbed base, Bi-LoRA's "
                f"second adapter), so it would silently not run; remove {key} or set it to false"
            )
    if is_bilevel(method) and cfg.get("sample_packing"):
        raise ValueError(
            f"sample_packing: true cannot be used with {method}: axolotl's multipack sampler would replace "
            "the sampler that feeds each optimizer step the D1 or D2 batches of its level; set "
            "sample_packing: false"
        )
    return found


if BaseModel is not None:

    class FlatPeftArgs(BaseModel):
        """The YAML keys the plugin declares (axolotl merges them into its config schema)."""

        flatpeft_method: str | None = None
        flatpeft_config: dict[str, Any] | None = None

        @model_validator(mode="after")
        def _check(self) -> FlatPeftArgs:
            read_method({k: getattr(self, k) for k in KEYS})
            return self

else:  # pragma: no cover
    FlatPeftArgs = None  # type: ignore[assignment,misc]


def trainer_base(cfg: Any) -> type:
    """The trainer class axolotl 0.21's causal builder picks for ``cfg`` when no plugin overrides it
    (``HFCausalTrainerBuilder._get_trainer_cls`` without the reward trainers, which are refused):
    ``trainer_cls`` if set, else the model-support profile's trainer, else ``AxolotlTrainer``."""
    if cfg.get("trainer_cls"):
        from axolotl.utils.import_helper import get_cls_from_module_str

        return get_cls_from_module_str(cfg["trainer_cls"])
    from axolotl.core.trainers import AxolotlTrainer
    from axolotl.model_support import get_model_support_for_cfg, resolve_model_support

    profile = resolve_model_support(get_model_support_for_cfg(cfg))
    factory = None if profile is None else profile.strategies.trainer_cls
    found = factory(cfg) if factory is not None else None
    return found or AxolotlTrainer


class FlatPeftPlugin(BasePlugin):
    """axolotl plugin running a flatpeft method (see the module docstring for the YAML lines)."""

    def register(self, cfg: MutableMapping[str, Any]) -> None:
        """Validate the raw config and switch the fused LoRA kernels off (before axolotl validates it)."""
        check_config(cfg)

    def get_input_args(self) -> str:
        """The pydantic model of the plugin's YAML keys (axolotl imports it by this path)."""
        return f"{__name__}.FlatPeftArgs"

    def get_trainer_cls(self, cfg: Any) -> type | None:
        """axolotl's trainer class with :class:`FlatTrainerMixin` mixed in (``None`` without a method)."""
        found = check_config(cfg)  # the validated config: the rule holds whatever ran in between
        if found is None:
            return None
        return flat_trainer_class(trainer_base(cfg), *found)

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Log which method the trainer runs."""
        config = getattr(trainer, "flat_config", None)
        if config is not None:
            log.info("flatpeft: training with %s", config)

    def post_train(self, cfg: Any, model: Any) -> None:
        """Put the adapter in its stock PEFT form before axolotl's final ``model.save_pretrained``
        (idempotent)."""
        if export_adapter(model):
            log.info("flatpeft: method detached; the adapter saved is stock PEFT LoRA")
