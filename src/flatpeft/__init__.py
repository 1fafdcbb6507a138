"""flatpeft: LoRA fine-tuning that seeks flat minima, on top of Hugging Face PEFT.

method = flatpeft.attach(peft_model, "flat_lora", sigma=0.05, total_steps=1000)
optimizer = torch.optim.AdamW(method.parameters(), lr=5e-4)
method.bind(optimizer)
loss = method.backward(lambda: model(**batch).loss)   # instead of loss.backward()
"""

from ._quiet import quiet_bitsandbytes_kernels
from .config import MethodConfig
from .method import Method, attach
from .registry import get_method, list_methods, make_config, register

__version__ = "0.1.0"

quiet_bitsandbytes_kernels()  # peft imports bitsandbytes when installed, quantized or not


_SHARPNESS = (
    "expected_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "loss_landscape",
    "plot_landscape",
    "worst_case_sharpness",
)


def __getattr__(name: str):
    # The Trainer integration and the measurements load only when asked for.
    if name in ("FlatTrainer", "FlatTrainerMixin"):
        from .integrations import transformers as _hf

        return getattr(_hf, name)
    if name in _SHARPNESS:
        from . import sharpness

        return getattr(sharpness, name)
    raise AttributeError(f"module 'flatpeft' has no attribute {name!r}")


__all__ = [
    "FlatTrainer",
    "FlatTrainerMixin",
    "Method",
    "MethodConfig",
    "__version__",
    "attach",
    "expected_sharpness",
    "get_method",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "list_methods",
    "loss_landscape",
    "make_config",
    "plot_landscape",
    "register",
    "worst_case_sharpness",
]
