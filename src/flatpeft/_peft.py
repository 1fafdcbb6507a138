"""Everything flatpeft knows about PEFT internals lives here.

The rest of the package sees an adapted layer through :class:`Geometry` (its weight viewed as an
``(out, fan_in)`` matrix of rows, and the base op applied with a substitute weight) and through the
helpers below (active adapter, adapter parameters, effective weight, base-forward patching).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._sharded import full, is_sharded, like

__all__ = [
    "Geometry",
    "active_adapter",
    "adapter_parameters",
    "check_peft_model",
    "effective_rows",
    "geometry",
    "lora_layers",
    "patched_base_forward",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def _lora_layer_class() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def check_peft_model(model: nn.Module) -> nn.Module:
    """Validate that ``model`` is a PEFT model with unmerged LoRA layers; return the unwrapped model.

    Raises:
        TypeError: if ``model`` is not a ``peft.PeftModel``.
        ValueError: if it has no LoRA layers or its adapters are merged.
    """
    from peft import PeftModel

    inner = unwrap_model(model)
    if not isinstance(inner, PeftModel):
        raise TypeError(
            f"flatpeft needs a peft.PeftModel with LoRA adapters, got {type(model).__name__}; "
            "wrap your model first: model = peft.get_peft_model(model, peft.LoraConfig(...))"
        )
    layers = [m for m in inner.modules() if isinstance(m, _lora_layer_class())]
    if not layers:
        raise ValueError(
            "the model has no LoRA layers; create it with peft.get_peft_model(model, LoraConfig(...)) "
            "and check that LoraConfig.target_modules matches some of its layers"
        )
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError("the model has merged LoRA adapters; call model.unmerge_adapter() before attaching")
    return inner


def active_adapter(model: nn.Module) -> str:
    """Name of the single active adapter of a PEFT model."""
    inner = unwrap_model(model)
    active = inner.active_adapters if hasattr(inner, "active_adapters") else [inner.active_adapter]
    if len(active) != 1:
        raise ValueError(f"flatpeft trains exactly one active adapter, the model has {list(active)}")
    return active[0]


def lora_layers(model: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every LoRA layer that carries ``adapter``, in module order."""
    cls = _lora_layer_class()
    out = []
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, cls) and (adapter in m.lora_A or adapter in m.lora_embedding_A):
            out.append((name, m))
    return out


def adapter_parameters(layers: list[tuple[str, nn.Module]], adapter: str) -> list[nn.Parameter]:
    """Trainable parameters of ``adapter`` in ``layers`` (A, B, DoRA magnitude, embedding factors)."""
    params: list[nn.Parameter] = []
    for _, layer in layers:
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if container is None or adapter not in container:
                continue
            item = container[adapter]
            tensors = item.parameters() if isinstance(item, nn.Module) else [item]
            params.extend(p for p in tensors if p.requires_grad)
    return params


def scaling(layer: nn.Module, adapter: str) -> float:
    """PEFT's ``scaling[adapter]`` (lora_alpha / r, or / sqrt(r) with rsLoRA)."""
    return float(layer.scaling[adapter])


# -- geometry of an adapted layer ------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How an adapted layer's base op maps a weight to outputs.

    ``rows`` are output features (filters): ``m`` of them, each with ``n`` = fan-in entries. Weights
    handed to :meth:`apply` are in this row layout, whatever the stored layout (GPT-2 ``Conv1D``
    stores ``(in, out)``; ``Conv2d`` stores ``(out, in/groups, kh, kw)``).
    """

    kind: str  # "linear" | "conv1d" (fan_in_fan_out) | "conv2d"
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
        if self.kind == "conv2d":
            b = self.base
            return F.conv2d(x, rows.reshape(b.weight.shape), bias, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, rows, bias)

    def input_grad(self, grad_out: torch.Tensor, rows: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        """Gradient of :meth:`apply` with respect to its input."""
        if self.kind == "conv2d":
            b = self.base
            w = rows.reshape(b.weight.shape)
            return torch.nn.grad.conv2d_input(x_shape, w, grad_out, b.stride, b.padding, b.dilation, b.groups)
        return grad_out @ rows

    def bias_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Gradient of :meth:`apply` with respect to the bias."""
        if self.kind == "conv2d":
            return grad_out.sum(dim=(0, 2, 3))
        return grad_out.reshape(-1, self.m).sum(0)


