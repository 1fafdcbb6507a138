"""Measuring flatness: sharpness, Hessian spectrum and loss landscapes, in the full or the LoRA space.

The claim behind flat-minima LoRA (Flat-LoRA, Li et al., ICML 2025, https://arxiv.org/abs/2409.14396)
is that a solution can be flat in its low-rank space yet sharp in the full weight space. These
functions measure both, on the user's own model, loss and data.

Let ``L(θ)`` be the mean of ``loss_fn(model, batch)`` over the given batches, with ``θ`` the weights of
the chosen ``space``:

- ``space="full"``: the effective weight W' = W0 + ΔW of every adapted layer (rows = output features,
  the layout of :class:`flatpeft._peft.Geometry`);
- ``space="lora"``: the trainable adapter parameters (LoRA factors A and B; for each, a "row" is
  its first dimension).

Definitions (ε lives in the chosen space):

- **Expected sharpness** (Keskar et al., ICLR 2017, https://arxiv.org/abs/1609.04836; random version
  as in Flat-LoRA): ``E_ε[L(θ + ε)] − L(θ)`` with Flat-LoRA's filter-wise noise: row ``i`` of each
  tensor gets ``ε_i ~ N(0, (σ·‖θ_i‖/√n)² I_n)``, ``n`` = row length. Antithetic pairs ``±ε`` cancel the
  first-order term, so on a quadratic every sample equals ``½εᵀHε`` and the mean is ``½·tr(HΣ)``.
- **Worst-case ρ-sharpness** (SAM, Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412):
  ``max_{‖ε‖₂ ≤ ρ} L(θ + ε) − L(θ)`` (one global L2 ball over the space), estimated by ``steps`` of
  normalised gradient ascent ``ε ← Π_ρ(ε + α·g/‖g‖)`` projected back onto the ball; the result is
  the largest increase seen along the path (a lower bound on the true maximum).
- **Hessian top eigenvalue**: power iteration on Hessian-vector products ``Hv`` (Pearlmutter's
  double backward); it returns the Rayleigh quotient of the dominant (largest-magnitude)
  eigenvalue, which is λ_max at a minimum.
- **Hessian trace** (Hutchinson, 1990): ``tr(H) = E_z[zᵀHz]`` over Rademacher probes ``z``.
- **Loss landscape** (Li et al., NeurIPS 2018, https://arxiv.org/abs/1712.09913):
  ``L(θ + a·d₁ + b·d₂)`` on a grid, with filter-normalised random directions (Gaussian ``d`` whose
  rows are rescaled to ``‖d_i‖ = ‖θ_i‖``).

Exactness: the model comes back bit-identical (tested in fp32 and bf16). Full-space perturbations are
applied functionally through the base-layer forward (``op(x, W0 + ε)``, or ``base(x) + op(x, ε)``),
so frozen weights are never written; LoRA-space perturbations are written into the small adapter
tensors and restored by copy. Full-space Hessian-vector products differentiate through the base
weights by temporarily switching on their ``requires_grad`` (no copy of the model); a tied or
quantized base weight gets a zero probe tensor instead. Noise and probes come from dedicated
generators seeded by ``(seed, draw, tensor)``: the global RNG is never touched or reseeded.

Every function puts the model in ``eval()`` mode (dropout off, so ``L`` is deterministic) and
restores each module's previous train/eval mode afterwards. No ``.grad`` is written. An attached
flatpeft method changes nothing: methods act only inside their ``backward``, so measurements are
always taken at the clean point, inside the method's ``exported()`` block (the adapter holds the
stock LoRA weights it would be saved with, e.g. ``bilevel_lora``'s scale folded into B). The
batches are read into a list once and reused for every evaluation; ``L`` is the plain mean of the
per-batch losses (use equal-sized batches for a dataset mean). Memory: the worst-case ascent keeps
ε and its gradient (two weight-sized fp32 tensors per adapted layer); Hessian products keep ``v``
and ``Hv``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._landscape import Landscape, loss_landscape, plot_landscape
from ._probe import (  # _count, _dump and _positive are flatpeft.sharpness_cli's too
    _EIGEN,
    _EXPECTED,
    _TRACE,
    _WORST,
    LossFn,
    Space,
    _bar,
    _check_finite,
    _count,
    _dot,
    _dump,
    _mean_stderr,
    _measurement,
    _positive,
    _random_vector,
    _Space,
)
from .perturb import global_norm, mix_seed

__all__ = [
    "Landscape",
    "SharpnessResult",
    "expected_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "loss_landscape",
    "plot_landscape",
    "worst_case_sharpness",
]


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharpnessResult:
    """One scalar flatness measurement.

    Attributes:
        metric: ``"expected"``, ``"worst_case"``, ``"hessian_top_eigenvalue"`` or ``"hessian_trace"``.
        space: ``"full"`` or ``"lora"``.
        value: The estimate.
        stderr: Its Monte-Carlo standard error (``None`` for deterministic estimates or one sample).
        base_loss: ``L(θ)`` at the clean point.
        samples: Per-sample values: one per noise draw (expected), ascent step (worst case),
            power iteration (eigenvalue) or probe (trace).
        config: The arguments of the measurement.
        details: Metric-specific facts (e.g. ``rms_radius``, ``converged``).
    """

    metric: str
    space: str
    value: float
    stderr: float | None
    base_loss: float
    samples: list[float]
    config: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text, also written to ``path`` when given."""
        return _dump(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharpnessResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


# -- expected and worst-case sharpness -----------------------------------------------------------


def expected_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    sigma: float = 0.05,
    n_samples: int = 16,
    space: Space = "full",
    antithetic: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> SharpnessResult:
    """Expected sharpness ``E[L(θ + ε)] − L(θ)`` under Flat-LoRA's filter-wise noise.

    Row ``i`` of every tensor in ``space`` gets ``ε_i ~ N(0, (σ·‖θ_i‖/√n)² I)`` (``θ`` = effective
    weight rows for ``"full"``, adapter-factor rows for ``"lora"``). With ``antithetic=True`` each
    sample is ``½[L(θ+ε) + L(θ−ε)] − L(θ)`` (same mean, first-order term cancelled, two forward
    passes per sample). The model is put in ``eval()`` mode and left bit-identical.

    Args:
        model: A ``peft.PeftModel`` or any module with PEFT LoRA layers (a diffusers UNet...).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; ``None`` means ``model(**batch).loss``.
        batches: The evaluation batches (read once into a list; ``L`` is the mean over them).
        sigma: Relative noise scale σ (Flat-LoRA's default 0.05).
        n_samples: Number of noise draws ε.
        space: ``"full"`` (effective weights of the adapted layers) or ``"lora"`` (adapter factors).
        antithetic: Evaluate ``±ε`` pairs.
        seed: Seed of the noise; the same seed gives the same result.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`SharpnessResult` (``samples``: one value per draw; ``details["rms_radius"]`` is
        ``sqrt(E‖ε‖²) = σ‖θ‖``, the radius to compare with :func:`worst_case_sharpness`).

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``loss_fn`` does not return a scalar tensor.
        ValueError: invalid ``sigma``, ``n_samples`` or ``space``, empty ``batches``, non-finite loss.
    """
    _positive("sigma", sigma, allow_zero=True)
    _count("n_samples", n_samples)
    config = {"sigma": sigma, "n_samples": n_samples, "antithetic": antithetic, "seed": seed}
    with _measurement(model, loss_fn, batches, space) as ctx:
        sp = ctx.space
        base = ctx.mean_loss()
        _check_finite(base, "expected_sharpness")
        stds = [n * (sigma / math.sqrt(sp.cols(j))) for j, n in enumerate(sp.row_norms)]
        samples: list[float] = []
        with _bar(n_samples, f"expected sharpness ({space})", progress) as bar:
            for k in range(n_samples):
                seeds = [mix_seed(seed, _EXPECTED, k, j) for j in range(len(stds))]
                losses = []
                for sign in (1.0, -1.0) if antithetic else (1.0,):
                    make = [_noise_fn(sp, j, std * sign, seeds[j]) for j, std in enumerate(stds)]
                    with sp.perturbed(make):
                        losses.append(ctx.mean_loss())
                samples.append(sum(losses) / len(losses) - base)
                bar.update(1)
    value, stderr = _mean_stderr(samples)
    details = {"rms_radius": sigma * math.sqrt(sp.norm_sq()), "tensors": len(sp.shapes)}
    return SharpnessResult("expected", space, value, stderr, base, samples, config, details)


def _noise_fn(sp: _Space, j: int, std: torch.Tensor, seed: int) -> Callable[[], torch.Tensor]:
    return lambda: sp.noise(j, std, seed)


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    rho: float = 0.05,
    steps: int = 5,
    step_size: float | None = None,
    space: Space = "full",
    seed: int = 0,
    progress: bool = True,
) -> SharpnessResult:
    """Worst-case ρ-sharpness ``max_{‖ε‖₂ ≤ ρ} L(θ + ε) − L(θ)`` by projected normalised gradient ascent.

    Starting from ε = 0, each step takes the gradient ``g`` of ``L`` at ``θ + ε`` over all batches and
    sets ``ε ← Π_ρ(ε + α·g/‖g‖)`` (global L2 norm over the space, projection onto the ball). With
    ``steps=1`` this is SAM's perturbation. The value is the largest increase seen along the path
    (ε = 0 included, so it is ≥ 0), a lower bound on the true maximum. Costs ``steps`` forward and
    backward passes plus one forward pass over the batches. The model is put in ``eval()`` mode and
    left bit-identical.

    Args:
        model: A ``peft.PeftModel`` or any module with PEFT LoRA layers (a diffusers UNet...).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; ``None`` means ``model(**batch).loss``.
        batches: The evaluation batches (read once into a list; ``L`` is the mean over them).
        rho: Radius ρ of the L2 ball (absolute, over every tensor of the space together).
        steps: Number of ascent steps.
        step_size: Step α; default ``2.5·ρ/steps`` (the usual projected-gradient choice).
        space: ``"full"`` (effective weights of the adapted layers) or ``"lora"`` (adapter factors).
        seed: Seed of the random direction used where the gradient vanishes exactly.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`SharpnessResult` whose ``samples`` are ``L(θ + ε_k) − L(θ)`` after each step.

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``loss_fn`` does not return a scalar tensor.
        ValueError: invalid ``rho``, ``steps``, ``step_size`` or ``space``, empty ``batches``,
            non-finite loss.
    """
    _positive("rho", rho, allow_zero=True)
    _count("steps", steps)
    if step_size is not None:
        _positive("step_size", step_size)
    alpha = step_size if step_size is not None else 2.5 * rho / steps
    config = {"rho": rho, "steps": steps, "step_size": alpha, "seed": seed}
    losses: list[float] = []
    bar = _bar(steps, f"worst-case sharpness ({space})", progress)
    with _measurement(model, loss_fn, batches, space) as ctx, bar:
        sp = ctx.space
        eps = [torch.zeros(shape, device=dev) for shape, dev in zip(sp.shapes, sp.device, strict=True)]
        for k in range(steps + 1):
            if k == steps:  # the last point only needs its loss
                with sp.at_point(eps):
                    losses.append(ctx.mean_loss())
                break
            with sp.at_point(eps) as tensors:
                loss, grads = ctx.loss_and_grad(tensors)
            if k == 0:
                _check_finite(loss, "worst_case_sharpness")
            losses.append(loss)
            norm = float(global_norm(grads))
            if norm == 0.0:  # flat to first order: step along a seeded random direction instead
                grads = [
                    sp.noise(j, torch.ones_like(n), mix_seed(seed, _WORST, k, j))
                    for j, n in enumerate(sp.row_norms)
                ]
                norm = float(global_norm(grads))
            for e, g in zip(eps, grads, strict=True):
                e.add_(g, alpha=alpha / norm)
            radius = float(global_norm(eps))
            if radius > rho:
                for e in eps:
                    e.mul_(rho / radius)
            bar.update(1)
    base = losses[0]
    samples = [v - base for v in losses[1:]]
    details = {"final_radius": float(global_norm(eps)), "ascent_loss": max(losses)}
    return SharpnessResult("worst_case", space, max(0.0, *samples), None, base, samples, config, details)


