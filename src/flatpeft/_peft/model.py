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

    inner = unwrap_model(model)
    for name in inner.__dict__.get(AUX_MARK, ()):
        path = os.path.join(output_dir, name)
        if name != keep and os.path.isfile(os.path.join(path, "adapter_config.json")):
            shutil.rmtree(path)
