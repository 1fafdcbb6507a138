"""An adapted layer's base: its geometry, its (dequantized) weight, effective rows and row norms, and
the base-forward patching every functional perturbation goes through."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._sharded import is_sharded
from .model import scaling

__all__ = [
    "Geometry",
    "base_bias",
    "base_row_sq",
    "base_rows",
    "dense_weight",
    "dequantized",
    "effective_row_norms",
    "effective_rows",
    "geometry",
    "patched_base_forward",
    "plain_lora_factors",
]


@dataclass(frozen=True)
class Geometry:
    """How an adapted layer's base op maps a weight to outputs.

    ``rows`` are output features (filters): ``m`` of them, each with ``n`` = fan-in entries. Weights
    handed to :meth:`apply` are in this row layout, whatever the stored layout (GPT-2 ``Conv1D``
    stores ``(in, out)``; ``nn.Conv1d/2d/3d`` store ``(out, in/groups, *kernel)``: a row is one output
    filter, ``n`` = in/groups × kernel volume).
    """

    kind: str  # "linear" | "conv1d" (GPT-2 Conv1D / fan_in_fan_out) | "conv" (nn.Conv1d/2d/3d)
    m: int
    n: int
    base: nn.Module

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight viewed as an ``(m, n)`` matrix of rows."""
        if self.kind == "conv1d":
            return weight.t()
        return weight.reshape(self.m, self.n)

    def apply(self, x: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base op with weight ``rows`` (``(m, n)``) instead of the stored weight."""
        if self.kind == "conv":
            b = self.base
            conv = (F.conv1d, F.conv2d, F.conv3d)[b.weight.dim() - 3]
            return conv(x, rows.reshape(b.weight.shape), bias, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, rows, bias)

    def input_grad(self, grad_out: torch.Tensor, rows: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        """Gradient of :meth:`apply` with respect to its input."""
        if self.kind == "conv":
            b = self.base
            w = rows.reshape(b.weight.shape)
            grad = torch.nn.grad
            conv_input = (grad.conv1d_input, grad.conv2d_input, grad.conv3d_input)[w.dim() - 3]
            return conv_input(x_shape, w, grad_out, b.stride, b.padding, b.dilation, b.groups)
        return grad_out @ rows

    def bias_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Gradient of :meth:`apply` with respect to the bias."""
        if self.kind == "conv":
            return grad_out.sum(dim=(0, *range(2, grad_out.dim())))
        return grad_out.reshape(-1, self.m).sum(0)


def _dense_weight(base: nn.Module) -> torch.Tensor | None:
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or (type(w) not in (torch.Tensor, nn.Parameter) and not is_sharded(w)):
        return None  # bitsandbytes / torchao / other quantized storage
    return w if w.is_floating_point() else None


def geometry(layer: nn.Module) -> Geometry:
    """The :class:`Geometry` of a LoRA layer's base layer.

    Raises:
        ValueError: for layer types flatpeft cannot perturb (embeddings, convolutions with non-zero
            padding modes or string padding, ...).
    """
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    fifo = bool(getattr(layer, "fan_in_fan_out", False))
    if isinstance(base, Conv1D) or (fifo and isinstance(base, nn.Linear)):
        in_f, out_f = base.weight.shape
        return Geometry("conv1d", out_f, in_f, base)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(
                f"{type(base).__name__} with padding={base.padding!r}/{base.padding_mode!r} is not "
                "supported; use numeric zero padding or exclude the layer from LoraConfig.target_modules"
            )
        return Geometry("conv", base.out_channels, base.weight[0].numel(), base)
    if isinstance(base, nn.Linear) or (hasattr(base, "in_features") and hasattr(base, "out_features")):
        return Geometry("linear", base.out_features, base.in_features, base)
    raise ValueError(
        f"flatpeft can perturb LoRA layers on Linear, GPT-2 Conv1D and Conv1d/2d/3d modules, not "
        f"{type(base).__name__}; exclude it from LoraConfig.target_modules"
    )


def dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """The base layer's stored float weight, or ``None`` when it is quantized (an FSDP2 shard between
    forward passes, the whole weight inside the sharded block's forward)."""
    return _dense_weight(layer.get_base_layer())


def dequantized(base: nn.Module) -> torch.Tensor:
    """A quantized base layer's weight in float, by PEFT's helpers.

    bitsandbytes weights go through ``dequantize_bnb_weight`` directly: ``dequantize_module_weight``
    re-assigns an 8-bit weight on CPU, which drops its scales and breaks the layer's next forward.
    A 4-bit weight that bitsandbytes repacked for its CPU kernels (it does so on an inference
    forward) is unpacked from a copy of its quantization state first, so the layer is left as it was.
    """
    from peft.utils.integrations import dequantize_bnb_weight, dequantize_module_weight

    weight = base.weight
    kind = type(weight).__name__
    if kind == "Params4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes import functional as bnb_f

        data, state = bnb_f._convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(weight.quant_state))
        return bnb_f.dequantize_4bit(data, state)
    if kind in ("Params4bit", "Int8Params"):
        return dequantize_bnb_weight(weight, state=getattr(base, "state", None))
    return dequantize_module_weight(base)


