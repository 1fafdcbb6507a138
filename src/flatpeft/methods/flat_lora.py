"""``flat_lora`` — Flat-LoRA (Li et al., ICML 2025, https://arxiv.org/abs/2409.14396).

Objective: min E_ε L(W0 + s·B·A + ε), one forward/backward per micro-batch, no extra pass.
For every adapted layer and optimizer step t, row i of ε (an output feature / filter) is drawn as

    ε_i ~ N(0, (σ_t · ‖W'_i‖₂ / √n)² · I_n),   W' = W0 + ΔW,  n = fan-in,
    σ_t = σ · ½(1 − cos(π t / T))   (``schedule="cosine"``; ``linear``: σ·t/T; ``constant``: σ).

Design (exactness first): ε is never added to a stored weight. Inside ``backward`` each base layer
computes ``op(x, W0 + ε)`` through an autograd function that draws ε from a dedicated generator
seeded by (seed, t, layer) in forward and draws it again in backward for the input gradient, so only
the seed and the O(m) row scales are stored; the frozen weights stay bit-identical in fp32, bf16 and
fp16, activation checkpointing recomputes the same ε, and the global RNG (dropout) is untouched.
Quantized bases get ``base(x) + op(x, ε)`` instead. All micro-batches of one optimizer step share
the same ε (t only advances in the optimizer post-hook), and every DDP rank draws the same ε unless
``noise="per_rank"``.

``noise_memory="keep"`` saves ``W0 + ε`` from forward to backward instead of drawing it twice: one
fewer Gaussian draw per layer and step (CPU ``randn`` is the bottleneck), at the cost of one extra
copy of each adapted weight held until its backward runs. ``keep_budget_gb`` caps that memory: the
layers whose cumulative size (in layer order, at the compute dtype) fits are kept, the rest
regenerate; both give bit-identical gradients.

The noise path (``_noise``) moves as few bytes as it can: W0 + σ·z is one fused Triton pass on CUDA
(Philox keyed by the (seed, t, layer) seed), one ``addcmul`` into reused buffers elsewhere, with the
CPU draws split into fixed chunks drawn on every core. ‖W0_i‖² is computed once per layer (W0 is
frozen) and only the LoRA terms of ‖W'_i‖² = ‖W0_i‖² + 2s⟨W0_i, (BA)_i⟩ + s²‖(BA)_i‖² are
recomputed per step: on the kernel path by the step's first draw itself, in the same pass over W0
(``_noise.RowNorms``), elsewhere as (W0·Aᵀ)_i·B_i, one more read of W0.

Pitfalls: T must be the number of *optimizer* steps (``FlatTrainer`` reads it from the Trainer; in a
plain loop pass ``total_steps``); σ_t = 0 at t = 0 with the cosine ramp, so the first step is plain
LoRA; the row norms are those of W' at the start of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .. import _peft
from .._noise import NoiseWorkspace, RowNorms, use_kernel
from ..config import MethodConfig, option
from ..method import Method
from ..perturb import filter_noise, mix_seed, noisy_base_op, perturbed_parameters
from ..registry import register

__all__ = ["FlatLoRA", "FlatLoRAConfig", "noise_scale"]


@dataclass(frozen=True)
class FlatLoRAConfig(MethodConfig):
    """Random filter-wise weight perturbation of the full effective weight."""

    method = "flat_lora"
    sigma: float = option(
        0.05, "Final relative noise std σ (paper: 0.05-0.10; CLIP used 0.15).", min=0.0, strength=True
    )
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "Ramp of σ_t over optimizer steps: cosine ½(1-cos(πt/T)), linear t/T, or constant."
    )
    total_steps: int | None = option(
        None, "T, total optimizer steps (needed by cosine/linear; FlatTrainer sets it).", min=1
    )
    noise: Literal["shared", "per_rank"] = option(
        "shared", "Under DDP: the same ε on every rank (default) or independent ε per rank."
    )
    noise_memory: Literal["regenerate", "keep"] = option(
        "regenerate", "regenerate ε in backward (no extra memory) or keep W0+ε to backward (one draw fewer)."
    )
    keep_budget_gb: float | None = option(
        None,
        "With noise_memory='keep': GB of W0+ε that may be held until backward; the layers that fit "
        "(in order) keep, the rest regenerate. None: keep every layer.",
        min=0.0,
    )
    scope: Literal["layers", "all"] = option(
        "layers",
        "Which weights get noise: the adapted layers' W' (paper) or all: also every other weight, "
        "LayerNorm weights, biases and embeddings included, each entry with std σ_t·|w| "
        "(Flat-LoRA (all), Appendix C).",
    )

    def validate(self) -> None:
        if self.keep_budget_gb is not None and self.noise_memory != "keep":
            raise ValueError(
                "FlatLoRAConfig.keep_budget_gb applies to noise_memory='keep'; set noise_memory='keep' "
                "or leave keep_budget_gb unset"
            )
        if self.schedule != "constant" and self.total_steps is None and self.sigma > 0:
            raise ValueError(
                f"FlatLoRAConfig.total_steps is required with schedule={self.schedule!r}; pass "
                "total_steps=<number of optimizer steps> or schedule='constant'"
            )


def noise_scale(sigma: float, schedule: str, step: int, total_steps: int | None) -> float:
    """σ_t of the schedule at optimizer step ``step`` (clamped to T)."""
    if schedule == "constant" or sigma == 0.0:
        return sigma
    frac = min(step, total_steps) / total_steps
    if schedule == "linear":
        return sigma * frac
    return sigma * 0.5 * (1.0 - math.cos(math.pi * frac))


@register
class FlatLoRA(Method):
    """Flat-LoRA with an exact functional perturbation regenerated from seeds."""

    config_class = FlatLoRAConfig
    paper = (
        "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape (Li et al., ICML 2025) arXiv:2409.14396"
    )

    def _setup(self) -> None:
        self.geos = [_peft.geometry(layer) for _, layer in self.layers]
        for (name, layer), _ in zip(self.layers, self.geos, strict=True):
            weight = _peft.dense_weight(layer)
            if weight is not None and weight.requires_grad:
                raise ValueError(f"{name}: flat_lora expects a frozen base weight; set requires_grad=False")
        self._std_step = -1
        self._stds: list[torch.Tensor | None] = []
        self._others = self._other_weights() if self.config.scope == "all" else {}
        self._base_sq: list[dict] = [{} for _ in self.layers]  # ‖W0_i‖², computed once per layer
        self._workspace = NoiseWorkspace()
        sizes = [geo.m * geo.n for geo in self.geos]
        self._keep_prefix = [sum(sizes[: i + 1]) for i in range(len(sizes))]

    def _teardown(self) -> None:
        self._workspace.clear()
        super()._teardown()

    def _keeps(self, index: int, dtype: torch.dtype) -> bool:
        """Whether layer ``index`` keeps W0+ε to backward (``noise_memory="keep"`` within the budget)."""
        c = self.config
        if c.noise_memory != "keep":
            return False
        if c.keep_budget_gb is None:
            return True
        return self._keep_prefix[index] * dtype.itemsize <= c.keep_budget_gb * 1e9

    def _other_weights(self) -> dict[torch.nn.Module, dict[str, int]]:
        """``scope="all"``: every parameter but the LoRA factors and the adapted layers' own weights (their
        noise is the functional base op), as ``{module: {name: index}}``; a tied weight keeps one index
        (one ε) in every module that holds it."""
        adapter_ids = {id(p) for _, layer in self.layers for p in _peft.all_adapter_parameters(layer)}
        adapted = {(id(geo.base), "weight") for geo in self.geos}
        index: dict[int, int] = {}
        out: dict[torch.nn.Module, dict[str, int]] = {}
        for module in self.model.modules():
            for name, p in module._parameters.items():
                if p is None or not p.is_floating_point() or p.dim() == 0 or id(p) in adapter_ids:
                    continue
                if (id(module), name) in adapted:
                    continue
                out.setdefault(module, {})[name] = index.setdefault(id(p), len(self.layers) + len(index))
        return out

    def strength(self) -> dict[str, float]:
        return {"sigma": self.sigma_t()}

    def sigma_t(self) -> float:
        """σ_t at the current optimizer step."""
        c = self.config
        return noise_scale(c.sigma, c.schedule, self.step, c.total_steps)

    def row_stds(self) -> list[torch.Tensor]:
        """Per-layer ``(m,)`` noise std σ_t‖W'_i‖/√n of the current optimizer step (unsharded model)."""
        return [self._row_std(i) for i in range(len(self.layers))]

    @torch.no_grad()
    def _row_std(self, index: int, rows: torch.Tensor | None = None) -> torch.Tensor | RowNorms:
        """σ_t‖W'_i‖/√n of layer ``index``, computed once per optimizer step from the weights at its
        start. Called inside the layer's forward, where an FSDP2-sharded weight is whole, and outside
        autocast, so sharded, checkpointed and mixed-precision runs see the same norms.

        Given the frozen ``rows`` on the Triton kernel's path, the first call of a step returns the
        :class:`RowNorms` for the kernel to compute the stds in its own pass over W0 (the forward then
        stores them here); later calls of the step get the stored stds.
        """
        if self._std_step != self.step:
            self._stds, self._std_step = [None] * len(self.layers), self.step
        if self._stds[index] is None:
            layer, geo = self.layers[index][1], self.geos[index]
            scale = self.sigma_t() / math.sqrt(geo.n)
            factors = None
            if rows is not None and rows.dtype != torch.float64 and use_kernel(rows.device):
                factors = _peft.plain_lora_factors(layer, geo, self.adapter)
            if factors is not None:
                a, b, s = factors
                base_sq = _peft.base_row_sq(layer, rows, self._base_sq[index])
                return RowNorms(a.detach(), b.detach(), base_sq, s, scale)
            with torch.autocast(geo.base.weight.device.type, enabled=False):
                norms = _peft.effective_row_norms(layer, geo, self.adapter, self._base_sq[index])
            self._stds[index] = norms.mul_(scale)
        return self._stds[index]

    def _layer_seed(self, index: int) -> int:
        rank = 0
        if (
            self.config.noise == "per_rank"
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank = torch.distributed.get_rank()
        return mix_seed(self.config.seed, self.step, index, rank)

    def _patch(self, index: int, layer):
        geo = self.geos[index]
        seed = self._layer_seed(index)
        ws = self._workspace

        def forward(x, original):
            weight = _peft.dense_weight(layer)
            dtype = (
                torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            )
            keep = self._keeps(index, dtype or (weight.dtype if weight is not None else x.dtype))
            if weight is None:  # quantized base: add op(x, ε) to the base layer's own output
                return original(x) + noisy_base_op(x, geo, None, None, self._row_std(index), seed, keep, ws)
            rows = geo.rows(weight)
            std = self._row_std(index, rows)
            out = noisy_base_op(x, geo, rows, _peft.base_bias(layer), std, seed, keep, ws)
            if isinstance(std, RowNorms):
                self._stds[index] = std.std
            return out

        return forward

    def _noisy(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``scope="all"``: p ↦ p + ε with ε entry-wise N(0, (σ_t·|p_ij|)²) (Flat-LoRA Appendix C: the
        noise of a weight that is not adapted follows its magnitude entry by entry, whatever its stored
        layout, so GPT-2 ``Conv1D``'s ``(in, out)`` storage needs no transposing), drawn from the same
        per-(seed, step, index) generators as the layers."""
        seed, sigma = self._layer_seed(index), self.sigma_t()

        def make(p: torch.Tensor) -> torch.Tensor:
            magnitude = p.detach().reshape(p.shape[0], -1).abs()
            unit = magnitude.new_full((magnitude.shape[0],), sigma, dtype=torch.float32)
            noise = filter_noise(unit, magnitude.shape[1], seed) * magnitude
            return p + noise.reshape(p.shape).to(p.dtype)

        return make

    def _backward(self, loss_fn, backward_fn, **kwargs):
        if self.sigma_t() == 0.0:
            loss = loss_fn()
            backward_fn(loss)
            return loss.detach()
        patches = {layer: self._patch(i, layer) for i, (_, layer) in enumerate(self.layers)}
        others = {m: {name: self._noisy(i) for name, i in names.items()} for m, names in self._others.items()}
        with _peft.patched_base_forward(patches), perturbed_parameters(others):
            loss = loss_fn()
            backward_fn(loss)
        return loss.detach()
