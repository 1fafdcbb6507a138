"""``fm_lora`` — FMLoRA (Deng et al., https://arxiv.org/abs/2508.00522), and the math ``eflat_lora`` shares.

(v1 of the paper calls it Flat-LoRA; ``flat_lora`` here is Li et al.'s method.)
Full-space SAM carried by B alone. With ΔW = s·B·A, ∇B = s·G·Aᵀ and ∇A = s·Bᵀ·G (G = ∂L/∂W), so

    ĝ   = ½ [ (1/s)·∇B·(Aᵀ)⁺ + (1/s)·(Bᵀ)⁺·∇A ]         (= ½(G·P_A + P_B·G), the full-weight estimate)
    Ē_W = ρ · ĝ / ‖ĝ‖_F                                (per layer; ``norm="global"``: one norm over layers)
    E_B = (1/s) · Ē_W · A⁺                             (A is never perturbed; s·E_B·A = Ē_W·P_A)

``fm_lora`` (two passes, like SAM): gradient at (B, A) → E_B → ``.grad +=`` gradient at (B + E_B, A) →
B restored by copy. Each micro-batch is perturbed along its own gradient, like ``lora_sam``; under DDP
the clean pass is all-reduced unless ``sync_first_pass=False``.

Implementation, O(r²(m + n)) per layer and no m×n matrix: A⁺ = Aᵀ(AAᵀ + λ_A I)⁻¹ and
(Bᵀ)⁺ = B(BᵀB + λ_B I)⁻¹ by damped r×r solves in fp32, batched over layers (no per-layer SVD ``pinverse``),
λ = δ·tr(Gram)/r so the estimate is invariant to the rescaling (cB, A/c). ĝ stays factored,
ĝ = [∇B, B]·D·[A; ∇A] with D = blockdiag(c₁K_A⁻¹, c₂K_B⁻¹)/s, so with S = [A; ∇A][A; ∇A]ᵀ:
‖ĝ‖_F² = Σ([∇B, B]ᵀ[∇B, B] ⊙ D·S·Dᵀ) and ĝ·A⁺ = [∇B, B]·D·S[:, :r]·K_A⁻¹.

Pitfalls and decisions:
- ρ schedule: the default ``rho_schedule="inv_sqrt"``, ρ_t = ρ₀/√t for t = 1, 2, ... (ρ₀ on the first
  step), is inferred from the assumption of the paper's convergence result (Theorem 2); the schedule
  and ρ₀ of its experiments are not recoverable. Over a long run it leaves an average radius of a few
  percent of ρ₀ (≈ 2/√T of it over T steps), so the method then acts almost like LoRA; ``constant``
  (ρ on every step) and ``cosine`` are options.
- The sign(·) printed in the paper's Ē_W is a typo: the direction is ĝ itself.
- B = 0 (PEFT's initialisation) makes ∇A = 0, so the first term alone is used (c₁ = 1, c₂ = 0). "Near
  zero" is RMS(B) ≤ 1e-12 (``B_ZERO_RMS``): far below any trained B, high enough that BᵀB and its damped
  inverse stay in fp32 range; any B above it spans a valid projector. A factor without gradient (frozen
  A or B) drops its term the same way; an A that small gives E_B = 0 (B cannot move ΔW then).
- Clipping and AMP unscaling only rescale ``.grad``; the normalisation removes that (AMP loss scaling too).
- LoRA variants such as DoRA keep ∇B = s·X·Aᵀ, ∇A = s·Bᵀ·X for X = ∂L/∂(s·B·A): ĝ then estimates X.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .. import _peft
from .._sharded import full, like
from ..config import MethodConfig, option
from ..method import Method
from ..perturb import RngReplay, first_pass_gradients, restore_, snapshot
from ..registry import register

__all__ = [
    "B_ZERO_RMS",
    "FMLoRA",
    "FMLoRAConfig",
    "full_gradient_estimate",
    "perturbation_directions",
    "rho_at",
]

B_ZERO_RMS = 1e-12  # B is "near zero" (first-term fallback) when its root-mean-square entry is below this


@dataclass(frozen=True)
class _FullSpaceConfig(MethodConfig):
    rho: float = option(0.05, "Radius ρ of the full-weight perturbation Ē_W.", min=0.0, strength=True)
    norm: Literal["layer", "global"] = option(
        "layer", "‖ĝ‖ per adapted layer (paper) or one global norm over all layers."
    )
    rho_schedule: Literal["inv_sqrt", "constant", "cosine"] = option(
        "inv_sqrt",
        "ρ_t over optimizer steps t = 1, 2, ...: inv_sqrt ρ/√t, constant ρ, or cosine decay "
        "ρ·½(1+cos(π(t-1)/T)). The default inv_sqrt is inferred from Theorem 2's assumption (the schedule "
        "and ρ₀ of the paper's experiments are not recoverable); it averages ≈ 2ρ/√T over T steps.",
    )
    total_steps: int | None = option(
        None, "T, total optimizer steps (needed by cosine; FlatTrainer sets it).", min=1
    )
    damping: float = option(
        1e-4, "Relative damping δ of the r×r solves: λ = δ·tr(Gram)/r.", min=0.0, min_exclusive=True
    )

    def validate(self) -> None:
        if self.rho_schedule == "cosine" and self.total_steps is None and self.rho > 0:
            raise ValueError(
                f"{type(self).__name__}.total_steps is required with rho_schedule='cosine'; pass "
                "total_steps=<number of optimizer steps> or rho_schedule='constant'"
            )


@dataclass(frozen=True)
class FMLoRAConfig(_FullSpaceConfig):
    """FMLoRA: two-pass full-space SAM mapped onto B."""

    sync_first_pass: bool = option(
        True, "Under DDP, all-reduce the clean (first-pass) gradient so every rank perturbs identically."
    )

    method = "fm_lora"


def rho_at(rho: float, schedule: str, step: int, total_steps: int | None) -> float:
    """ρ_t of the schedule for the optimizer step with 0-based index ``step`` (the paper's t = step + 1;
    cosine clamped to T): inv_sqrt gives ρ, ρ/√2, ρ/√3, ... ."""
    if schedule == "constant" or rho == 0.0:
        return rho
    if schedule == "inv_sqrt":
        return rho / math.sqrt(step + 1)
    return rho * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


# -- the shared math -----------------------------------------------------------------------------------


def _damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(G + λI)⁻¹ of a batch of r×r Gram matrices, λ = δ·tr(G)/r (+ the smallest normal number)."""
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    lam = gram.diagonal(dim1=-2, dim2=-1).sum(-1) * (damping / r) + torch.finfo(gram.dtype).tiny
    return torch.linalg.solve_ex(gram + lam[:, None, None] * eye, eye.expand_as(gram))[0]


