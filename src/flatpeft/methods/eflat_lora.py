"""``eflat_lora`` — EFMLoRA (Deng et al., https://arxiv.org/abs/2508.00522), one-pass FMLoRA.

(v1 of the paper calls it EFlat-LoRA.) FMLoRA's perturbation E_B of B (see :mod:`.fm_lora` for ĝ, Ē_W
and E_B = (1/s)·Ē_W·A⁺) is carried over from step to step instead of recomputed by a second pass: the
gradient is taken ONCE per step, at (B + ρ_t·Ê_B, A), with the exponential moving average

    Ê_B ← (1 − β)·Ê_B + β·E_B,        E_B from that perturbed-point gradient.

Pitfalls and decisions:
- The first optimizer step (t = 1, paper Algorithm 2) has no Ê_B yet: it is a plain LoRA step on the
  clean gradient, and after it Ê_B = E_B from that (accumulated) clean gradient, with no averaging.
  Every later step perturbs by ρ_t·Ê_B and averages.
- Ê_B is stored for ρ = 1 and ρ_t·Ê_B is applied: the paper's recurrence for constant ρ, and a schedule
  (ρ₀/√t by default) acts on the radius at once.
- Gradient accumulation: every micro-batch of a step is perturbed by the same Ê_B and the EMA is updated
  once per optimizer step, in the step post-hook, from the accumulated ``.grad`` and the factors it was
  taken at (copies of A and B + Ê_B kept until then). Under DDP the EMA is updated from the all-reduced
  ``.grad`` on every rank.
- β: the paper's β value was not recoverable (its hyper-parameter table was not available). 0.9 is our
  specification's default; as β weights the newest E_B, Ê_B stays within about one step of the current
  direction (closest to two-pass FMLoRA) while smoothing batch noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..perturb import restore_, snapshot
from ..registry import register
from .fm_lora import _FullSpace, _FullSpaceConfig

__all__ = ["EFMLoRA", "EFMLoRAConfig"]


@dataclass(frozen=True)
class EFMLoRAConfig(_FullSpaceConfig):
    """EFMLoRA: one pass at an EMA of FMLoRA's perturbation of B."""

    method = "eflat_lora"
    beta: float = option(
        0.9, "EMA weight β of the newest E_B (paper value not recoverable).", min=0.0, max=1.0
    )


@register
class EFMLoRA(_FullSpace):
    """One-pass FMLoRA at an exponential moving average Ê_B of the perturbation (EFMLoRA)."""

    config_class = EFMLoRAConfig
    paper = "EFlat-LoRA / EFMLoRA (Deng et al., 2025) arXiv:2508.00522, one-pass EMA variant"
    passes = 1

    def _setup(self) -> None:
        super()._setup()
        self.ema: list[torch.Tensor] | None = None  # Ê_B / ρ per layer, fp32 (m, r)
        self._point: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._point_step = -1

    def _perturbed_backward(self, loss_fn, backward_fn, rho):
        saved = snapshot(self.bs) if self.ema is not None else None
        if saved is not None:  # t = 1 (no Ê_B yet) is a clean step
            self._shift_b(self.ema, rho)
        try:
            if self._point_step != self.step:  # the point the step's gradient is taken at
                self._point = (snapshot(a for a, _ in self.factors), snapshot(self.bs))
                self._point_step = self.step
            loss = loss_fn()
            backward_fn(loss)
        finally:
            if saved is not None:
                restore_(self.bs, saved)
        return loss.detach()

    def _after_step(self) -> None:
        point, self._point = self._point, None
        if point is None or self._point_step != self.step:
            return
        grads = [(a.grad, b.grad) for a, b in self.factors]
        if all(ga is None and gb is None for ga, gb in grads):
            return
        fresh = self._directions(list(zip(*point, strict=True)), grads)
        if self.ema is None:  # after the clean first step: Ê_B = E_B (Algorithm 2)
            self.ema = fresh
            return
        beta = self.config.beta
        for u, e in zip(self.ema, fresh, strict=True):
            u.lerp_(e, beta)  # (1 − β)·Ê_B + β·E_B

    def _extra_state(self) -> dict:
        return {"ema": None if self.ema is None else [u.detach().cpu().clone() for u in self.ema]}

    def _load_extra_state(self, state: dict) -> None:
        ema = state.get("ema")
        shapes = [(b.shape[0], a.shape[0]) for a, b in self.factors]
        if ema is not None and [tuple(u.shape) for u in ema] != shapes:
            raise ValueError(
                "eflat_lora state does not match this model's LoRA layers (EMA buffer shapes differ); "
                "attach to the model and LoraConfig the checkpoint was trained with"
            )
        if ema is None:
            self.ema = None
            return
        dtypes = [torch.promote_types(b.dtype, torch.float32) for b in self.bs]
        self.ema = [u.to(b.device, dt).clone() for u, b, dt in zip(ema, self.bs, dtypes, strict=True)]
