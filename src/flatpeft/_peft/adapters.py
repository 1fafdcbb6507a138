"""Second adapters on the primary's layers (Bi-LoRA's auxiliary branch), running them together (fused
into one rank-(r1+r2) branch where PEFT's layer is plain LoRA), and the LoRA factors of a layer."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .model import AUX_MARK, _lora_layer_class, all_adapter_parameters, lora_layers, unwrap_model

__all__ = [
    "adapters_active",
    "add_aux_adapter",
    "aux_factors",
    "aux_parameters",
    "fused_adapters",
    "lora_factors",
    "remove_aux_adapter",
]


def _fork_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def add_aux_adapter(model: nn.Module, primary: str, name: str, r: int) -> list[nn.Module]:
    """Add a LoRA adapter ``name`` of rank ``r`` on exactly the layers that carry ``primary``.

    It goes through PEFT's own machinery (so ``peft_config``, saving filters and adapter deletion
    know it), with the primary's ``lora_alpha``, ``fan_in_fan_out`` and ``use_rslora``, no dropout,
    no bias, no DoRA and no ``modules_to_save``. On a ``PeftModel`` that is the base
    ``PeftModel.add_adapter`` (so task models such as ``SEQ_CLS`` do not give the auxiliary adapter
    its own classifier copy); on a module whose LoRA layers were injected without a wrapper (diffusers'
    or Transformers' ``add_adapter``, ``peft.inject_adapter_in_model``) it is
    ``peft.inject_adapter_in_model``, after which every LoRA layer's previously active adapters and
    every parameter's ``requires_grad`` are put back (injection activates the new adapter). The new
    adapter stays inactive; its parameters are trainable. PEFT's initialisation draws from the global
    RNG, whose state is put back afterwards: the caller re-initialises the factors from its own generator.

    Returns:
        The LoRA layers carrying ``primary`` (now also carrying ``name``), in module order.

    Raises:
        ValueError: if an adapter called ``name`` exists already, or the module has no ``peft_config``
            entry for ``primary`` to copy the auxiliary adapter's settings from.
    """
    from peft import LoraConfig, PeftModel

    inner = unwrap_model(model)
    if _config_owner(inner, name) is not None:
        raise ValueError(f"the model already has an adapter named {name!r}; delete it or detach its method")
    owner = _config_owner(inner, primary)
    if owner is None:
        raise ValueError(
            f"the model has LoRA layers but no peft_config entry for adapter {primary!r}, so no auxiliary "
            "adapter can be added next to it; add LoRA with peft.get_peft_model, model.add_adapter or "
            "peft.inject_adapter_in_model, or pick a method without an auxiliary adapter"
        )
    primary_config = owner.peft_config[primary]
    inner = owner  # a PeftModel, or the module add_adapter was called on (maybe inside a user's wrapper)
    wrapped = isinstance(inner, PeftModel)
    root = inner.base_model.model if wrapped else inner
    targets = [key for key, _ in lora_layers(root, primary)]
    config = LoraConfig(
        r=r,
        lora_alpha=primary_config.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=primary_config.fan_in_fan_out,
        use_rslora=primary_config.use_rslora,
        bias="none",
    )
    flags = [(p, p.requires_grad) for p in inner.parameters()]
    with torch.random.fork_rng(devices=_fork_devices()):
        if wrapped:
            PeftModel.add_adapter(inner, name, config)
        else:
            _inject(inner, name, config)
    for p, flag in flags:  # PEFT <= 0.18 freezes the primary's modules_to_save (a classifier head) here
        p.requires_grad_(flag)
    inner.__dict__.setdefault(AUX_MARK, set()).add(name)  # see prune_saved_adapters
    layers = [layer for _, layer in lora_layers(inner, primary)]
    for layer in layers:
        if name not in layer.lora_A and name not in layer.lora_embedding_A:
            remove_aux_adapter(inner, name)
            raise ValueError(f"PEFT could not add the auxiliary adapter {name!r} to {type(layer).__name__}")
    for p in aux_parameters(layers, name):
        p.requires_grad_(True)
    return layers


def _config_owner(model: nn.Module, adapter: str) -> nn.Module | None:
    """The outermost module of ``model`` whose ``peft_config`` holds ``adapter`` (the ``PeftModel``, or
    the module diffusers' / Transformers' ``add_adapter`` was called on), or ``None``."""
    return next((m for m in model.modules() if adapter in (getattr(m, "peft_config", None) or {})), None)


def _inject(model: nn.Module, name: str, config) -> None:
    """``peft.inject_adapter_in_model`` on a module that already carries LoRA layers, leaving every
    layer's active adapters and every parameter's ``requires_grad`` as they were."""
    from peft import inject_adapter_in_model

    cls = _lora_layer_class()
    previous = [(m, list(m.active_adapters)) for m in model.modules() if isinstance(m, cls)]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*", category=UserWarning)
        inject_adapter_in_model(config, model, adapter_name=name)
    for layer, active in previous:
        layer.set_adapter(active)
    for p, flag in flags:
        p.requires_grad_(flag)


def remove_aux_adapter(model: nn.Module, name: str) -> None:
    """Delete the auxiliary adapter ``name`` (no-op if it is gone); the active adapter is unchanged."""
    from peft import PeftModel

    inner = _config_owner(unwrap_model(model), name)
    if inner is None:
        return
    configs = inner.peft_config
    inner.__dict__.get(AUX_MARK, set()).discard(name)
    if isinstance(inner, PeftModel):
        inner.delete_adapter(name)
        return
    cls = _lora_layer_class()
    previous = [
        (m, [a for a in m.active_adapters if a != name]) for m in inner.modules() if isinstance(m, cls)
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*", category=UserWarning)
        for layer, _ in previous:  # each LoRA layer's own delete_adapter (every PEFT version has it)
            layer.delete_adapter(name)
    del configs[name]
    flags = [(p, p.requires_grad) for p in inner.parameters()]
    for layer, active in previous:
        if active:
            layer.set_adapter(active)
    for p, flag in flags:
        p.requires_grad_(flag)


def aux_factors(layer: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The ``(B, A)`` parameters of adapter ``name`` in ``layer``: ΔW = scaling · B·A (transposed for
    embeddings and ``fan_in_fan_out``; for convolutions B is a 1×1 kernel and A is flattened per rank)."""
    if name in layer.lora_A:
        return layer.lora_B[name].weight, layer.lora_A[name].weight
    return layer.lora_embedding_B[name], layer.lora_embedding_A[name]


def aux_parameters(layers: list[nn.Module], name: str) -> list[nn.Parameter]:
    """``[B, A]`` of adapter ``name`` for every layer, in layer order."""
    return [p for layer in layers for p in aux_factors(layer, name)]


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
