"""``--method full`` — every weight trained with plain backward: the papers' full fine-tuning reference row.

Not a registered LoRA method (it needs no adapters): ``flatpeft train --method full`` builds it in place
of ``attach(...)``, and it keeps the same contract (``backward``, ``bind``, ``state_dict``, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FullFineTune"]


class FullFineTune:
    """``--method full``: every weight trained with plain backward (the method contract, no adapters)."""

    needs_upper_loss = False
    config = None

    @classmethod
    def data_used(cls, config: Any, step: int) -> tuple[bool, bool]:
        return True, False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.step = 0

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # biases and norms
        ]

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_post_hook(lambda *_: setattr(self, "step", self.step + 1))

    def set_wrapper(self, wrapper: nn.Module) -> FullFineTune:
        return self  # one backward pass: nothing to do without synchronisation

    def backward(self, loss_fn: Any, **kwargs: Any) -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def strength(self) -> dict[str, float]:
        return {}

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def detach(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