def _dense_weight(base: nn.Module) -> torch.Tensor | None:
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or (type(w) not in (torch.Tensor, nn.Parameter) and not is_sharded(w)):
        return None  # bitsandbytes / torchao / other quantized storage
    return w if w.is_floating_point() else None


def geometry(layer: nn.Module) -> Geometry:
    """The :class:`Geometry` of a LoRA layer's base layer.

    Raises:
        ValueError: for layer types flatpeft cannot perturb (embeddings, 3-D convolutions, ...).
    """
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    fifo = bool(getattr(layer, "fan_in_fan_out", False))
    if isinstance(base, Conv1D) or (fifo and isinstance(base, nn.Linear)):
        in_f, out_f = base.weight.shape
        return Geometry("conv1d", out_f, in_f, base)
    if isinstance(base, nn.Conv2d):
        if base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(f"Conv2d with padding={base.padding!r}/{base.padding_mode!r} is not supported")
        out_c = base.out_channels
        return Geometry("conv2d", out_c, base.weight[0].numel(), base)
    if isinstance(base, nn.Linear) or (hasattr(base, "in_features") and hasattr(base, "out_features")):
        return Geometry("linear", base.out_features, base.in_features, base)
    raise ValueError(
        f"flatpeft can perturb LoRA layers on Linear, GPT-2 Conv1D and Conv2d modules, not "
        f"{type(base).__name__}; exclude it from LoraConfig.target_modules"
    )


def dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """The base layer's stored float weight, or ``None`` when it is quantized (an FSDP2 shard between
    forward passes, the whole weight inside the sharded block's forward)."""
    return _dense_weight(layer.get_base_layer())


def _dequantized(base: nn.Module) -> torch.Tensor:
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
            w0 = _dequantized(base)
        delta = layer.get_delta_weight(adapter)
        return geo.rows(w0.float() + delta.float())


def base_rows(layer: nn.Module, geo: Geometry) -> torch.Tensor:
    """The frozen base weight as ``(m, n)`` rows (dequantized if needed; a view when dense)."""
    base = layer.get_base_layer()
    w0 = _dense_weight(base)
    return geo.rows(w0 if w0 is not None else _dequantized(base))


@torch.no_grad()
def effective_row_norms(layer: nn.Module, geo: Geometry, adapter: str) -> torch.Tensor:
    """‖W'_i‖₂ for every row of W' = W0 + s·B·A, in fp32, without forming W'.

    ‖W'_i‖² = ‖W0_i‖² + 2s·⟨(W0·Aᵀ)_i, B_i⟩ + s²·B_i(A·Aᵀ)B_iᵀ costs one read of W0 and one
    (m·n·r) product instead of materialising B·A and W'. Conv2d layers and LoRA variants whose delta
    is not s·B·A of ``nn.Linear`` factors (DoRA, AdaLoRA's SVD factors) go through :func:`effective_rows`.
    """
    plain = isinstance(layer.lora_B[adapter], nn.Module) if adapter in layer.lora_B else False
    if geo.kind == "conv2d" or adapter in getattr(layer, "lora_variant", {}) or not plain:
        return effective_rows(layer, geo, adapter).norm(dim=1)
    s = scaling(layer, adapter)
    b = layer.lora_B[adapter].weight.float()
    a = layer.lora_A[adapter].weight.float()
    w0 = base_rows(layer, geo)
    base_sq = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32).square_()
    cross = ((w0 @ a.t().to(w0.dtype)).float() * b).sum(1)
    quad = ((b @ (a @ a.t())) * b).sum(1)
    return (base_sq + 2 * s * cross + s * s * quad).clamp_min_(0).sqrt_()


def prune_saved_adapters(output_dir: str, model: nn.Module, keep: str) -> None:
    """Remove the folders ``save_pretrained`` wrote for adapters other than ``keep``.

    PEFT writes a non-default adapter ``name`` under ``output_dir/name``; auxiliary adapters a method
    adds while training must never be shipped.
    """
    import os
    import shutil

    for name in getattr(unwrap_model(model), "peft_config", {}):
        path = os.path.join(output_dir, name)
        if name != keep and os.path.isfile(os.path.join(path, "adapter_config.json")):
            shutil.rmtree(path)


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


