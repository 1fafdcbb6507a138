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

import contextlib
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import _peft
from .method import _ATTR as _METHOD_ATTR
from .perturb import filter_noise, global_norm, mix_seed, restore_, snapshot

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

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Space = Literal["full", "lora"]

# Stream tags so that two measurements with the same seed never share a draw.
_EXPECTED, _WORST, _EIGEN, _TRACE, _LANDSCAPE = 1, 2, 3, 4, 5


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


@dataclass(frozen=True)
class Landscape:
    """Loss on a 1-D line or 2-D grid along filter-normalised random directions.

    Attributes:
        space: ``"full"`` or ``"lora"``.
        dims: 1 or 2.
        alphas: Coordinates along the first direction.
        betas: Coordinates along the second direction (empty for ``dims=1``).
        losses: ``losses[i]`` at ``alphas[i]`` (1-D) or ``losses[i][j]`` at ``(alphas[i], betas[j])``.
        base_loss: ``L(θ)`` at the clean point.
        config: The arguments of the measurement.
    """

    space: str
    dims: int
    alphas: list[float]
    betas: list[float]
    losses: list[Any]
    base_loss: float
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The landscape as JSON text (non-finite losses as ``null``), also written to ``path`` when given."""
        return _dump(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Landscape:
        """Inverse of :meth:`to_dict` (``null`` losses, written for non-finite ones, read back as NaN)."""

        def floats(v: Any) -> Any:
            return [floats(x) for x in v] if isinstance(v, list) else (math.nan if v is None else v)

        return cls(**{**data, "losses": floats(data["losses"])})


def _json_safe(value: Any) -> Any:
    """Non-finite floats (a loss that overflowed far out on a landscape) become ``null``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _dump(data: dict[str, Any], path: str | Path | None) -> str:
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


# -- the space of weights a measurement perturbs ------------------------------------------------


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


