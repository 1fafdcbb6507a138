"""Built-in methods, one file each; importing this package registers them."""

from . import flat_lora, lora, lora_sam, sam_full

__all__ = ["flat_lora", "lora", "lora_sam", "sam_full"]