# -- auxiliary adapters (bi_lora) ------------------------------------------------------------------


def _fork_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def add_aux_adapter(model: nn.Module, primary: str, name: str, r: int) -> list[nn.Module]:
    """Add a LoRA adapter ``name`` of rank ``r`` on exactly the layers that carry ``primary``.

    It goes through PEFT's own ``add_adapter`` (so ``peft_config``, saving filters and
    ``delete_adapter`` know it), with the primary's ``lora_alpha``, ``fan_in_fan_out`` and
    ``use_rslora``, no dropout, no bias, no DoRA and no ``modules_to_save`` (the base
    ``PeftModel.add_adapter`` is called so that task models such as ``SEQ_CLS`` do not give the
    auxiliary adapter its own classifier copy). The new adapter stays inactive; its parameters are
    trainable. PEFT's initialisation draws from the global RNG, whose state is put back afterwards:
    the caller re-initialises the factors from its own generator.

    Returns:
        The LoRA layers carrying ``primary`` (now also carrying ``name``), in module order.

    Raises:
        ValueError: if an adapter called ``name`` exists already.
    """
    from peft import LoraConfig, PeftModel

    inner = unwrap_model(model)
    if name in inner.peft_config:
        raise ValueError(f"the model already has an adapter named {name!r}; delete it or detach its method")
    primary_config = inner.peft_config[primary]
    cls = _lora_layer_class()
    targets = [
        key
        for key, m in inner.base_model.model.named_modules()
        if isinstance(m, cls) and (primary in m.lora_A or primary in m.lora_embedding_A)
    ]
    config = LoraConfig(
        r=r,
        lora_alpha=primary_config.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=primary_config.fan_in_fan_out,
        use_rslora=primary_config.use_rslora,
        bias="none",
    )
    with torch.random.fork_rng(devices=_fork_devices()):
        PeftModel.add_adapter(inner, name, config)
    layers = [layer for _, layer in lora_layers(inner, primary)]
    for layer in layers:
        if name not in layer.lora_A and name not in layer.lora_embedding_A:
            remove_aux_adapter(inner, name)
            raise ValueError(f"PEFT could not add the auxiliary adapter {name!r} to {type(layer).__name__}")
    for p in aux_parameters(layers, name):
        p.requires_grad_(True)
    return layers


def remove_aux_adapter(model: nn.Module, name: str) -> None:
    """Delete the auxiliary adapter ``name`` (no-op if it is gone); the active adapter is unchanged."""
    inner = unwrap_model(model)
    if name in inner.peft_config:
        inner.delete_adapter(name)


def aux_factors(layer: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The ``(B, A)`` parameters of adapter ``name`` in ``layer``: ΔW = scaling · B·A (transposed for
    embeddings and ``fan_in_fan_out``; for convolutions B is a 1×1 kernel and A is flattened per rank)."""
    if name in layer.lora_A:
        return layer.lora_B[name].weight, layer.lora_A[name].weight
    return layer.lora_embedding_B[name], layer.lora_embedding_A[name]


def aux_parameters(layers: list[nn.Module], name: str) -> list[nn.Parameter]:
    """``[B, A]`` of adapter ``name`` for every layer, in layer order."""
    return [p for layer in layers for p in aux_factors(layer, name)]


def all_adapter_parameters(layer: nn.Module) -> Iterator[nn.Parameter]:
    """Every adapter parameter of a LoRA layer (all adapters: A, B, DoRA magnitudes, embeddings)."""
    for attr in layer.adapter_layer_names:
        for item in getattr(layer, attr, {}).values():
            yield from item.parameters() if isinstance(item, nn.Module) else [item]


@contextlib.contextmanager
def adapters_active(layers: list[nn.Module], names: list[str]) -> Iterator[None]:
    """Within the block, ``layers`` run every adapter in ``names`` (their outputs add up).

    Uses each layer's own ``set_adapter`` (the model-level active adapter, ``modules_to_save`` and
    ``peft_config`` are untouched) and restores each layer's previous active adapters on exit.
    ``set_adapter`` flips ``requires_grad`` of the adapters it (de)activates; the flags of every
    adapter parameter are put back exactly as they were, so inactive adapters stay trainable.
    """
    previous = [list(layer.active_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for p in all_adapter_parameters(layer)]

    def restore_flags() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    try:
        for layer in layers:
            layer.set_adapter(list(names))
        restore_flags()
        yield
    finally:
        for layer, active in zip(layers, previous, strict=True):
            layer.set_adapter(active)
        restore_flags()


def _fusable(layer: nn.Module, primary: str, aux: str) -> bool:
    """Whether ``layer`` runs ``primary`` and ``aux`` as vanilla LoRA on a dense base (no DoRA or other
    variant, no LoRA bias, factors of one dtype, no instance-level forward such as an offload hook)."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or "forward" in layer.__dict__:
        return False
    if primary not in layer.lora_A or aux not in layer.lora_A:
        return False
    for name in (primary, aux):
        if layer.use_dora.get(name, False) or name in getattr(layer, "lora_variant", {}):
            return False
        if layer.lora_B[name].bias is not None:
            return False
    return layer.lora_A[primary].weight.dtype == layer.lora_A[aux].weight.dtype