# -- Hessian -------------------------------------------------------------------------------------


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    space: Space = "full",
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> SharpnessResult:
    """Dominant eigenvalue of the Hessian of ``L`` in ``space``, by power iteration on ``H·v``.

    ``v`` starts as a seeded Gaussian unit vector; each iteration computes ``Hv`` by double backward
    over all batches, records the Rayleigh quotient ``λ = vᵀHv`` and sets ``v = Hv/‖Hv‖``. It stops
    when ``|λ_k − λ_{k−1}| ≤ tol·|λ_k|`` or after ``iters`` products. Power iteration finds the
    eigenvalue of largest magnitude (λ_max at a minimum, where H is positive semi-definite). The
    full space differentiates through the base weights (their ``requires_grad`` is switched on for
    the call and restored); no copy of the model is made. The model is put in ``eval()`` mode and
    left bit-identical.

    Args:
        model: A ``peft.PeftModel`` or any module with PEFT LoRA layers (a diffusers UNet...).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; ``None`` means ``model(**batch).loss``.
        batches: The evaluation batches (read once into a list; ``L`` is the mean over them).
        space: ``"full"`` (effective weights of the adapted layers) or ``"lora"`` (adapter factors).
        iters: Maximum number of Hessian-vector products.
        tol: Relative tolerance on successive eigenvalue estimates.
        seed: Seed of the starting vector.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`SharpnessResult` whose ``samples`` are the estimates per iteration;
        ``details`` has ``iterations`` and ``converged``.

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``loss_fn`` does not return a scalar tensor.
        ValueError: invalid ``iters``, ``tol`` or ``space``, empty ``batches``, non-finite loss.
    """
    _count("iters", iters)
    _positive("tol", tol, allow_zero=True)
    config = {"iters": iters, "tol": tol, "seed": seed}
    estimates: list[float] = []
    converged = False
    base = float("nan")
    with _measurement(model, loss_fn, batches, space) as ctx, ctx.space.hessian_tensors() as tensors:
        v = _random_vector(tensors, seed, _EIGEN, 0, rademacher=False)
        scale = 1.0 / math.sqrt(_dot(v, v))
        v = [t.mul_(scale) for t in v]
        with _bar(iters, f"Hessian eigenvalue ({space})", progress) as bar:
            for _ in range(iters):
                loss, hv = ctx.hvp(tensors, v)
                if not estimates:
                    base = loss
                    _check_finite(base, "hessian_top_eigenvalue")
                estimates.append(_dot(v, hv))
                bar.update(1)
                norm = math.sqrt(_dot(hv, hv))
                if norm == 0.0:
                    converged = True
                    break
                v = [h.div_(norm) for h in hv]
                if len(estimates) > 1 and abs(estimates[-1] - estimates[-2]) <= tol * abs(estimates[-1]):
                    converged = True
                    break
    details = {"iterations": len(estimates), "converged": converged}
    return SharpnessResult(
        "hessian_top_eigenvalue", space, estimates[-1], None, base, estimates, config, details
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    space: Space = "full",
    n_probes: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> SharpnessResult:
    """Hutchinson's estimate ``tr(H) ≈ mean_k z_kᵀ H z_k`` over Rademacher probes ``z_k``.

    Each probe costs one Hessian-vector product (forward and double backward over all batches). The
    model is put in ``eval()`` mode and left bit-identical.

    Args:
        model: A ``peft.PeftModel`` or any module with PEFT LoRA layers (a diffusers UNet...).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; ``None`` means ``model(**batch).loss``.
        batches: The evaluation batches (read once into a list; ``L`` is the mean over them).
        space: ``"full"`` (effective weights of the adapted layers) or ``"lora"`` (adapter factors).
        n_probes: Number of probes.
        seed: Seed of the probes.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`SharpnessResult` with the standard error of the mean over probes and the
        per-probe values ``zᵀHz`` in ``samples``.

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``loss_fn`` does not return a scalar tensor.
        ValueError: invalid ``n_probes`` or ``space``, empty ``batches``, non-finite loss.
    """
    _count("n_probes", n_probes)
    config = {"n_probes": n_probes, "seed": seed}
    samples: list[float] = []
    base = float("nan")
    bar = _bar(n_probes, f"Hessian trace ({space})", progress)
    with _measurement(model, loss_fn, batches, space) as ctx, ctx.space.hessian_tensors() as tensors, bar:
        for k in range(n_probes):
            z = _random_vector(tensors, seed, _TRACE, k, rademacher=True)
            loss, hz = ctx.hvp(tensors, z)
            if k == 0:
                base = loss
                _check_finite(base, "hessian_trace")
            samples.append(_dot(z, hz))
            bar.update(1)
    value, stderr = _mean_stderr(samples)
    details = {"dimension": sum(t.numel() for t in tensors)}
    return SharpnessResult("hessian_trace", space, value, stderr, base, samples, config, details)
