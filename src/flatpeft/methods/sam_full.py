"""``sam_full`` — SAM over the full weights of the adapted layers (Foret et al., arXiv:2010.01412).

The reference the LoRA-space estimates are tested against. Per ``backward`` call (two passes):

    G   = ∂L/∂W'  for every adapted layer's effective weight W' = W0 + ΔW
    ε_W = ρ · G / ‖G‖₂                 (global norm over all adapted layers)
    .grad += ∇ L(W' + ε_W)             (gradients of the LoRA parameters at the perturbed point)

G is read off a zero probe Δ added to the base weight (``op(x, W0 + Δ)``, Δ = 0 with
``requires_grad``) so no frozen weight is ever written or made trainable; the second pass computes
``op(x, W0 + ε_W)`` functionally. Costs one extra weight-sized tensor per adapted layer (O(model)
memory): meant for small models, and refused on quantized bases. Dropout masks are replayed in the
second pass as in ``lora_sam``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _peft
from ..config import MethodConfig, option
from ..method import Method
from ..perturb import RngReplay, first_pass_gradients, global_norm
from ..registry import register

__all__ = ["FullSAM", "FullSAMConfig"]


@dataclass(frozen=True)
class FullSAMConfig(MethodConfig):
    """SAM in the full weight space of the adapted layers."""

    method = "sam_full"
    rho: float = option(
        0.05, "Radius ρ of the full-weight perturbation (global L2 norm over layers).", min=0.0, strength=True
    )
    sync_first_pass: bool = option(
        True, "Under DDP, all-reduce the first-pass gradient so every rank perturbs identically."
    )


@register
class FullSAM(Method):
    """Two-pass SAM whose perturbation lives in the full weight space (reference baseline)."""

    config_class = FullSAMConfig
    paper = "Sharpness-Aware Minimization (Foret et al., 2021) arXiv:2010.01412, on full weights"
    passes = 2
    needs_dense_base = True

    def _setup(self) -> None:
        self.geos = {layer: _peft.geometry(layer) for _, layer in self.layers}
        for name, layer in self.layers:
            if _peft.dense_weight(layer) is None:
                raise ValueError(
                    f"sam_full needs dense base weights, but {name} is quantized; use lora_sam, "
                    "flat_lora or fm_lora on quantized models"
                )

    def strength(self) -> dict[str, float]:
        return {"rho": self.config.rho}

    def _perturbed(self, deltas: dict) -> dict:
        def make(layer, delta):
            geo = self.geos[layer]

            def forward(x, _orig):  # the weight is read here: whole inside an FSDP2-sharded block
                w = geo.rows(_peft.dense_weight(layer))
                return geo.apply(x, w + delta.to(w.dtype), _peft.base_bias(layer))

            return forward

        return {layer: make(layer, d) for layer, d in deltas.items()}

    def _backward(self, loss_fn, backward_fn, **kwargs):
        probes = {
            layer: torch.zeros((g.m, g.n), device=g.base.weight.device, requires_grad=True)
            for layer, g in self.geos.items()
        }
        rng = RngReplay()
        sync = self.config.sync_first_pass
        with _peft.patched_base_forward(self._perturbed(probes)), self._first_pass_context(sync):
            loss, grads = first_pass_gradients(loss_fn, list(probes.values()), self.parameters(), backward_fn)
        if sync:
            grads = _all_reduce_mean(grads)
        scale = self.config.rho / (float(global_norm(grads)) + 1e-12)
        eps = {
            layer: (g * scale if g is not None else torch.zeros_like(p))
            for (layer, p), g in zip(probes.items(), grads, strict=True)
        }
        rng.replay()
        with _peft.patched_base_forward(self._perturbed(eps)):
            backward_fn(loss_fn())
        return loss  # detached by first_pass_gradients


def _all_reduce_mean(grads: list) -> list:
    """Average the probe gradients over DDP ranks (DDP itself only reduces parameters)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grads
    for g in grads:
        if g is not None:
            dist.all_reduce(g)
            g.div_(dist.get_world_size())
    return grads