def effective_rows(layer: nn.Module, geo: Geometry, adapter: str) -> torch.Tensor:
    """W' = W0 + ΔW of ``layer`` as an ``(m, n)`` fp32 matrix (no autograd), dequantizing if needed.

    ΔW is PEFT's own ``get_delta_weight`` so LoRA variants (rsLoRA scaling) are respected.
    """
    with torch.no_grad():
        base = layer.get_base_layer()
        w0 = _dense_weight(base)
        if w0 is None:
            w0 = dequantized(base)
        delta = layer.get_delta_weight(adapter)
        return geo.rows(w0.float() + delta.float())


def base_rows(layer: nn.Module, geo: Geometry) -> torch.Tensor:
    """The frozen base weight as ``(m, n)`` rows (dequantized if needed; a view when dense)."""
    base = layer.get_base_layer()
    w0 = _dense_weight(base)
    return geo.rows(w0 if w0 is not None else dequantized(base))


@torch.no_grad()
def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row, accumulated in fp32 (fp64 for an fp64 tensor), returned in fp32."""
    wide = torch.promote_types(rows.dtype, torch.float32)  # never narrowed: fp64 rows stay exact
    return torch.linalg.vector_norm(rows, dim=1, dtype=wide).float()


def base_row_sq(layer: nn.Module, w0: torch.Tensor, cache: dict | None) -> torch.Tensor:
    """‖W0_i‖² in fp32, from ``cache`` while the stored weight is unchanged (same object, dtype,
    device, shape and in-place version counter), else computed (and cached)."""
    if cache is None:
        return row_norms(w0).square_()
    weight = layer.get_base_layer().weight
    key = (id(weight), getattr(weight, "_version", None), w0.dtype, w0.device, tuple(w0.shape))
    if cache.get("key") != key:
        cache["key"], cache["value"] = key, row_norms(w0).square_()
    return cache["value"]


def plain_lora_factors(
    layer: nn.Module, geo: Geometry, adapter: str
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, s)`` with W' = W0 + s·B·A on the ``(m, n)`` rows, A ``(r, n)`` and B ``(m, r)`` in fp32,
    for a linear layer whose delta is exactly that; ``None`` for convolutions and LoRA variants whose
    delta is not s·B·A of ``nn.Linear`` factors (DoRA, AdaLoRA's SVD factors)."""
    plain = isinstance(layer.lora_B[adapter], nn.Module) if adapter in layer.lora_B else False
    if geo.kind == "conv" or adapter in getattr(layer, "lora_variant", {}) or not plain:
        return None
    return layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float(), scaling(layer, adapter)


def effective_row_norms(
    layer: nn.Module, geo: Geometry, adapter: str, cache: dict | None = None
) -> torch.Tensor:
    """‖W'_i‖₂ for every row of W' = W0 + s·B·A, in fp32, without forming W'.

    ‖W'_i‖² = ‖W0_i‖² + s·B_i·(2·(W0·Aᵀ)_i + s·(B·A·Aᵀ)_i)ᵀ costs one read of W0 and one (m·n·r)
    product instead of materialising B·A and W', plus a few (m × r)-sized operations. Layers without
    plain factors (:func:`plain_lora_factors`) go through :func:`effective_rows`.

    Args:
        cache: A dict the caller keeps per layer: ‖W0_i‖² (W0 is frozen) is then computed once and
            reused while the stored weight is unchanged, so the per-step pass over W0 is the cross
            term's W0·Aᵀ product alone. Call where the whole weight is at hand (inside the layer's
            forward under FSDP2, where the weight is unsharded).
    """
    factors = plain_lora_factors(layer, geo, adapter)
    if factors is None:
        return effective_rows(layer, geo, adapter).norm(dim=1)
    a, b, s = factors
    w0 = base_rows(layer, geo)
    base_sq = base_row_sq(layer, w0, cache)
    cross = (w0 @ a.t().to(w0.dtype)).float()  # (W0·Aᵀ), m × r
    terms = torch.addmm(cross, b, a @ a.t(), beta=2.0, alpha=s)  # 2·W0·Aᵀ + s·B·A·Aᵀ
    lora_sq = torch.bmm(terms.unsqueeze(1), b.unsqueeze(2)).view(-1)  # row-wise ⟨terms_i, B_i⟩
    return base_sq.add(lora_sq, alpha=s).clamp_min_(0).sqrt_()


def base_bias(layer: nn.Module) -> torch.Tensor | None:
    """The base layer's bias (``None`` if it has none)."""
    return getattr(layer.get_base_layer(), "bias", None)


@contextlib.contextmanager
def patched_base_forward(patches: dict[nn.Module, Callable[..., torch.Tensor]]) -> Iterator[None]:
    """Within the block, each LoRA layer's base layer computes ``patches[layer](x, original_forward)``.

    The stored weights are never touched: a perturbation is applied functionally, so restoring the
    model is removing the instance attribute that overrides ``forward``.
    """
    patched = []
    try:
        for layer, fn in patches.items():
            base = layer.get_base_layer()
            original = base.forward
            # An instance-level forward (e.g. an Accelerate offload hook) is put back afterwards.
            previous = base.__dict__.get("forward")

            def forward(x, *args, _fn=fn, _orig=original, **kwargs):
                return _fn(x, lambda y: _orig(y, *args, **kwargs))

            base.forward = forward
            patched.append((base, previous))
        yield
    finally:
        for base, previous in patched:
            if previous is None:
                del base.forward
            else:
                base.forward = previous
