"""FSDP2 for PEFT models: ``fully_shard`` on every transformer block, then on the whole model.

    model  = get_peft_model(base, LoraConfig(...))
    method = flatpeft.attach(model, "bi_lora", ...)   # before sharding: a method may add parameters
    shard_model(model)                                 # DTensor parameters and gradients from here on
    opt    = torch.optim.AdamW(method.param_groups(0.0), lr=...)

Every flatpeft method computes on the sharded model what it computes on one process (norms and Gram
products over all shards, perturbations with the parameter's placement). PyTorch's own
``torch.distributed.checkpoint`` saves and loads the sharded state; ``full_state_dict`` gathers the
trainable weights to whole tensors for a stock PEFT adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._peft import unwrap_model

__all__ = ["fully_shard_fn", "shard_model", "transformer_blocks"]


def fully_shard_fn():
    """PyTorch's ``fully_shard`` (public in torch >= 2.6, ``_composable`` before)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Transformers model: modules whose class is in ``_no_split_modules``."""
    names: set[str] = set()
    for m in unwrap_model(model).modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in unwrap_model(model).modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to each transformer block, then to the whole model, in place.

    Args:
        model: A PEFT model (with any flatpeft method already attached), on this rank's device, inside
            an initialised process group.
        **fsdp_kwargs: Passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ...).

    Returns:
        ``model`` itself, now sharded.

    Raises:
        RuntimeError: no process group is initialised (launch with ``torchrun``).
        ValueError: no transformer block was found to shard.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "FSDP needs a process group: launch with `torchrun --nproc_per_node N ...` and call "
            "torch.distributed.init_process_group() first"
        )
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} names no transformer blocks (_no_split_modules); "
            "call torch.distributed.fsdp.fully_shard on its repeated layers yourself"
        )
    fully_shard = fully_shard_fn()
    for block in reversed(blocks):  # innermost first, should blocks nest
        fully_shard(block, **fsdp_kwargs)
    fully_shard(unwrap_model(model), **fsdp_kwargs)
    return model