def _factored(a, b, grad_a, grad_b, scaling: torch.Tensor, damping: float):
    """ĝ = left · d · right for a batch of layers (leading dim) with equal shapes (see module docstring)."""
    r = a.shape[-2]
    ga = torch.zeros_like(a) if grad_a is None else grad_a
    gb = torch.zeros_like(b) if grad_b is None else grad_b
    left = torch.cat([gb, b], dim=-1)  # [∇B, B]   (g, m, 2r)
    right = torch.cat([a, ga], dim=-2)  # [A; ∇A]  (g, 2r, n)
    gram_left, gram_right = left.mT @ left, right @ right.mT
    ka_inv = _damped_inverse(gram_right[:, :r, :r], damping)
    kb_inv = _damped_inverse(gram_left[:, r:, r:], damping)
    b_live = gram_left[:, r:, r:].diagonal(dim1=-2, dim2=-1).sum(-1) > b[0].numel() * B_ZERO_RMS**2
    w1 = float(grad_b is not None)
    w2 = b_live.to(a.dtype) * float(grad_a is not None)
    total = (w2 + w1).clamp_min(1.0) * scaling
    d = torch.zeros_like(gram_left)
    d[:, :r, :r] = ka_inv * (w1 / total)[:, None, None]
    d[:, r:, r:] = kb_inv * (w2 / total)[:, None, None]
    a_live = gram_right[:, :r, :r].diagonal(dim1=-2, dim2=-1).sum(-1) > a[0].numel() * B_ZERO_RMS**2
    return left, d, right, gram_left, gram_right, ka_inv, a_live


def _stack(tensors: list[torch.Tensor | None], rows: int, dtype: torch.dtype) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.stack([t.detach().reshape(rows, -1) for t in tensors]).to(dtype)


def full_gradient_estimate(a, b, grad_a, grad_b, scaling: float, damping: float = 1e-4) -> torch.Tensor:
    """The dense ``(m, n)`` estimate ĝ of one layer (for tests and diagnostics; O(m·n·r))."""
    dt, r, m = torch.promote_types(a.dtype, torch.float32), a.shape[0], b.shape[0]
    args = [_stack([t], rows, dt) for t, rows in ((a, r), (b, m), (grad_a, r), (grad_b, m))]
    left, d, right, *_ = _factored(*args, torch.tensor([scaling], dtype=dt, device=a.device), damping)
    return (left @ (d @ right))[0]


