"""What ``flatpeft train`` adds for large models: processes, precision, activation checkpointing,
quantized bases, FSDP2 sharding, and the checkpoint I/O that sharding changes.

The loop in ``train.py`` calls these in this order::

    check_environment(cfg, world)                    # before anything is read or written
    model = load_model(..., **load_options(cfg, device))
    model = prepare_base(model, cfg)                 # k-bit preparation, activation checkpointing
    model = get_peft_model(model, LoraConfig(...))
    keep_trainable_fp32(model)
    method = attach(model, ...)
    shard(model) under --fsdp, else DistributedDataParallel under torchrun

**Precision** (``--precision``):

- ``fp32``: every weight and every operation in fp32.
- ``bf16``: the frozen weights are stored in bf16 (loaded as bf16: half the memory of the base). The
  trainable weights stay fp32: LoRA factors (PEFT's ``autocast_adapter_dtype`` default), auxiliary
  adapters, a new classification head, and every weight under ``--method full``. Forward passes run
  under ``torch.autocast(bf16)``, so matrix products are bf16 and the optimizer updates fp32 weights.
  No grad scaler: bf16 has fp32's exponent range.
- ``fp16``: the weights stay fp32, forward passes run under ``torch.autocast(fp16)`` and a grad scaler
  scales the loss (the methods backpropagate ``scaler.scale(loss)`` through their ``backward_fn``).
  Gradients are unscaled before clipping. A step whose gradients overflow is skipped: no optimizer
  step, so neither the method's post-step hook nor the LR schedule advances, and the scale halves.
  The scaler's state is checkpointed, so ``--resume`` continues exactly.

**Activation checkpointing** (``--gradient-checkpointing``): Transformers' own
``gradient_checkpointing_enable`` on the base model before PEFT wraps it, non-reentrant by default
(``--gradient-checkpointing-reentrant``: PyTorch's reentrant variant, with input gradients enabled so
the adapters still get theirs). It acts in train mode only, which is the mode the loop trains in.

**Quantized bases** (``--load-in-4bit``: NF4 with double quantization and the compute dtype of
``--precision``; ``--load-in-8bit``: LLM.int8): ``transformers.BitsAndBytesConfig`` at load time, then
``peft.prepare_model_for_kbit_training`` (frozen non-quantized weights upcast to fp32, as QLoRA does).
bitsandbytes is the ``quant`` extra.

**FSDP2** (``--fsdp``, under ``torchrun``): after the method is attached (it may add parameters),
``fully_shard`` on every transformer block and then the model (:func:`flatpeft.integrations.fsdp.
shard_model`), instead of ``DistributedDataParallel``. Parameters keep their stored dtypes (bf16
frozen weights, fp32 trainable ones: no ``MixedPrecisionPolicy``) and autocast does the mixed
precision, exactly as without sharding; gradients are reduce-scattered in fp32. fp16 uses
``ShardedGradScaler``, which agrees on skipped steps across ranks. Checkpoints are written with
``torch.distributed.checkpoint`` by every rank (the trainable weights and the optimizer state, sharded);
the final adapter is gathered to whole tensors on rank 0 and saved as a stock PEFT adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._train_config import ConfigError, TrainConfig

__all__ = [
    "Precision",
    "Ranks",
    "check_environment",
    "clip_grad_norm",
    "device_for",
    "full_state_dict",
    "keep_trainable_fp32",
    "load_options",
    "load_weights",
    "prepare_base",
    "save_weights",
    "shard",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARDED = "sharded"  # folder of a checkpoint's torch.distributed.checkpoint files


# -- processes (torchrun) ---------------------------------------------------------------------------


def device_for(name: str, local_rank: int | None = None) -> torch.device:
    """``name`` as a device; under torchrun, ``auto``/``cuda`` mean this process's GPU (``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass
class Ranks:
    """This process's place in a ``torchrun`` job (``world == 1``: one process, no collectives)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # started the process group here, so stops it

    @classmethod
    def start(cls, device_name: str) -> Ranks:
        """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = device_for(device_name, local if world > 1 else None)
        if world == 1:
            return cls(device=device)
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    def stop(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes."""
        return self.rank == 0

    def shard(self, examples: list[Any]) -> tuple[list[Any], float]:
        """This rank's share of a micro-batch and the weight of its mean loss such that the average
        over ranks (DDP's and FSDP's gradient reduction) is the mean over the whole micro-batch."""
        if self.world == 1:
            return examples, 1.0
        mine = examples[self.rank :: self.world]
        if not mine:  # fewer examples than ranks: take part in the reduction with weight 0
            return examples[:1], 0.0
        return mine, len(mine) * self.world / len(examples)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# -- checks (before anything is read or written) -----------------------------------------------------


def check_environment(cfg: TrainConfig, world: int) -> None:
    """What :meth:`TrainConfig.validate` cannot see: installed packages, the number of processes and
    the device's dtypes.

    Raises:
        ConfigError: the fix in the message.
    """
    if cfg.load_in_4bit or cfg.load_in_8bit:
        flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit"
        for package in ("bitsandbytes", "accelerate"):
            try:
                __import__(package)
            except ImportError:
                raise ConfigError(
                    f"{flag} needs {package}, which is not installed: pip install 'flatpeft[quant]'"
                ) from None
    if cfg.fsdp and world < 2:
        raise ConfigError(
            "--fsdp shards the model across the processes torchrun starts, and this is one process: "
            "launch with `torchrun --nproc_per_node N -m flatpeft train ... --fsdp` (N >= 2), or drop --fsdp"
        )
    device = device_for(cfg.device)
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16 support; use --precision fp16")


# -- loading and preparing the base model ------------------------------------------------------------


def load_options(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of :func:`flatpeft.models.load_model`: the dtype the weights are loaded in and
    the bitsandbytes quantization."""
    options: dict[str, Any] = {}
    if cfg.precision == "bf16" and cfg.method != "full":  # full: every weight trains, in fp32
        options["dtype"] = torch.bfloat16
    if cfg.load_in_4bit or cfg.load_in_8bit:
        from transformers import BitsAndBytesConfig

        # A classification head is new and trained (PEFT's modules_to_save: classifier / score): keep it
        # dense. Causal-LM: Transformers' own choice (the output layer stays dense).
        skip = ["classifier", "score"] if cfg.task == "classification" else None
        if cfg.load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=_DTYPES[cfg.precision],
                llm_int8_skip_modules=skip,
            )
        else:
            quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        options |= {"quantization_config": quantization, "device": device}
    return options


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_base(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Before PEFT wraps ``model``: k-bit training preparation and activation checkpointing.

    Raises:
        ConfigError: the model does not support gradient checkpointing.
    """
    kwargs = {"use_reentrant": cfg.gradient_checkpointing_reentrant}
    if cfg.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing"
        )
    if is_quantized(model):
        import peft

        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=kwargs,
        )
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time the layer
            # runs in eval mode without gradients, rounding its block scales to bf16 (and failing for
            # layers narrower than one 64-value block): the frozen base would then differ between the
            # first evaluation and the rest of training. Keep the layout training uses.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if cfg.gradient_checkpointing_reentrant:  # reentrant checkpoints need an input that requires grad
            model.enable_input_require_grads()
    return model


def keep_trainable_fp32(model: nn.Module) -> None:
    """Trainable weights in fp32 (the optimizer's master weights), whatever dtype the base was loaded
    in: e.g. the copy of a classification head that PEFT trains."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 over the process group: ``fully_shard`` per transformer block, then the model."""
    from .integrations.fsdp import shard_model

    return shard_model(model)


# -- precision -----------------------------------------------------------------------------------------


class Precision:
    """Autocast and (fp16) the grad scaler of a run; see the module docstring."""

    def __init__(self, name: str, device: torch.device, sharded: bool) -> None:
        self.name = name
        self.device = device
        self.scaler: torch.amp.GradScaler | None = None
        if name == "fp16":
            if sharded:  # all-reduces "found inf" so every rank skips the same steps
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(device.type)
            else:
                self.scaler = torch.amp.GradScaler(device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context forward passes run in (none for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    @property
    def backward_fn(self) -> Callable[[torch.Tensor], Any] | None:
        """What the methods backpropagate a loss with (``None``: ``loss.backward()``)."""
        scaler = self.scaler
        return None if scaler is None else (lambda loss: scaler.scale(loss).backward())

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true scale (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()``, or with fp16 the scaler's step and update; whether the step was taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale shrinks exactly when the step is skipped

    def loss_scale(self) -> dict[str, float]:
        """``{"loss_scale": ...}`` for the log under fp16 (empty otherwise)."""
        return {} if self.scaler is None else {"loss_scale": self.scaler.get_scale()}

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over every (possibly sharded) gradient; the total norm as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# -- checkpoint I/O -------------------------------------------------------------------------------------


def _named_root(model: nn.Module, method: Any) -> nn.Module:
    """The module checkpoints address parameters through: the model, plus the method's own parameters
    (BiLoRA's λ: the optimizer updates them, the model does not hold them) under ``method.``."""
    own = getattr(method, "own_parameters", dict)()
    if not own:
        return model
    root = nn.Module()
    root.model = model
    root.method = nn.ParameterDict(own)
    return root


def save_weights(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool, method: Any = None
) -> dict[str, Any]:
    """The trainable weights and the optimizer state of a checkpoint.

    Unsharded: returned as tensors for rank 0's ``state.pt`` (they are the same on every rank).
    Sharded: written by every rank with ``torch.distributed.checkpoint`` under ``folder/sharded``
    (trainable weights only), and ``{"sharded": "sharded"}`` returned.

    Call it after taking the method's state: on an optimizer that has not stepped yet, PyTorch's
    ``get_state_dict`` initialises the state with a zero-learning-rate ``step()``, which runs the
    method's post-step hook.
    """
    if not sharded:
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {"trainable": trainable, "optimizer": optimizer.state_dict()}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root = _named_root(model, method)
    weights, optim = get_state_dict(root, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder / SHARDED))
    return {"sharded": SHARDED}


def load_weights(
    folder: Path,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sharded: bool,
    method: Any = None,
) -> None:
    """Restore what :func:`save_weights` wrote (load the method's state after this: see there).

    Raises:
        ConfigError: the checkpoint was written with(out) --fsdp, or for another model.
    """
    if ("sharded" in state) != sharded:
        how = "with --fsdp" if "sharded" in state else "without --fsdp"
        raise ConfigError(f"{folder} was written {how}; resume it the same way")
    if not sharded:
        _, unexpected = model.load_state_dict(state["trainable"], strict=False)
        if unexpected:
            raise ConfigError(
                f"{folder}: weights {unexpected[:3]}... do not match this model; start a new --out"
            )
        optimizer.load_state_dict(state["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    # The keys to load are this model's trainable weights; DCP raises if the checkpoint lacks one.
    # Not strict: the frozen weights are not in the checkpoint.
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    root = _named_root(model, method)
    weights, optim = get_state_dict(root, optimizer, options=options)
    both = {"model": weights, "optimizer": optim}
    from ._safe_dcp import SafeReader

    reader = SafeReader(folder / state["sharded"])
    reader.read_metadata()  # refuses metadata that is not (DCP wraps the error in a BaseException)
    try:
        dcp.load(both, storage_reader=reader)
    except Exception as e:  # CheckpointException: a missing key or a shape mismatch
        raise ConfigError(
            f"{folder}: the checkpoint does not match this model ({e}); start a new --out"
        ) from e
    set_state_dict(
        root, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"], options=options
    )


def full_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The sharded model's (trainable) weights as whole CPU tensors on rank 0 (empty on the others);
    a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