class _Ascent(torch.autograd.Function):
    """Identity forward, negated gradient backward: the factors it wraps are trained by ascent."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg()


def _fused_forward(
    layer: nn.Module,
    primary: str,
    aux: str,
    original: Callable[..., torch.Tensor],
    x: torch.Tensor,
    *args,
    **kw,
) -> torch.Tensor:
    """``W0·x + [s1·B1, s2·B2]·[A1·dropout(x); A2·x]``: PEFT's two-adapter sum as one rank-(r1+r2)
    branch (one matmul per side instead of two), with the gradient of (B2, A2) negated in the graph.
    Anything unusual takes PEFT's own forward."""
    if args or kw or layer.disable_adapters or layer.merged or list(layer.active_adapters) != [primary, aux]:
        return original(x, *args, **kw)
    result = layer.base_layer(x)
    result_dtype = result.dtype
    a1, a2 = layer.lora_A[primary].weight, _Ascent.apply(layer.lora_A[aux].weight)
    b1, b2 = layer.lora_B[primary].weight, _Ascent.apply(layer.lora_B[aux].weight)
    cast = getattr(layer, "_cast_input_dtype", None)
    x = cast(x, a1.dtype) if cast is not None else x.to(a1.dtype)
    dropout = layer.lora_dropout[primary]
    if isinstance(dropout, nn.Identity):
        h = F.linear(x, torch.cat([a1, a2]))
    else:  # the auxiliary branch is a weight perturbation: it sees the input without dropout
        h = torch.cat([F.linear(dropout(x), a1), F.linear(x, a2)], dim=-1)
    b = torch.cat([b1 * layer.scaling[primary], b2 * layer.scaling[aux]], dim=1)
    return (result + F.linear(h, b)).to(result_dtype)


@contextlib.contextmanager
def fused_adapters(layers: list[nn.Module], primary: str, aux: str) -> Iterator[list[nn.Module]]:
    """Within the block, ``layers`` run ``primary`` and ``aux`` together (as :func:`adapters_active`),
    ``aux`` trained by gradient ascent; yields the layers whose ``aux`` gradient is NOT negated.

    Plain LoRA ``Linear`` layers (``nn.Linear`` or GPT-2 ``Conv1D`` bases; no DoRA, variant or LoRA
    bias) compute both adapters as ONE branch of rank r1 + r2: A = [A1; A2], B = [s1·B1, s2·B2]. This
    is the same function and the same gradients for every factor (up to float summation order) at
    about half the small-matmul calls, except that the graph negates the gradient of B2 and A2 (exact,
    before any accumulation, and on the whole weights an FSDP2-sharded block computes with). The
    other layers use PEFT's own multi-adapter forward with plain gradients: they are yielded.
    """
    with adapters_active(layers, [primary, aux]):
        patched = []
        try:
            for layer in layers:
                if _fusable(layer, primary, aux):
                    layer.forward = functools.partial(_fused_forward, layer, primary, aux, layer.forward)
                    patched.append(layer)
            yield [layer for layer in layers if layer not in patched]
        finally:
            for layer in patched:
                del layer.forward