def perturbation_directions(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    grads: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    scalings: list[float],
    norm: str = "layer",
    damping: float = 1e-4,
) -> list[torch.Tensor]:
    """E_B for ρ = 1 of every layer, as ``(m, r)`` tensors in fp32 (or the factors' wider dtype).

    Layers with equal shapes are processed as one batch (a few dozen small ops per shape, not per layer).

    Args:
        factors: ``(A, B)`` of each layer, any layout whose 2-D views are ``(r, n)`` and ``(m, r)``.
        grads: ``(∇A, ∇B)`` at that point (``None`` for a factor without gradient).
        scalings: LoRA scaling s of each layer.
        norm: ``"layer"`` (‖ĝ‖ per layer) or ``"global"`` (over all layers).
        damping: Relative damping δ of the r×r solves.
    """
    groups: dict[tuple, list[int]] = {}
    for i, ((a, b), (ga, gb)) in enumerate(zip(factors, grads, strict=True)):
        key = (a.shape, b.shape, a.dtype, a.device, ga is None, gb is None)
        groups.setdefault(key, []).append(i)
    batches = []
    for idx in groups.values():
        a0, b0 = factors[idx[0]]
        dt = torch.promote_types(a0.dtype, torch.float32)
        r, m = a0.shape[0], b0.shape[0]
        a, b = (_stack([factors[i][k] for i in idx], rows, dt) for k, rows in ((0, r), (1, m)))
        ga, gb = (_stack([grads[i][k] for i in idx], rows, dt) for k, rows in ((0, r), (1, m)))
        s = torch.tensor([scalings[i] for i in idx], dtype=dt, device=a.device)[:, None, None]
        left, d, _, gram_left, gram_right, ka_inv, a_live = _factored(a, b, ga, gb, s[:, 0, 0], damping)
        sq = (gram_left * (d @ gram_right @ d.mT)).sum((-2, -1)).clamp_min(0.0)  # ‖ĝ‖_F²
        e = left @ (d @ gram_right[:, :, :r] @ ka_inv / s)  # (1/s)·ĝ·A⁺
        batches.append((idx, torch.where(a_live[:, None, None], e, 0.0), torch.where(a_live, sq, 0.0)))
    if norm == "global":
        total = torch.cat([sq.to(batches[0][2].device) for _, _, sq in batches]).sum().sqrt()
    out: list[torch.Tensor] = [None] * len(factors)  # type: ignore[list-item]
    for idx, e, sq in batches:
        n = total.to(sq.device) if norm == "global" else sq.sqrt()
        e = e * torch.where(n > 0, 1.0 / n, 0.0)[..., None, None]
        for i, row in zip(idx, e.unbind(0), strict=True):
            out[i] = row
    return out


# -- the methods ---------------------------------------------------------------------------------------


class _FullSpace(Method):
    def _setup(self) -> None:
        for (name, _), (a, b) in zip(self.layers, self.factors, strict=True):
            if b.reshape(b.shape[0], -1).shape[1] != a.shape[0]:
                raise ValueError(
                    f"{self.config.method} needs ΔW = s·B·A, but {name} has A {tuple(a.shape)} and B "
                    f"{tuple(b.shape)} (e.g. a grouped convolution); exclude it from target_modules"
                )
        self.scalings = [_peft.scaling(layer, self.adapter) for _, layer in self.layers]

    @property
    def factors(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """``(A, B)`` of every layer, read from the layers (FSDP2 replaces parameters when sharding)."""
        return [_peft.lora_factors(layer, self.adapter) for _, layer in self.layers]

    @property
    def bs(self) -> list[torch.nn.Parameter]:
        """B of every layer."""
        return [b for _, b in self.factors]

    def rho_t(self) -> float:
        """ρ_t at the current optimizer step."""
        c = self.config
        return rho_at(c.rho, c.rho_schedule, self.step, c.total_steps)

    def strength(self) -> dict[str, float]:
        return {"rho": self.rho_t()}

    def _directions(self, factors, grads) -> list[torch.Tensor]:
        """Unit E_B per layer; FSDP2-sharded factors and gradients are gathered whole first (the LoRA
        factors are small), so every rank computes exactly the unsharded directions."""
        factors = [(full(a), full(b)) for a, b in factors]
        grads = [(full(ga), full(gb)) for ga, gb in grads]
        return perturbation_directions(factors, grads, self.scalings, self.config.norm, self.config.damping)

    def _backward(self, loss_fn, backward_fn, **kwargs):
        rho = self.rho_t()
        if rho > 0.0:
            return self._perturbed_backward(loss_fn, backward_fn, rho)
        loss = loss_fn()  # ρ_t = 0: exactly a plain backward
        backward_fn(loss)
        return loss.detach()

    @torch.no_grad()
    def _shift_b(self, directions: list[torch.Tensor], rho: float) -> None:
        for b, e in zip(self.bs, directions, strict=True):
            b.add_(like(e.reshape(b.shape), b), alpha=rho)


@register
class FMLoRA(_FullSpace):
    """Two-pass SAM whose full-weight perturbation is carried by B (FMLoRA)."""

    config_class = FMLoRAConfig
    paper = "EFlat-LoRA / FMLoRA (Deng et al., 2025) arXiv:2508.00522, two-pass FMLoRA"
    passes = 2

    def _clean_directions(self, loss_fn, backward_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The clean loss and unit E_B from its gradient (accumulated ``.grad`` left untouched)."""
        with self._first_pass_context(self.config.sync_first_pass):
            wanted = [p for pair in self.factors for p in pair]
            loss, flat = first_pass_gradients(loss_fn, wanted, self.parameters(), backward_fn)
        grads = list(zip(flat[0::2], flat[1::2], strict=True))
        return loss, self._directions(self.factors, grads)

    def _perturbed_backward(self, loss_fn, backward_fn, rho):
        rng = RngReplay()
        loss, directions = self._clean_directions(loss_fn, backward_fn)
        saved = snapshot(self.bs)
        self._shift_b(directions, rho)
        try:
            rng.replay()
            backward_fn(loss_fn())
        finally:
            restore_(self.bs, saved)
        return loss  # detached by first_pass_gradients
