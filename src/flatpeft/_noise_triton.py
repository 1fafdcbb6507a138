"""Flat-LoRA's W0 + ε in one pass: a Triton kernel with counter-based Philox noise (CUDA).

Li et al., ICML 2025 (arXiv:2409.14396), Eq. (5): ε_ij ~ N(0, (σ_t‖W'_i‖₂/√n)²). Given the per-row
std s_i = σ_t‖W'_i‖/√n, the kernel reads W0 once and writes ``W0 + s·z`` once in the compute dtype
(fp32 arithmetic, rounded to nearest even), so the only memory traffic of a draw is one read and one
write of the weight; the normal numbers never touch memory.

The stream (fixed, part of the noise's definition; :data:`BLOCK` = 1024):

- Philox-4x32-10 (Triton's ``tl.randint4x``) with key (seed mod 2³², seed ≫ 32) and counter
  (c, 0, 0) for c = 0, 1, 2, ...: one call gives four 32-bit words, all four used;
- ``tl.randn4x`` turns the four words into four N(0, 1) numbers (Box–Muller on pairs);
- entry e of the flattened ``(m, n)`` tensor takes word q = (e mod 4·BLOCK) // BLOCK of counter
  c = (e // 4·BLOCK)·BLOCK + e mod BLOCK (each program covers 4·BLOCK consecutive entries with
  BLOCK counters, four contiguous stores).

The seed is Flat-LoRA's ``mix_seed(seed, step, layer, rank)``, so forward and backward (and an
activation-checkpointing recompute) regenerate the identical ε, and the values depend neither on the
GPU model nor on the launch configuration. The launch is the custom op ``flatpeft::noisy_rows``, so
PyTorch's dispatcher (and ``benchmarks/noise_bytes.py``'s counter) sees its operands: W0 and the row
stds read, W0 + ε written. ``TRITON_INTERPRET=1`` (set before this module is imported) runs the
kernel on CPU tensors, which is how it is tested without a GPU.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BLOCK", "noisy_rows", "philox_words", "unavailable"]

BLOCK = 1024

try:
    import triton
    import triton.language as tl
except ImportError:  # the core package works without Triton (the plain PyTorch path)
    triton = None

_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def unavailable(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` (``None`` when it can)."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return f"the Triton kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {device.type}"


if triton is not None:

    @triton.jit
    def _store(
        out_ptr, w_ptr, std_ptr, z, e, total, n, stride_m, stride_n, HAS_W: tl.constexpr, BF16: tl.constexpr
    ):
        mask = e < total
        i = e // n
        val = tl.load(std_ptr + i, mask=mask, other=0.0) * z
        if HAS_W:
            w = tl.load(w_ptr + i * stride_m + (e - i * n) * stride_n, mask=mask, other=0.0)
            val = val + w.to(tl.float32)
        if BF16:  # round to nearest even by hand: the same bits on a GPU and in the CPU interpreter
            bits = val.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + e, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:  # fp32 as is; fp16 rounded to nearest even by the cast
            tl.store(out_ptr + e, val.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _noisy_rows_kernel(
        w_ptr, std_ptr, out_ptr, seed, total, n, stride_m, stride_n,
        HAS_W: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK).to(tl.int64)
        z0, z1, z2, z3 = tl.randn4x(seed, pid * BLOCK + lane)
        base = pid * (4 * BLOCK) + lane
        _store(out_ptr, w_ptr, std_ptr, z0, base, total, n, stride_m, stride_n, HAS_W, BF16)
        _store(out_ptr, w_ptr, std_ptr, z1, base + BLOCK, total, n, stride_m, stride_n, HAS_W, BF16)
        _store(out_ptr, w_ptr, std_ptr, z2, base + 2 * BLOCK, total, n, stride_m, stride_n, HAS_W, BF16)
        _store(out_ptr, w_ptr, std_ptr, z3, base + 3 * BLOCK, total, n, stride_m, stride_n, HAS_W, BF16)

    @triton.jit
    def _philox_words_kernel(out_ptr, seed, counter_ptr, count, BLOCK: tl.constexpr):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = lane < count
        c = tl.load(counter_ptr + lane, mask=mask, other=0)
        w0, w1, w2, w3 = tl.randint4x(seed, c)
        tl.store(out_ptr + 4 * lane, w0.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + 4 * lane + 1, w1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + 4 * lane + 2, w2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + 4 * lane + 3, w3.to(tl.int64) & 0xFFFFFFFF, mask=mask)


def philox_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four Philox-4x32-10 words of each int64 counter, as ``(len, 4)`` int64 in [0, 2³²)."""
    out = torch.empty((counters.numel(), 4), dtype=torch.int64, device=counters.device)
    grid = (triton.cdiv(counters.numel(), 128),)
    _philox_words_kernel[grid](out, seed, counters.contiguous(), counters.numel(), BLOCK=128)
    return out


@torch.library.custom_op("flatpeft::noisy_rows", mutates_args=())
def _noisy_rows_op(
    weight: torch.Tensor | None, row_std: torch.Tensor, n: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    m = row_std.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=row_std.device)
    if out.numel() == 0:
        return out
    std = row_std.contiguous().float()
    w, sm, sn = (out, 0, 0) if weight is None else (weight, weight.stride(0), weight.stride(1))
    grid = (triton.cdiv(out.numel(), 4 * BLOCK),)
    _noisy_rows_kernel[grid](
        w,
        std,
        out,
        seed,
        out.numel(),
        n,
        sm,
        sn,
        HAS_W=weight is not None,
        BF16=dtype == torch.bfloat16,
        BLOCK=BLOCK,
    )
    return out


@_noisy_rows_op.register_fake
def _(weight, row_std, n, seed, dtype):
    return row_std.new_empty((row_std.shape[0], n), dtype=dtype)


def noisy_rows(
    weight_rows: torch.Tensor | None, row_std: torch.Tensor, n: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """``W0 + ε`` (or ``ε`` when ``weight_rows`` is ``None``) as a contiguous ``(m, n)`` tensor of
    ``dtype`` from the Philox stream of ``seed`` (see the module docstring).

    Raises:
        ValueError: a dtype the kernel does not write (fp64 weights take the PyTorch path).
    """
    if dtype not in _DTYPES or (weight_rows is not None and weight_rows.dtype not in _DTYPES):
        raise ValueError(f"the Triton noise kernel writes fp32/fp16/bf16, not {dtype}; use the torch path")
    return _noisy_rows_op(weight_rows, row_std, n, seed & ((1 << 63) - 1), dtype)
