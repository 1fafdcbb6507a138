"""A per-rank scale between lora_A and lora_B (BiLoRA's pseudo singular values)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._sharded import full, like

__all__ = ["add_rank_scale_hook", "check_rank_scalable", "fold_rank_scale_", "rank_factors"]


def _rank_dim(module: nn.Module) -> int:
    """Dimension of the rank channel in ``module``'s output (``lora_A``: Linear → last, Conv → 1)."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def check_rank_scalable(name: str, layer: nn.Module, adapter: str) -> None:
    """Check that a per-rank scale on ``lora_A``'s output reaches every use of ΔW in ``layer``.

    True for LoRA on Linear (also GPT-2 ``Conv1D``, quantized bases) and Conv layers, and for DoRA on
    Linear layers (PEFT computes DoRA's weight norm by running ``lora_A``); not for embeddings,
    ``MultiheadAttention``, ``target_parameters`` or other LoRA variants, which read the factors'
    weights directly.

    Raises:
        ValueError: naming the layer and the fix.
    """
    from peft.tuners.lora import layer as lora_layer

    names = ("Embedding", "MultiheadAttention", "ParamWrapper")
    refused = tuple(c for c in (getattr(lora_layer, n, None) for n in names) if c is not None)
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    module = dict(layer.lora_A.items()).get(adapter)
    dora_linear = type(variant).__name__ == "DoraLinearVariant" and isinstance(module, nn.Linear)
    ok = (
        not isinstance(layer, refused)
        and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and (variant is None or dora_linear)
    )
    if not ok:
        what = type(variant).__name__ if variant is not None else type(layer).__name__
        raise ValueError(
            f"{name}: a per-rank scale between lora_A and lora_B cannot be applied to {what}; use plain LoRA "
            "(or DoRA) on Linear/Conv layers, e.g. exclude embeddings from LoraConfig.target_modules"
        )


def rank_factors(layer: nn.Module, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` weights of ``adapter``'s modules: ``A.reshape(r, -1)`` is Q, ``B.reshape(B.shape[0], r)``
    is P, and ΔW = scaling · P·Q in the base layer's ``(out, fan_in)`` row layout."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def add_rank_scale_hook(
    layer: nn.Module, adapter: str, scale: Callable[[], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Multiply the output of ``layer.lora_A[adapter]`` by ``scale()`` (an ``(r,)`` vector) along the rank.

    ΔW becomes scaling · B·diag(scale)·A wherever PEFT runs ``lora_A`` (the forward, mixed-batch and
    DoRA weight-norm paths). ``scale()`` returning ``None`` leaves the output unchanged. Remove the
    returned handle to undo; ``get_delta_weight`` and ``merge`` never see the scale (fold it first).
    """
    module = layer.lora_A[adapter]
    dim = _rank_dim(module)

    def hook(_module, _inputs, output):
        s = scale()
        if s is None:
            return None
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * s.to(device=output.device, dtype=output.dtype).view(shape)

    return module.register_forward_hook(hook)


@torch.no_grad()
def fold_rank_scale_(layer: nn.Module, adapter: str, scale: torch.Tensor) -> None:
    """B ← B·diag(scale) in place: a stock LoRA adapter equal to B·diag(scale)·A (scaling unchanged).
    An FSDP2-sharded B is scaled whole and written back with its placement."""
    b = layer.lora_B[adapter].weight
    shape = [1] * b.dim()
    shape[1] = -1
    whole = full(b)
    b.copy_(like(whole * scale.to(device=whole.device, dtype=b.dtype).view(shape), b))
