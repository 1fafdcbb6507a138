"""PEFT models: validation, the active adapter, its LoRA layers and parameters, saving."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

#: the attribute (in a PEFT model's ``__dict__``) naming the auxiliary adapters flatpeft added to it
AUX_MARK = "_flatpeft_aux_adapters"

__all__ = [
    "AUX_MARK",
    "active_adapter",
    "adapter_parameters",
    "all_adapter_parameters",
    "check_peft_model",
    "lora_layers",
    "prune_saved_adapters",
    "scaling",
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


def _carries(layer: nn.Module, adapter: str) -> bool:
    return adapter in layer.lora_A or adapter in layer.lora_embedding_A


def check_peft_model(model: nn.Module) -> nn.Module:
    """Validate that ``model`` carries unmerged, active PEFT LoRA layers; return the unwrapped model.

    ``model`` is a ``peft.PeftModel`` or any ``nn.Module`` whose LoRA layers were injected without a
    wrapper: diffusers' ``add_adapter`` (UNets, diffusion transformers, text encoders), Transformers'
    ``add_adapter`` or ``peft.inject_adapter_in_model``.

    Raises:
        TypeError: if ``model`` is neither a ``peft.PeftModel`` nor a module with LoRA layers.
        ValueError: if it has no LoRA layers, its LoRA layers are disabled or have no active adapter,
            or its adapters are merged.
    """
    from peft import PeftModel

    inner = unwrap_model(model)
    layers = [m for m in inner.modules() if isinstance(m, _lora_layer_class())]
    if not layers and not isinstance(inner, PeftModel):
        raise TypeError(
            f"flatpeft needs a peft.PeftModel or a module with PEFT LoRA layers, got {type(model).__name__} "
            "with none; add LoRA first: model = peft.get_peft_model(model, peft.LoraConfig(...)), or "
            "model.add_adapter(peft.LoraConfig(...)) on a diffusers / Transformers model"
        )
    if not layers:
        raise ValueError(
            "the model has no LoRA layers; create it with peft.get_peft_model(model, LoraConfig(...)) "
            "and check that LoraConfig.target_modules matches some of its layers"
        )
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError("the model has merged LoRA adapters; call model.unmerge_adapter() before attaching")
    if all(m.disable_adapters for m in layers):
        raise ValueError(
            "the model's LoRA layers are disabled; enable them before attaching (model.enable_adapters() "
            "on a diffusers / Transformers model, or leave the PeftModel.disable_adapter() block)"
        )
    if not any(_carries(m, a) for m in layers for a in m.active_adapters):
        raise ValueError(
            "no LoRA layer has an active adapter; activate the one to train with model.set_adapter(name)"
        )
    return inner


def active_adapter(model: nn.Module) -> str:
    """Name of the single adapter the model's LoRA layers run, read from the layers themselves (a
    ``PeftModel`` and a module with injected layers alike; diffusers' ``active_adapters`` is a method).

    Raises:
        ValueError: if the enabled layers run no adapter or more than one.
    """
    active = {
        a
        for m in unwrap_model(model).modules()
        if isinstance(m, _lora_layer_class()) and not m.disable_adapters
        for a in m.active_adapters
        if _carries(m, a)
    }
    if len(active) != 1:
        raise ValueError(
            f"flatpeft trains exactly one active adapter, the model's LoRA layers run {sorted(active)}; "
            "choose one with model.set_adapter(name)"
        )
    return active.pop()


def lora_layers(model: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every LoRA layer that carries ``adapter``, in module order."""
    cls = _lora_layer_class()
    out = []
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, cls) and _carries(m, adapter):
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


def all_adapter_parameters(layer: nn.Module) -> Iterator[nn.Parameter]:
    """Every adapter parameter of a LoRA layer (all adapters: A, B, DoRA magnitudes, embeddings)."""
    for attr in layer.adapter_layer_names:
        for item in getattr(layer, attr, {}).values():
            yield from item.parameters() if isinstance(item, nn.Module) else [item]


def prune_saved_adapters(output_dir: str, model: nn.Module, keep: str) -> None:
    """Remove the folders ``save_pretrained`` wrote for the auxiliary adapters flatpeft added (see
    ``add_aux_adapter``), never ``keep`` nor any adapter of the user's own.

    PEFT writes a non-default adapter ``name`` under ``output_dir/name``; auxiliary adapters a method
    adds while training must never be shipped.
    """
    import os
    import shutil

    marked = set().union(*(m.__dict__.get(AUX_MARK, ()) for m in unwrap_model(model).modules()))
    for name in sorted(marked):
        path = os.path.join(output_dir, name)
        if name != keep and os.path.isfile(os.path.join(path, "adapter_config.json")):
            shutil.rmtree(path)
