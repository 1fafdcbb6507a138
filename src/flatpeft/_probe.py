"""The machinery every :mod:`flatpeft.sharpness` measurement shares: the weight space a measurement
perturbs (:class:`_Space`: the effective weights of the adapted layers or the adapter factors, with
functional full-space perturbations that never write frozen weights), the clean-point context
(:func:`_measurement`), seeded random vectors, argument checks and JSON output."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import _peft, _strict_json
from .method import _ATTR as _METHOD_ATTR
from .perturb import filter_noise, mix_seed, restore_, snapshot

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Space = Literal["full", "lora"]

# Stream tags so that two measurements with the same seed never share a draw.
_EXPECTED, _WORST, _EIGEN, _TRACE, _LANDSCAPE = 1, 2, 3, 4, 5


def _dump(data: dict[str, Any], path: str | Path | None) -> str:
    # Non-finite floats (a loss that overflowed far out on a landscape) become ``null``.
    text = _strict_json.dumps(data, indent=2)
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
