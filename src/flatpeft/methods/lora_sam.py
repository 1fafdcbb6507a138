"""``lora_sam`` — SAM restricted to the LoRA factors (Foret et al., ICLR 2021, arXiv:2010.01412).

The baseline of all four flat-LoRA papers. Per ``backward`` call (two passes):

    g  = ∇_θ L(θ)                      θ = every LoRA parameter of the active adapter
    ε  = ρ · g / ‖g‖₂                  (global norm over all LoRA parameters)
    .grad += ∇ L(θ + ε)                then θ is restored exactly from a saved copy

Pitfalls handled here: the first gradient is read with ``perturb.first_pass_gradients`` so gradients
that earlier micro-batches accumulated in ``.grad`` are untouched (and under DDP the first pass is
all-reduced, so every rank perturbs identically); the second pass replays the global RNG
state so it sees the same dropout masks (with ρ = 0 the result is exactly one plain backward);
parameters are restored by copy, never by subtraction. Batch-norm statistics would be updated twice
(transformers use layer norm). With gradient accumulation each micro-batch is perturbed along its own
gradient, as in the papers' implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _peft
from ..config import MethodConfig, option
from ..method import Method
from ..perturb import RngReplay, first_pass_gradients, global_norm, restore_, snapshot
from ..registry import register

__all__ = ["LoRASAM", "LoRASAMConfig"]


@dataclass(frozen=True)
class LoRASAMConfig(MethodConfig):
    """SAM on the LoRA factors."""

    method = "lora_sam"
    rho: float = option(
        0.01,
        "Radius ρ of the perturbation of the LoRA parameters (global L2 norm). The papers' LoRA-SAM "
        "baselines: 0.01 on GLUE and LLaMA (Bi-LoRA), 0.003 on T5 (Flat-LoRA), 0.05 on SuperGLUE and Qwen.",
        min=0.0,
        strength=True,
    )
    sync_first_pass: bool = option(
        True, "Under DDP, all-reduce the first-pass gradient so every rank perturbs identically."
    )


@register
class LoRASAM(Method):
    """Two-pass SAM whose perturbation lives in the LoRA parameter space only."""

    config_class = LoRASAMConfig
    paper = "Sharpness-Aware Minimization (Foret et al., 2021) arXiv:2010.01412, on LoRA parameters"
    passes = 2

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters, read from the layers (so a model sharded after attach is seen)."""
        return _peft.adapter_parameters(self.layers, self.adapter)

    def strength(self) -> dict[str, float]:
        return {"rho": self.config.rho}

    def _backward(self, loss_fn, backward_fn, **kwargs):
        rng, params = RngReplay(), self.params
        with self._first_pass_context(self.config.sync_first_pass):
            loss, grads = first_pass_gradients(loss_fn, params, self.parameters(), backward_fn)
        scale = self.config.rho / (float(global_norm(grads)) + 1e-12)
        saved = snapshot(params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g.to(p.dtype), alpha=scale)
        try:
            rng.replay()
            backward_fn(loss_fn())
        finally:
            restore_(params, saved)
        return loss  # detached by first_pass_gradients
