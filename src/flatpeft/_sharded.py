"""Sharded tensors as first-class citizens: the one place that knows PyTorch's DTensor (FSDP2).

Under ``fully_shard`` every parameter and its ``.grad`` are ``DTensor`` shards between forward
passes; inside a sharded block's forward the parameters are plain, unsharded tensors again. A norm,
dot product or Gram product over parameters or gradients must therefore see the whole tensor, and a
tensor written back into a parameter must carry the parameter's placement. The helpers here do both
with PyTorch's own machinery (``full_tensor``, ``distribute_tensor``, ``Partial`` reductions); on
plain tensors they are the identity, so methods call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["full", "is_sharded", "like", "local", "model_is_sharded", "sum_squares"]


def _dtensor_module():
    try:
        import torch.distributed.tensor as dt

        return dt if hasattr(dt, "DTensor") else None
    except ImportError:  # torch built without distributed support
        return None


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter or gradient between forward passes)."""
    dt = _dtensor_module()
    return dt is not None and isinstance(t, dt.DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (the model went through ``fully_shard``)."""
    return any(is_sharded(p) for p in model.parameters())


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor on every rank (``DTensor.full_tensor``), or ``t`` itself when not sharded."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (``DTensor.to_local``) for elementwise in-place work, or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, identical on every rank) with ``ref``'s placement.

    For a ``DTensor`` ``ref`` each rank keeps its own chunk of ``value`` locally (no communication);
    otherwise ``value`` is returned as is.
    """
    if not is_sharded(ref):
        return value
    dt = _dtensor_module()
    return dt.distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)


def sum_squares(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """Σ ‖t‖² over the non-``None`` tensors in fp32, sharded ones reduced over all their shards.

    Shards of one mesh and placement are summed locally first and reduced in one collective
    (a ``Partial`` DTensor made whole), so the cost is one all-reduce per placement, not per tensor.
    """
    plain: list[torch.Tensor] = []
    groups: dict[tuple, tuple[object, tuple, list[torch.Tensor]]] = {}
    for t in tensors:
        if t is None:
            continue
        if is_sharded(t):
            key = (id(t.device_mesh), tuple(t.placements))
            groups.setdefault(key, (t.device_mesh, tuple(t.placements), []))[2].append(
                t.to_local().detach().float().pow(2).sum()
            )
        else:
            plain.append(t.detach().float().pow(2).sum())
    parts = [torch.stack([s.to(plain[0].device) for s in plain]).sum()] if plain else []
    if groups:
        dt = _dtensor_module()
        for mesh, placements, sums in groups.values():
            reduced = [dt.Partial() if p.is_shard() else dt.Replicate() for p in placements]
            parts.append(dt.DTensor.from_local(torch.stack(sums).sum(), mesh, reduced).full_tensor())
    if not parts:
        return torch.zeros(())
    return torch.stack([p.to(parts[0].device) for p in parts]).sum()
