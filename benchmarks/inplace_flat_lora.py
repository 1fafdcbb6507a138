"""The reference Flat-LoRA algorithm as a benchmark control, and the frozen-weight exactness check.

``flat_lora[in-place]`` is Flat-LoRA as the paper's published trainer runs it (Li et al., ICML 2025,
arXiv:2409.14396), written from its description: before the forward pass, draw filter-wise noise ε
and add it to each adapted layer's frozen base weight in place; after the backward pass, draw the
same ε again from its seed and subtract it. The noise is flatpeft's own definition (same σ_t
schedule, row std σ_t·‖W'_i‖₂/√n with W' = W0 + s·B·A, same per-(seed, step, layer) generators),
so the control and ``flat_lora`` train on the same ε and differ only in where ε is applied (on CPU,
and on CUDA with ``FLATPEFT_NOISE_KERNEL=torch``; with the fused kernel, ``flat_lora`` draws the
kernel's Philox stream while the control keeps ``torch.randn``, as the paper's trainer does: the
same law, other draws). Adding
and subtracting rounds in the weight's dtype, so the frozen weights drift; :func:`exactness`
measures how far. It lives in the benchmark, not in the library.
"""

from __future__ import annotations

import math
import os

import torch

from flatpeft import _peft
from flatpeft.methods.flat_lora import FlatLoRA
from flatpeft.perturb import filter_noise

__all__ = ["InPlaceFlatLoRA", "TorchNoiseFlatLoRA", "drift", "exactness"]


class TorchNoiseFlatLoRA(FlatLoRA):
    """``flat_lora`` with the plain PyTorch noise path forced (``FLATPEFT_NOISE_KERNEL=torch``) during
    its backward: on CUDA, the comparison row of the fused Triton kernel; elsewhere ``flat_lora`` itself."""

    def _backward(self, loss_fn, backward_fn, **kwargs):
        saved = os.environ.get("FLATPEFT_NOISE_KERNEL")
        os.environ["FLATPEFT_NOISE_KERNEL"] = "torch"
        try:
            return super()._backward(loss_fn, backward_fn, **kwargs)
        finally:
            if saved is None:
                del os.environ["FLATPEFT_NOISE_KERNEL"]
            else:
                os.environ["FLATPEFT_NOISE_KERNEL"] = saved


class InPlaceFlatLoRA(FlatLoRA):
    """Flat-LoRA with ε added to the stored base weights before forward and subtracted after backward."""

    def _setup(self) -> None:
        super()._setup()
        if self.config.scope != "layers":
            raise ValueError("flat_lora[in-place] perturbs the adapted layers only (scope='layers')")
        for name, layer in self.layers:
            if _peft.dense_weight(layer) is None:
                raise ValueError(
                    f"{name}: flat_lora[in-place] writes the base weight; it needs dense weights"
                )

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        """W0 += sign·ε for every adapted layer (ε regenerated from its seed each time)."""
        for index, (_, layer) in enumerate(self.layers):
            geo = self.geos[index]
            std = self._row_std(index)  # cached for the step: the add and the subtract use the same std
            rows = geo.rows(_peft.dense_weight(layer))  # a view of the stored weight
            rows.add_(filter_noise(std, geo.n, self._layer_seed(index)), alpha=sign)

    def _backward(self, loss_fn, backward_fn, **kwargs):
        if self.sigma_t() == 0.0:
            loss = loss_fn()
            backward_fn(loss)
            return loss.detach()
        self._shift(1.0)
        try:
            loss = loss_fn()
            backward_fn(loss)
        finally:
            self._shift(-1.0)
        return loss.detach()


@torch.no_grad()
def drift(frozen: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float | bool]:
    """How far ``frozen`` moved from ``reference``: bit-identical, max |ΔW|, ‖ΔW‖/‖W‖ and the fraction
    of changed entries, over all tensors together."""
    diff_sq = ref_sq = changed = total = 0.0
    max_abs = 0.0
    for w, ref in zip(frozen, reference, strict=True):
        d = w.float() - ref.float()
        diff_sq += float(d.square().sum())
        ref_sq += float(ref.float().square().sum())
        changed += float((w != ref).sum())
        total += w.numel()
        max_abs = max(max_abs, float(d.abs().max())) if d.numel() else max_abs
    return {
        "bit_identical": changed == 0,
        "max_abs": max_abs,
        "relative": math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0,
        "changed_fraction": changed / total if total else 0.0,
    }


def exactness(runs: dict, batches: list[dict], steps: int, step_fns: dict, report_at=None) -> dict[str, dict]:
    """Train every run ``steps`` optimizer steps and compare its frozen weights with their state before.

    Args:
        runs: ``{spec: (model, method, optimizer)}``; the runs may share one set of frozen weights (the
            reference is taken again before each run, so a run that writes them is caught alone).
        batches: The batches :func:`step_fn` reads.
        steps: Optimizer steps per run.
        step_fns: ``{spec: fn}``; ``fn(model, method, optimizer, batches)`` runs one optimizer step.
        report_at: Steps after which the drift is also recorded (default: powers of two and ``steps``).

    Returns:
        ``{spec: drift(...)}`` of the adapted layers' base weights after ``steps`` steps, plus
        ``all_frozen_bit_identical`` (every frozen tensor of the model: norms, embeddings too), the
        relative drift ``by_step`` and the sizes.
    """
    report_at = set(report_at or [2**k for k in range(20) if 2**k < steps]) | {steps}
    out = {}
    for spec, (model, method, optimizer) in runs.items():
        frozen = [p for p in model.parameters() if not p.requires_grad]
        adapted = {id(_peft.dense_weight(layer)) for _, layer in method.layers}
        reference = [p.detach().clone() for p in frozen]
        pairs = [(p, r) for p, r in zip(frozen, reference, strict=True) if id(p) in adapted]
        by_step = {}
        for step in range(1, steps + 1):
            step_fns[spec](model, method, optimizer, batches)
            if step in report_at:
                by_step[step] = drift(*zip(*pairs, strict=True))["relative"]
        out[spec] = {
            **drift(*zip(*pairs, strict=True)),
            "all_frozen_bit_identical": all(
                torch.equal(p, r) for p, r in zip(frozen, reference, strict=True)
            ),
            "steps": steps,
            "by_step": by_step,
            "adapted_weights": sum(p.numel() for p, _ in pairs),
            "frozen_params": sum(p.numel() for p in frozen),
        }
        del reference, pairs
    return out
