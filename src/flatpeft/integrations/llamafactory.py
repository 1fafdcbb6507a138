"""LLaMA-Factory launcher: train with a flatpeft method from a LLaMA-Factory YAML file (SPEC §2).

LLaMA-Factory (0.9.5) has no plugin hook and rejects unknown YAML keys, so flatpeft launches it::

    flatpeft llamafactory CONFIG.yaml [key=value ...]        # like llamafactory-cli train CONFIG.yaml
    python -m flatpeft.integrations.llamafactory CONFIG.yaml
    torchrun --nproc_per_node 2 -m flatpeft.integrations.llamafactory CONFIG.yaml   # data-parallel

with two more keys in the YAML::

    flatpeft_method: flat_lora
    flatpeft_config: {sigma: 0.05}

The launcher reads the file with LLaMA-Factory's own ``read_args`` (so ``key=value`` overrides work as
with ``llamafactory-cli``), takes the two keys out, and runs LLaMA-Factory's own ``run_exp`` with the
trainer classes of its SFT and pre-training workflows (``CustomSeq2SeqTrainer``, ``CustomTrainer``)
extended by :class:`~flatpeft.integrations.transformers.FlatTrainerMixin`; the names those workflows
look up are patched for the call and restored after it. Everything else (model loading, the PEFT
adapter, data, the Trainer, saving, ``torchrun``) is LLaMA-Factory's.

Refused, with the reason:

- ``stage`` other than ``sft``/``pt`` (reward modelling, PPO, DPO, KTO run TRL trainers whose steps
  the mixin does not wrap), and ``finetuning_type`` other than ``lora`` (the methods act on PEFT LoRA);
- ``use_unsloth`` (Unsloth's fused LoRA kernels bypass PEFT's ``lora.Linear.forward``, where
  Flat-LoRA's perturbed base and Bi-LoRA's second adapter act), ``use_kt`` (KTransformers replaces
  the base layers with its own operators), ``use_mca``/``use_hyper_parallel`` (their own trainers);
- ``enable_liger_kernel`` when the LoRA targets include ``lm_head``: Liger's fused linear
  cross-entropy reads ``lm_head.weight`` directly, bypassing the adapter. Its other kernels (RMSNorm,
  RoPE, SwiGLU) call the projection modules, so PEFT's forward still runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._hosts import KEYS, flat_trainer_class, read_method

__all__ = ["check_options", "flat_workflows", "main", "read_config", "run"]

#: module of a LLaMA-Factory workflow -> the trainer class name it looks up
WORKFLOW_TRAINERS = {
    "llamafactory.train.sft.workflow": "CustomSeq2SeqTrainer",
    "llamafactory.train.pt.workflow": "CustomTrainer",
}

# option -> why flatpeft refuses it (when set to a true value)
_REFUSED = {
    "use_unsloth": "Unsloth's fused LoRA kernels bypass PEFT's lora.Linear.forward, where the methods act "
    "(Flat-LoRA's perturbed base, Bi-LoRA's second adapter), so the method would silently not run",
    "use_kt": "KTransformers replaces the base layers PEFT's LoRA wraps with its own operators",
    "use_mca": "Megatron-Core training (mcore_adapter) runs its own trainer, not the Transformers Trainer",
    "use_hyper_parallel": "hyper_parallel runs its own trainer, not the Transformers Trainer",
}


def check_options(args: Mapping[str, Any], method: str) -> None:
    """Refuse LLaMA-Factory options that would make ``method`` silently not run.

    Raises:
        ValueError: naming the option and the reason (see the module docstring).
    """
    stage = args.get("stage", "sft")
    if stage not in ("sft", "pt"):
        raise ValueError(
            f"flatpeft_method works with LLaMA-Factory's stage: sft or pt, got stage: {stage}; reward "
            "modelling, PPO, DPO and KTO run TRL trainers whose steps flatpeft does not wrap"
        )
    kind = args.get("finetuning_type", "lora")
    if kind != "lora":
        raise ValueError(
            f"flatpeft_method needs finetuning_type: lora (the methods act on PEFT LoRA adapters), got {kind}"
        )
    for key, why in _REFUSED.items():
        if args.get(key):
            raise ValueError(f"{key}: true cannot be used with flatpeft_method ({why}); remove it")
    targets = args.get("lora_target", "all")
    targets = targets.split(",") if isinstance(targets, str) else list(targets or [])
    if args.get("enable_liger_kernel") and "lm_head" in [t.strip() for t in targets]:
        raise ValueError(
            "enable_liger_kernel: true with lm_head in lora_target cannot be used with flatpeft_method: "
            "Liger's fused linear cross-entropy reads lm_head.weight directly, bypassing the adapter; "
            "drop lm_head from lora_target or set enable_liger_kernel: false"
        )


def read_config(argv: Sequence[str]) -> tuple[dict[str, Any], tuple[str, dict[str, Any]] | None]:
    """LLaMA-Factory's arguments from ``CONFIG.yaml [key=value ...]`` (read by its own ``read_args``)
    without flatpeft's keys, and the validated ``(method, options)`` (``None`` without
    ``flatpeft_method``).

    Raises:
        ValueError: a missing or non-YAML/JSON config file, or a bad flatpeft key or option.
    """
    read_args = _llamafactory().hparams.read_args
    if not argv or not str(argv[0]).endswith((".yaml", ".yml", ".json")):
        raise ValueError(
            "usage: flatpeft llamafactory CONFIG.yaml [key=value ...] (a .yaml, .yml or .json file)"
        )
    saved = sys.argv
    sys.argv = [saved[0] if saved else "flatpeft", *map(str, argv)]
    try:
        args = dict(read_args())
    except FileNotFoundError as e:
        raise ValueError(f"config file not found: {argv[0]}") from e
    finally:
        sys.argv = saved
    method = read_method(args)
    for key in KEYS:
        args.pop(key, None)
    if method is not None:
        check_options(args, method[0])
    return args, method


def _llamafactory(submodule: str = "hparams") -> Any:
    """The ``llamafactory`` package with ``submodule`` imported.

    Raises:
        ValueError: LLaMA-Factory is not installed (the message names the install command).
    """
    import importlib

    try:
        importlib.import_module(f"llamafactory.{submodule}")
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("llamafactory"):
            raise
        raise ValueError(
            "LLaMA-Factory is not installed; install it with `pip install llamafactory==0.9.5` "
            "(flatpeft's launcher is tested with 0.9.5)"
        ) from e
    return importlib.import_module("llamafactory")


@contextlib.contextmanager
def flat_workflows(method: str, options: Mapping[str, Any]) -> Iterator[dict[str, type]]:
    """Within the block, LLaMA-Factory's SFT and pre-training workflows build their trainer with
    :class:`FlatTrainerMixin` mixed in; the names are restored on exit. Yields the new classes."""
    import importlib

    saved: list[tuple[Any, str, type]] = []
    made: dict[str, type] = {}
    try:
        for module_name, name in WORKFLOW_TRAINERS.items():
            module = importlib.import_module(module_name)
            base = getattr(module, name)
            saved.append((module, name, base))
            made[name] = flat_trainer_class(base, method, options)
            setattr(module, name, made[name])
        yield made
    finally:
        for module, name, base in reversed(saved):
            setattr(module, name, base)


def run(argv: Sequence[str], callbacks: list[Any] | None = None) -> None:
    """Run LLaMA-Factory's ``run_exp`` on ``CONFIG.yaml [key=value ...]`` with the config's flatpeft method
    (plain LLaMA-Factory when the file has no ``flatpeft_method``)."""
    run_exp = _llamafactory("train.tuner").train.tuner.run_exp
    args, method = read_config(argv)
    if method is None:
        run_exp(args, callbacks)
        return
    with flat_workflows(*method):
        run_exp(args, callbacks)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatpeft.integrations.llamafactory CONFIG.yaml``; the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except (ValueError, TypeError) as e:
        print(f"flatpeft llamafactory: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
