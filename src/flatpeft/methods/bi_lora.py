"""``bi_lora`` — Bi-LoRA (Liu, Li, Huang, Yang, Huang, 2025, https://arxiv.org/abs/2508.19564).

An auxiliary LoRA branch (B2, A2; rank r2, scaling s2) carries SAM's adversarial weight perturbation
while the primary adapter (B1, A1; scaling s1) learns the task, in ONE forward/backward per step:

    W = W0 + s1·B1A1 + s2·B2A2,      min_{B1,A1}  max_{‖s2·B2A2‖ ≤ ρ}  L(W)
    g = ∇L(W0 + s1·B1A1 + s2·B2A2)                         (one pass, both adapters active)
    (B1, A1) ← (B1, A1) − η·g_{B1,A1}                      (descent, the user's optimizer)
    (B2, A2) ← (B2, A2) + η·g_{B2,A2}                      (ascent: the auxiliary .grad holds −g)
    c = sqrt(Σ_layers ‖s2·B2A2‖_F²);  if c > ρ:  (B2, A2) ← sqrt(ρ/c)·(B2, A2)   (so c lands on ρ)

‖BA‖_F² is computed without forming BA, as sum((BᵀB) ⊙ (AAᵀ)). ``clip="layer"`` bounds each layer's
‖s2·B2A2‖_F by ρ instead; ``clip="none"`` leaves the auxiliary branch free (ablations only).

Design: the auxiliary branch is a second PEFT LoRA adapter on the primary's layers (added with PEFT's
``add_adapter``: alpha of the primary, no dropout, no DoRA), active together with the primary only
inside :meth:`BiLoRA.backward`, so evaluation, ``save_pretrained`` and ``merge_and_unload`` see the
primary alone. Its initialisation is PEFT's default distribution (A2 ~ U(±1/√fan_in), B2 = 0) drawn
from a generator seeded by ``seed``; ``aux_init="random"`` also draws B2 and scales it onto the
constraint boundary (norm ρ). ``detach()`` deletes the adapter; :meth:`BiLoRA.state_dict` carries its
weights so a resumed run continues the same ascent.

Cost: inside ``backward`` every plain LoRA Linear layer runs primary and auxiliary as ONE branch of
rank r1 + r2 (A = [A1; A2], B = [s1·B1, s2·B2]; ``_peft.fused_adapters``), the same function and
gradients as PEFT's two-adapter forward. Run as two adapters, the extra skinny rank-r2 matmuls and the
extra output-sized scale-and-add cost 1.73× a LoRA layer pass on CPU; fused, 1.00× (one 384 → 1536
layer, ``benchmarks/results/bi-lora-layer-cpu.json``): the scaling is folded into the small B. DoRA
layers keep PEFT's forward.

Pitfalls handled here:

- Gradient accumulation: the ascent must use the step's accumulated gradient. Each backward's
  contribution to the auxiliary gradient is negated *before* it is accumulated (in the fused graph,
  or by a tensor hook on layers PEFT runs), so ``.grad`` ends as −Σ_micro-batches g and earlier
  contributions are never negated twice.
- FSDP2: attach before ``fully_shard`` (the auxiliary adapter is sharded with the model). The fused
  graph negates the gradient of the whole factors the sharded block computes with, the clipping norms
  are taken over the gathered factors and the rescaling is applied shard by shard.
- Weight decay would pull the perturbation towards 0: :meth:`BiLoRA.no_decay_parameters` lists the
  auxiliary factors (``FlatTrainer`` and ``param_groups`` put them in a group with decay 0; in a plain
  loop use ``AdamW(method.param_groups(wd), lr=...)``). They use the same learning rate as the primary.
- Max-norm gradient clipping (``max_grad_norm``): the paper is silent on it, and the authors' code
  trains with the Trainer's default, which clips all trainable gradients, the auxiliary ones included.
  flatpeft's default is its own choice: ``clip_parameters()`` leaves the auxiliary (ascent) gradients
  out, so they neither count in the norm nor get rescaled (the ascent step's size is bounded by the
  branch-norm projection, not by the descent's clip); ``grad_clip_aux=True`` clips them with the rest,
  as the authors' code does. ``flatpeft train`` and ``FlatTrainer`` clip ``clip_parameters()``; in a
  plain loop use ``clip_grad_norm_(method.clip_parameters(), max_norm)``.
- Clipping rescales the factors after ``optimizer.step()`` (step post-hook, once per optimizer step)
  and leaves the optimizer's state for them untouched, as in the paper.
- The returned loss is the loss at the perturbed point, slightly above plain LoRA's training loss.
- With ρ = 0 the auxiliary branch is never run: ``backward`` is exactly ``loss.backward()``.
- DoRA primaries work: the primary runs before the auxiliary branch inside each layer (DoRA rescales
  the running output it is given), so the auxiliary term is added unscaled.
- Saving while attached: ``model.save_pretrained(dir, selected_adapters=[method.adapter])``, or
  ``method.detach()`` first; a plain ``save_pretrained`` would also write the auxiliary adapter into
  ``dir/bi_lora_aux`` (``FlatTrainer`` removes that folder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import _peft
from .._sharded import full, like, local, model_is_sharded
from ..config import MethodConfig, option
from ..method import Method
from ..perturb import gram_fro_sq, mix_seed
from ..registry import register

__all__ = ["AUX_ADAPTER", "BiLoRA", "BiLoRAConfig"]

AUX_ADAPTER = "bi_lora_aux"
_INIT_TAG = 0xB1A0


@dataclass(frozen=True)
class BiLoRAConfig(MethodConfig):
    """Auxiliary adversarial LoRA branch with norm clipping."""

    method = "bi_lora"
    rho: float = option(
        0.05,
        "Radius ρ of the auxiliary perturbation s2·B2A2 (Frobenius norm; paper: 0.05 GLUE/LLaMA, 0.1 "
        "SuperGLUE/Qwen).",
        min=0.0,
        strength=True,
    )
    aux_r: int = option(8, "Rank r2 of the auxiliary adapter (its alpha is the primary's lora_alpha).", min=1)
    clip: Literal["global", "layer", "none"] = option(
        "global", "Bound on s2·B2A2: global norm over all layers ≤ ρ, each layer's norm ≤ ρ, or none."
    )
    aux_init: Literal["zero", "random"] = option(
        "zero", "Auxiliary start: zero (PEFT default, B2 = 0) or random (B2 drawn, scaled to norm ρ)."
    )
    grad_clip_aux: bool = option(
        False,
        "Whether max-norm gradient clipping (clip_parameters(): flatpeft train, FlatTrainer) also covers "
        "the negated auxiliary gradients. The paper is silent on max-norm clipping and the authors' code "
        "clips every trainable gradient (the Trainer's default; True here); flatpeft's default False, "
        "its own choice, clips only the primary (descent) gradients.",
    )
    aux_lr: float | None = option(
        None,
        "η₂, learning rate of the auxiliary branch in param_groups() (the paper's ablation); default: "
        "the optimizer's own lr, as in the paper's main runs.",
        min=0.0,
        min_exclusive=True,
    )


@register
class BiLoRA(Method):
    """Bi-LoRA: descent on the primary adapter, ascent on a clipped auxiliary adapter, one pass."""

    config_class = BiLoRAConfig
    paper = (
        "Bi-LoRA: Efficient Sharpness-Aware Minimization for Fine-Tuning Large-Scale Models "
        "(Liu, Li et al., 2025) arXiv:2508.19564"
    )

    def _setup(self) -> None:
        if model_is_sharded(self.model):
            raise ValueError(
                "bi_lora adds an auxiliary adapter, which must be sharded with the model: attach bi_lora "
                "before fully_shard / flatpeft.integrations.fsdp.shard_model"
            )
        self.aux_name = AUX_ADAPTER
        self.aux_layers = _peft.add_aux_adapter(self.model, self.adapter, self.aux_name, self.config.aux_r)
        self.scalings = [_peft.scaling(layer, self.aux_name) for layer in self.aux_layers]
        self._init_aux()

    @property
    def factors(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """``(B2, A2)`` of every layer, read from the layers (FSDP2 replaces parameters when sharding)."""
        return [_peft.aux_factors(layer, self.aux_name) for layer in self.aux_layers]

    @property
    def aux_params(self) -> list[torch.nn.Parameter]:
        """``[B2, A2]`` of every layer, in layer order."""
        return _peft.aux_parameters(self.aux_layers, self.aux_name)

    def _teardown(self) -> None:
        _peft.remove_aux_adapter(self.model, self.aux_name)

    # -- the optimizer's view -----------------------------------------------------------------------

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters, auxiliary factors included (even if something froze them)."""
        aux = {id(p) for p in self.aux_params}
        return [p for p in self.model.parameters() if p.requires_grad or id(p) in aux]

    def no_decay_parameters(self) -> list[torch.nn.Parameter]:
        """The auxiliary factors: weight decay would shrink the adversarial perturbation."""
        return list(self.aux_params)

    def _descent_parameters(self) -> list[torch.nn.Parameter]:
        aux = {id(p) for p in self.aux_params}
        return [p for p in self.parameters() if id(p) not in aux]

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        """The descent parameters only, unless ``grad_clip_aux``: a max-norm clip must neither count the
        ascent gradients in the norm nor rescale them."""
        return self.parameters() if self.config.grad_clip_aux else self._descent_parameters()

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """The primary adapter (and any other trainable weight) with ``weight_decay``; the auxiliary
        factors with no weight decay and, when ``aux_lr`` is set, their own learning rate η₂."""
        groups = [
            {"params": self._descent_parameters(), "weight_decay": weight_decay},
            {"params": list(self.aux_params), "weight_decay": 0.0},
        ]
        if self.config.aux_lr is not None:
            groups[1]["lr"] = self.config.aux_lr
        return groups

    def strength(self) -> dict[str, float]:
        return {"rho": self.config.rho}

    # -- norms and clipping -------------------------------------------------------------------------

    @torch.no_grad()
    def layer_norms(self) -> torch.Tensor:
        """``(layers,)`` fp32 ‖s2·B2A2‖_F of every layer, by the Gram trick (B2A2 is never formed);
        FSDP2-sharded factors are gathered whole (they are small: (m + n)·r2 per layer)."""
        sq = [
            gram_fro_sq(full(b).reshape(b.shape[0], -1), full(a).reshape(a.shape[0], -1)) * (s * s)
            for (b, a), s in zip(self.factors, self.scalings, strict=True)
        ]
        device = sq[0].device
        return torch.stack([v.to(device) for v in sq]).sqrt()

    def aux_norm(self) -> float:
        """Global c = sqrt(Σ_layers ‖s2·B2A2‖_F²) of the auxiliary perturbation."""
        return float(self.layer_norms().pow(2).sum().sqrt())

    def _constraint_norms(self) -> torch.Tensor:
        """Per layer, the norm the constraint bounds: its own (``clip="layer"``) or the global c."""
        norms = self.layer_norms()
        if self.config.clip == "layer":
            return norms
        return norms.pow(2).sum().sqrt().expand_as(norms)

    @torch.no_grad()
    def clip_(self) -> None:
        """Project the auxiliary branch onto its constraint: if c > ρ, B2 and A2 *= sqrt(ρ/c)."""
        if self.config.clip == "none":
            return
        c, rho = self._constraint_norms(), self.config.rho
        factors = torch.where(c > rho, (rho / c).sqrt(), torch.ones_like(c))  # a tensor: no host sync
        for f, (b, a) in zip(factors, self.factors, strict=True):  # elementwise: shard by shard
            local(b).mul_(f.to(b.device, b.dtype))
            local(a).mul_(f.to(a.device, a.dtype))

    @torch.no_grad()
    def _init_aux(self) -> None:
        for i, (b, a) in enumerate(self.factors):
            gen = torch.Generator().manual_seed(mix_seed(self.config.seed, _INIT_TAG, i))
            a.copy_(_uniform(a.shape, a.reshape(a.shape[0], -1).shape[1], gen))  # PEFT's kaiming(a=√5)
            if self.config.aux_init == "zero":
                b.zero_()
            else:
                b.copy_(_uniform(b.shape, b.reshape(b.shape[0], -1).shape[1], gen))
        if self.config.aux_init == "random":
            # Onto the boundary (norm ρ); only B2 is scaled, so the norm scales linearly.
            c = self._constraint_norms()
            scale = torch.where(c > 0, self.config.rho / c, torch.zeros_like(c))
            for f, (b, _) in zip(scale, self.factors, strict=True):
                b.mul_(f.to(b.device, b.dtype))

    def _after_step(self) -> None:
        self.clip_()

    # -- the pass -----------------------------------------------------------------------------------

    def _backward(self, loss_fn, backward_fn, **kwargs):
        if self.config.rho == 0.0:  # no perturbation: exactly a plain backward
            loss = loss_fn()
            backward_fn(loss)
            return loss.detach()
        for p in self.aux_params:  # a model-level set_adapter() elsewhere may have frozen them
            p.requires_grad_(True)
        # Primary first: DoRA rescales the running output it is given, the auxiliary term is added after.
        # Fused layers negate the auxiliary gradient in the graph; the others (DoRA, embeddings, ...)
        # negate each backward's contribution with a tensor hook before it is accumulated into .grad.
        with _peft.fused_adapters(self.aux_layers, self.adapter, self.aux_name) as unfused:
            if unfused and model_is_sharded(self.model):
                raise ValueError(
                    f"bi_lora under FSDP2 needs plain LoRA Linear layers; {type(unfused[0]).__name__} "
                    "layers (DoRA, embeddings, convolutions) run PEFT's forward, whose sharded parameters "
                    "take no gradient hooks: exclude them from target_modules, or train with DDP"
                )
            handles = [
                p.register_hook(torch.neg)
                for layer in unfused
                for p in _peft.aux_factors(layer, self.aux_name)
            ]
            try:
                loss = loss_fn()
                backward_fn(loss)
            finally:
                for h in handles:
                    h.remove()
        return loss.detach()

    # -- exact resume -------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"aux": [full(p.detach()).clone() for p in self.aux_params]}

    @torch.no_grad()
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("aux")
        if saved is None:
            return
        shapes = [tuple(p.shape) for p in self.aux_params]
        if [tuple(t.shape) for t in saved] != shapes:
            raise ValueError(
                "the saved auxiliary adapter does not match this model's (different target modules or "
                "aux_r); attach to the same model with the same configuration"
            )
        for p, t in zip(self.aux_params, saved, strict=True):
            p.copy_(like(t.to(p.device, p.dtype), p))


def _uniform(shape: torch.Size, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """U(-1/√fan_in, 1/√fan_in) in fp32 on the CPU (device-independent draws)."""
    return (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