class _Space:
    """The tensors θ of ``space`` and how to evaluate the model at θ + ε without writing frozen weights.

    Perturbations ε are fp32 tensors of :attr:`shapes`: ``(m, n)`` rows for the full space, the
    parameter's own shape for the LoRA space.
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        if kind not in ("full", "lora"):
            raise ValueError(
                f"space must be 'full' (effective weights) or 'lora' (adapter factors), got {kind!r}"
            )
        inner = _peft.check_peft_model(model)
        adapter = _peft.active_adapter(inner)
        self.kind = kind
        self.inner = inner
        named = _peft.lora_layers(inner, adapter)
        self.layers = [layer for _, layer in named]
        if kind == "full":
            self.geos = [_peft.geometry(layer) for layer in self.layers]
            self.row_norms = [
                _peft.effective_rows(layer, geo, adapter).norm(dim=1)
                for layer, geo in zip(self.layers, self.geos, strict=True)
            ]
            self.shapes = [torch.Size((g.m, g.n)) for g in self.geos]
            self.device = [n.device for n in self.row_norms]
        else:
            self.params = _peft.adapter_parameters(named, adapter)
            if not self.params:
                raise ValueError(
                    "space='lora' measures the trainable adapter parameters, and this adapter has none; "
                    "load it with PeftModel.from_pretrained(base, path, is_trainable=True) (from_pretrained "
                    "freezes adapters for inference by default), or use space='full'"
                )
            self.clean = snapshot(self.params)
            self.row_norms = [_rows_of(p.detach()).float().norm(dim=1) for p in self.params]
            self.shapes = [p.shape for p in self.params]
            self.device = [p.device for p in self.params]

    def cols(self, j: int) -> int:
        return math.prod(self.shapes[j]) // self.row_norms[j].numel()

    def noise(self, j: int, row_std: torch.Tensor, seed: int) -> torch.Tensor:
        """Filter-wise Gaussian noise for tensor ``j`` (row ``i`` has std ``row_std[i]``)."""
        return filter_noise(row_std, self.cols(j), seed).reshape(self.shapes[j])

    def norm_sq(self) -> float:
        """‖θ‖² over the space (fp32)."""
        return float(sum(float(n.pow(2).sum()) for n in self.row_norms))

    # A perturbation for evaluation only (no gradient): ``make[j]()`` builds ε_j when it is needed, so
    # regenerated noise is never held for more than one layer at a time in the full space.
    @contextlib.contextmanager
    def perturbed(self, make: Sequence[Callable[[], torch.Tensor]]) -> Iterator[None]:
        if self.kind == "lora":
            try:
                with torch.no_grad():
                    for p, c, fn in zip(self.params, self.clean, make, strict=True):
                        p.copy_((c.float() + fn()).to(p.dtype))
                yield
            finally:
                restore_(self.params, self.clean)
            return
        patches = {
            layer: self._eval_patch(layer, geo, fn)
            for layer, geo, fn in zip(self.layers, self.geos, make, strict=True)
        }
        with _peft.patched_base_forward(patches):
            yield

    @staticmethod
    def _eval_patch(layer: nn.Module, geo: _peft.Geometry, fn: Callable[[], torch.Tensor]):
        def forward(x, original):
            eps = fn()
            weight = _peft.dense_weight(layer)
            if weight is None:  # quantized base: base(x) + op(x, ε)
                return original(x) + geo.apply(x, eps.to(x.dtype), None)
            rows = geo.rows(weight)
            return geo.apply(x, (rows.float() + eps).to(rows.dtype), _peft.base_bias(layer))

        return forward

    # Tensors T with ∂L/∂T = ∇_θ L(θ + ε), shaped like ``self.shapes``.
    @contextlib.contextmanager
    def at_point(self, eps: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        if self.kind == "lora":
            try:
                with torch.no_grad():
                    for p, c, e in zip(self.params, self.clean, eps, strict=True):
                        p.copy_((c.float() + e).to(p.dtype))
                yield list(self.params)
            finally:
                restore_(self.params, self.clean)
            return
        leaves = [e.detach().requires_grad_(True) for e in eps]  # views of ε: no copy
        patches = {
            layer: self._additive_patch(geo, leaf)
            for layer, geo, leaf in zip(self.layers, self.geos, leaves, strict=True)
        }
        with _peft.patched_base_forward(patches):
            yield leaves

    @staticmethod
    def _additive_patch(geo: _peft.Geometry, eps: torch.Tensor):
        # base(x) + op(x, ε): only ε (which exists anyway) and x are saved for backward, so no
        # weight-sized copy of W0 + ε is kept alive until backward.
        return lambda x, original: original(x) + geo.apply(x, eps.to(x.dtype), None)

    # Tensors T at the clean point for Hessian-vector products (shapes may be the stored layout).
    @contextlib.contextmanager
    def hessian_tensors(self) -> Iterator[list[torch.Tensor]]:
        if self.kind == "lora":
            yield list(self.params)
            return
        uses = Counter(id(p) for _, p in self.inner.named_parameters(remove_duplicate=False))
        tensors: list[torch.Tensor] = []
        switched: list[torch.Tensor] = []
        patches = {}
        try:
            for layer, geo in zip(self.layers, self.geos, strict=True):
                weight = _peft.dense_weight(layer)
                if weight is not None and uses[id(weight)] <= 1:
                    if not weight.requires_grad:
                        weight.requires_grad_(True)
                        switched.append(weight)
                    tensors.append(weight)
                else:  # quantized or tied: differentiate through a zero probe added to the output
                    probe = torch.zeros(geo.m, geo.n, device=_device_of(layer), requires_grad=True)
                    patches[layer] = self._additive_patch(geo, probe)
                    tensors.append(probe)
            with _peft.patched_base_forward(patches):
                yield tensors
        finally:
            for weight in switched:
                weight.requires_grad_(False)


def _device_of(layer: nn.Module) -> torch.device:
    for t in layer.get_base_layer().parameters():
        return t.device
    return torch.device("cpu")


# -- shared machinery ----------------------------------------------------------------------------


class _Context:
    """Validated inputs of one measurement: space, batches, loss function."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, batches: Iterable[Any], space: str) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar tensor (or None)")
        self.model = model
        self.loss_fn = loss_fn or _model_loss
        self.space = _Space(model, space)
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("batches is empty; pass at least one batch (e.g. a list of dicts of tensors)")

    def loss(self, batch: Any) -> torch.Tensor:
        out = self.loss_fn(self.model, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise TypeError(
                "loss_fn(model, batch) must return a scalar tensor, e.g. lambda m, b: m(**b).loss; "
                f"got {type(out).__name__}"
            )
        return out.reshape(()).float()

    @torch.no_grad()
    def mean_loss(self) -> float:
        return float(sum(float(self.loss(b)) for b in self.batches) / len(self.batches))

    def loss_and_grad(self, tensors: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """Mean loss and its gradient w.r.t. ``tensors`` (fp32), accumulated batch by batch."""
        total = 0.0
        grads = [torch.zeros(t.shape, device=t.device) for t in tensors]
        with torch.enable_grad():
            for batch in self.batches:
                loss = self.loss(batch) / len(self.batches)
                parts = torch.autograd.grad(loss, tensors, allow_unused=True)
                for acc, g in zip(grads, parts, strict=True):
                    if g is not None:
                        acc.add_(g.float())
                total += float(loss.detach())
        return total, grads

    def hvp(self, tensors: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """Mean loss and the Hessian-vector product H·v (fp32) w.r.t. ``tensors``."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        total = 0.0
        out = [torch.zeros(t.shape, device=t.device) for t in tensors]
        # Fused attention kernels have no double backward; the math kernel computes the same function.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            for batch in self.batches:
                loss = self.loss(batch) / len(self.batches)
                grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
                used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if used:
                    hv = torch.autograd.grad(
                        [grads[i] for i in used],
                        tensors,
                        grad_outputs=[vs[i].to(grads[i].dtype) for i in used],
                        allow_unused=True,
                    )
                    for acc, h in zip(out, hv, strict=True):
                        if h is not None:
                            acc.add_(h.float())
                total += float(loss.detach())
        return total, out


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


@contextlib.contextmanager
def _measurement(
    model: nn.Module, loss_fn: LossFn | None, batches: Iterable[Any], space: str
) -> Iterator[_Context]:
    """The model at its clean point for one measurement: ``eval()`` mode (each module's mode restored
    afterwards) and, when a flatpeft method is attached, inside its :meth:`~flatpeft.Method.exported`
    block, so the adapter holds the stock LoRA weights it would be saved with."""
    inner = _peft.check_peft_model(model)
    method = getattr(inner, _METHOD_ATTR, None)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with method.exported() if method is not None else contextlib.nullcontext():
            yield _Context(model, loss_fn, batches, space)
    finally:
        for m, training in modes:
            m.training = training


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum(float((x.float() * y.float()).sum()) for x, y in zip(xs, ys, strict=True)))


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"the loss at the clean point is {value} ({what}); check the model and the batches")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


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
        model: A ``peft.PeftModel`` with LoRA adapters.
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
        model: A ``peft.PeftModel`` with LoRA adapters.
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
        model: A ``peft.PeftModel`` with LoRA adapters.
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
        model: A ``peft.PeftModel`` with LoRA adapters.
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


def _random_vector(
    tensors: Sequence[torch.Tensor], seed: int, tag: int, draw: int, rademacher: bool
) -> list[torch.Tensor]:
    out = []
    for j, t in enumerate(tensors):
        gen = torch.Generator(device=t.device)
        gen.manual_seed(mix_seed(seed, tag, draw, j))
        if rademacher:
            z = torch.randint(0, 2, t.shape, generator=gen, device=t.device).float().mul_(2).sub_(1)
        else:
            z = torch.randn(t.shape, generator=gen, device=t.device)
        out.append(z)
    return out


# -- loss landscapes -----------------------------------------------------------------------------


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    dims: int = 1,
    radius: float = 1.0,
    points: int = 21,
    space: Space = "full",
    seed: int = 0,
    progress: bool = True,
) -> Landscape:
    """Loss along 1 or 2 filter-normalised random directions (Li et al., 2018).

    Each direction ``d`` is a seeded Gaussian whose rows are rescaled to the norms of the weight
    rows, ``‖d_i‖ = ‖θ_i‖`` (so a coordinate of 1 moves every filter by its own length). The grid is
    ``points`` evenly spaced coordinates in ``[−radius, radius]`` per direction. Directions are
    regenerated from their seeds at every point, never stored. The model is put in ``eval()`` mode
    and left bit-identical.

    Args:
        model: A ``peft.PeftModel`` with LoRA adapters.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; ``None`` means ``model(**batch).loss``.
        batches: The evaluation batches (read once into a list; ``L`` is the mean over them).
        dims: 1 (a line) or 2 (a surface).
        radius: Half-width of the grid, in units of the filter norms.
        points: Grid points per direction (odd numbers include the clean point).
        space: ``"full"`` (effective weights of the adapted layers) or ``"lora"`` (adapter factors).
        seed: Seed of the directions.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`Landscape` (serialise with ``to_json``, draw with :func:`plot_landscape`).

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``loss_fn`` does not return a scalar tensor.
        ValueError: invalid ``dims``, ``radius``, ``points`` or ``space``, empty ``batches``,
            non-finite loss.
    """
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 (a line) or 2 (a surface), got {dims!r}")
    _positive("radius", radius)
    _count("points", points, minimum=2)
    config = {"dims": dims, "radius": radius, "points": points, "seed": seed}
    coords = [-radius + 2.0 * radius * i / (points - 1) for i in range(points)]
    grid = [(a,) for a in coords] if dims == 1 else [(a, b) for a in coords for b in coords]
    values: list[float] = []
    with _measurement(model, loss_fn, batches, space) as ctx:
        sp = ctx.space
        # Row scale of direction k: ‖θ_i‖ / ‖g_i‖ for the unit Gaussian g regenerated from its seed.
        seeds = [[mix_seed(seed, _LANDSCAPE, k, j) for j in range(len(sp.shapes))] for k in range(dims)]
        scales = [
            [
                n / _rows_of(sp.noise(j, torch.ones_like(n), seeds[k][j])).norm(dim=1)
                for j, n in enumerate(sp.row_norms)
            ]
            for k in range(dims)
        ]

        def direction(j: int, ab: tuple[float, ...]) -> Callable[[], torch.Tensor]:
            def make() -> torch.Tensor:
                out = sp.noise(j, scales[0][j] * ab[0], seeds[0][j])
                for k in range(1, dims):
                    out.add_(sp.noise(j, scales[k][j] * ab[k], seeds[k][j]))
                return out

            return make

        base = ctx.mean_loss()
        _check_finite(base, "loss_landscape")
        with _bar(len(grid), f"loss landscape ({space}, {dims}-D)", progress) as bar:
            for ab in grid:
                with sp.perturbed([direction(j, ab) for j in range(len(sp.shapes))]):
                    values.append(ctx.mean_loss())
                bar.update(1)
    losses: list[Any] = (
        values if dims == 1 else [values[i * points : (i + 1) * points] for i in range(points)]
    )
    return Landscape(space, dims, coords, coords if dims == 2 else [], losses, base, config)


def plot_landscape(
    result: Landscape | Sequence[Landscape], path: str | Path, *, title: str | None = None
) -> Path:
    """Draw a :class:`Landscape` to a PNG: a line for 1-D, filled contours for 2-D.

    Several 1-D landscapes (e.g. the full and the LoRA space of one adapter) are drawn as one line
    each on shared axes. Uses matplotlib's object API (no pyplot, no global backend change).

    Args:
        result: The output of :func:`loss_landscape` (or ``Landscape.from_dict`` of its JSON), or a
            sequence of 1-D landscapes to overlay.
        path: Where to write the PNG (parent folders are created).
        title: Figure title (default: the space and dimension).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'flatpeft[plot]'``).
        TypeError: ``result`` is not a :class:`Landscape` (or a sequence of them).
        ValueError: an empty sequence, or a sequence that mixes in a 2-D landscape.
    """
    if isinstance(result, Landscape):
        results = [result]
    elif isinstance(result, Sequence) and all(isinstance(r, Landscape) for r in result):
        results = list(result)
    else:
        raise TypeError(
            "plot_landscape needs a Landscape from loss_landscape() (or a list of 1-D ones), "
            f"got {type(result).__name__}"
        )
    if not results:
        raise ValueError("plot_landscape got an empty list; pass at least one Landscape")
    if len(results) > 1 and any(r.dims != 1 for r in results):
        raise ValueError("only 1-D landscapes can be overlaid; plot each 2-D landscape to its own file")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_landscape needs matplotlib: pip install 'flatpeft[plot]'") from err
    fig = Figure(figsize=(5.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    first = results[0]
    if first.dims == 1:
        for r in results:
            ax.plot(r.alphas, r.losses, marker="o", markersize=3, label=f"{r.space} space")
        ax.axhline(first.base_loss, color="grey", linewidth=0.8, linestyle="--", label="clean loss")
        ax.set_xlabel("α (filter-normalised random direction)")
        ax.set_ylabel("loss")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend()
        default = f"loss landscape ({', '.join(r.space for r in results)} space{'s' * (len(results) > 1)})"
    else:
        # losses[i][j] is at (alphas[i], betas[j]): x = α runs along the first index.
        z = [list(col) for col in zip(*first.losses, strict=True)]
        filled = ax.contourf(first.alphas, first.betas, z, levels=20, cmap="viridis")
        ax.contour(first.alphas, first.betas, z, levels=20, colors="white", linewidths=0.3)
        bar = fig.colorbar(filled, ax=ax, label="loss")
        bar.formatter.set_useOffset(False)
        bar.update_ticks()
        ax.plot([0.0], [0.0], marker="+", color="red")
        ax.set_xlabel("α")
        ax.set_ylabel("β")
        default = f"loss landscape ({first.space} space, 2-D)"
    ax.set_title(title or default)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