# -- LoRA factors (fm_lora, eflat_lora) ------------------------------------------------------------


def lora_factors(layer: nn.Module, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The ``(A, B)`` weights of ``adapter`` in ``layer``: ΔW = scaling · B·A on the 2-D views
    ``A.reshape(r, -1)`` and ``B.reshape(B.shape[0], -1)`` (transposed for embeddings and
    ``fan_in_fan_out``; B is a 1×1 kernel for convolutions).

    Raises:
        ValueError: if ``layer`` carries no LoRA factors for ``adapter``.
    """
    if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
        raise ValueError(f"{type(layer).__name__} has no LoRA factors for adapter {adapter!r}")
    b, a = aux_factors(layer, adapter)
    return a, b


# -- per-rank scale between lora_A and lora_B (bilevel_lora) ---------------------------------------


def _rank_dim(module: nn.Module) -> int:
    """Dimension of the rank channel in ``module``'s output (``lora_A``: Linear → last, Conv → 1)."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def check_rank_scalable(name: str, layer: nn.Module, adapter: str) -> None:
    """Check that a per-rank scale on ``lora_A``'s output reaches every use of ΔW in ``layer``.

    True for LoRA on Linear (also GPT-2 ``Conv1D``, quantized bases) and Conv layers, and for DoRA on
    Linear layers (PEFT computes DoRA's weight norm by running ``lora_A``); not for embeddings,
    ``MultiheadAttention``, ``target_parameters`` or other LoRA variants, which read the factors'
    weights directly.

    Raises:
        ValueError: naming the layer and the fix.
    """
    from peft.tuners.lora import layer as lora_layer

    names = ("Embedding", "MultiheadAttention", "ParamWrapper")
    refused = tuple(c for c in (getattr(lora_layer, n, None) for n in names) if c is not None)
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    module = dict(layer.lora_A.items()).get(adapter)
    dora_linear = type(variant).__name__ == "DoraLinearVariant" and isinstance(module, nn.Linear)
    ok = (
        not isinstance(layer, refused)
        and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and (variant is None or dora_linear)
    )
    if not ok:
        what = type(variant).__name__ if variant is not None else type(layer).__name__
        raise ValueError(
            f"{name}: a per-rank scale between lora_A and lora_B cannot be applied to {what}; use plain LoRA "
            "(or DoRA) on Linear/Conv layers, e.g. exclude embeddings from LoraConfig.target_modules"
        )


def rank_factors(layer: nn.Module, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` weights of ``adapter``'s modules: ``A.reshape(r, -1)`` is Q, ``B.reshape(B.shape[0], r)``
    is P, and ΔW = scaling · P·Q in the base layer's ``(out, fan_in)`` row layout."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def add_rank_scale_hook(
    layer: nn.Module, adapter: str, scale: Callable[[], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Multiply the output of ``layer.lora_A[adapter]`` by ``scale()`` (an ``(r,)`` vector) along the rank.

    ΔW becomes scaling · B·diag(scale)·A wherever PEFT runs ``lora_A`` (the forward, mixed-batch and
    DoRA weight-norm paths). ``scale()`` returning ``None`` leaves the output unchanged. Remove the
    returned handle to undo; ``get_delta_weight`` and ``merge`` never see the scale (fold it first).
    """
    module = layer.lora_A[adapter]
    dim = _rank_dim(module)

    def hook(_module, _inputs, output):
        s = scale()
        if s is None:
            return None
        shape = [1] * output.dim()
        shape[dim] = -1
        return output * s.to(device=output.device, dtype=output.dtype).view(shape)

    return module.register_forward_hook(hook)


@torch.no_grad()
def fold_rank_scale_(layer: nn.Module, adapter: str, scale: torch.Tensor) -> None:
    """B ← B·diag(scale) in place: a stock LoRA adapter equal to B·diag(scale)·A (scaling unchanged).
    An FSDP2-sharded B is scaled whole and written back with its placement."""
    b = layer.lora_B[adapter].weight
    shape = [1] * b.dim()
    shape[1] = -1
    whole = full(b)
    b.copy_(like(whole * scale.to(device=whole.device, dtype=b.dtype).view(shape), b))
