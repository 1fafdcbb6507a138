"""Everything flatpeft knows about PEFT internals lives here.

The rest of the package sees an adapted layer through :class:`Geometry` (its weight viewed as an
``(out, fan_in)`` matrix of rows, and the base op applied with a substitute weight) and through the
helpers below (active adapter, adapter parameters, effective weight, base-forward patching).

The package splits along the seams: :mod:`.model` (models, adapters, saving), :mod:`.weights` (an
adapted layer's base weight and its patched forward), :mod:`.adapters` (second adapters and the fused
pass) and :mod:`.rank_scale` (a per-rank scale between the factors).
"""

from .adapters import (
    adapters_active,
    add_aux_adapter,
    aux_factors,
    aux_parameters,
    fused_adapters,
    lora_factors,
    remove_aux_adapter,
)
from .model import (
    active_adapter,
    adapter_parameters,
    all_adapter_parameters,
    check_peft_model,
    lora_layers,
    prune_saved_adapters,
    scaling,
    unwrap_model,
)
from .rank_scale import add_rank_scale_hook, check_rank_scalable, fold_rank_scale_, rank_factors
from .weights import (
    Geometry,
    base_bias,
    base_row_sq,
    base_rows,
    dense_weight,
    dequantized,
    effective_row_norms,
    effective_rows,
    geometry,
    patched_base_forward,
    plain_lora_factors,
    row_norms,
)

__all__ = [
    "Geometry",
    "active_adapter",
    "adapter_parameters",
    "adapters_active",
    "add_aux_adapter",
    "add_rank_scale_hook",
    "all_adapter_parameters",
    "aux_factors",
    "aux_parameters",
    "base_bias",
    "base_row_sq",
    "base_rows",
    "check_peft_model",
    "check_rank_scalable",
    "dense_weight",
    "dequantized",
    "effective_row_norms",
    "effective_rows",
    "fold_rank_scale_",
    "fused_adapters",
    "geometry",
    "lora_factors",
    "lora_layers",
    "patched_base_forward",
    "plain_lora_factors",
    "prune_saved_adapters",
    "rank_factors",
    "remove_aux_adapter",
    "row_norms",
    "scaling",
    "unwrap_model",
]
