"""Silence one import-time warning that is not about the user's run.

``import peft`` imports bitsandbytes whenever it is installed (``peft/helpers.py``), quantized or not;
on a CPU with AVX512-BF16 bitsandbytes then asks the ``kernels`` package for a Hub kernel, and offline
(or without ``kernels``) logs two warnings on every run: "Skipping publisher trust check for
'kernels-community/quantization-bitsandbytes' ..." and "Failed to load CPU gemm_4bit_forward from
kernels-community ...". bitsandbytes falls back to its own CPU kernel. Only those two records are
dropped (a ``logging.Filter`` on the two loggers); every other bitsandbytes and kernels message passes.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_bitsandbytes_kernels"]

#: (logger, start of the message) of the records dropped
_DROPPED = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
)


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes_kernels() -> None:
    """Install the filters (idempotent); cheap, imports neither bitsandbytes nor kernels."""
    for name, prefix in _DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
