"""``lora`` — the LoRA baseline (Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685).

Plain ``loss.backward()``: it exists so every comparison runs through the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..method import Method
from ..registry import register

__all__ = ["LoRA", "LoRAConfig"]


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """Plain LoRA training; no options beyond the seed."""

    method = "lora"


@register
class LoRA(Method):
    """Plain backward: the reference every other method is measured against."""

    config_class = LoRAConfig
    paper = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021) arXiv:2106.09685"

    def _backward(self, loss_fn, backward_fn, **kwargs):
        loss = loss_fn()
        backward_fn(loss)
        return loss.detach()
