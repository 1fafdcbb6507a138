"""Flat-LoRA's W0 + ε in one pass: a Triton kernel with counter-based Philox noise (CUDA).

Li et al., ICML 2025 (arXiv:2409.14396), Eq. (5): ε_ij ~ N(0, (σ_t‖W'_i‖₂/√n)²). Given the per-row
std s_i = σ_t‖W'_i‖/√n, the kernel reads W0 once and writes ``W0 + s·z`` once in the compute dtype
(fp32 arithmetic, rounded to nearest even), so the only memory traffic of a draw is one read and one
write of the weight; the normal numbers never touch memory.

The stream (fixed, part of the noise's definition; :data:`BLOCK` = 1024):

- Philox-4x32-10 (Triton's ``tl.randint4x``) with key (seed mod 2³², seed ≫ 32) and a 64-bit counter
  c (words c mod 2³², c ≫ 32, 0, 0): one call gives four 32-bit words, all four used;
- ``tl.randn4x`` turns the four words into four N(0, 1) numbers (Box–Muller on pairs);
- row i is cut into T = ⌈n / 4Q⌉ tiles of 4Q entries, Q = :func:`lanes` (n) (the power of two
  covering n/4, from 16 to BLOCK); entry j of row i takes word q = (j mod 4Q) // Q of counter
  c = (i·T + j // 4Q)·Q + j mod Q. Rows never share a counter.

One program writes a block of rows (16 with the norms, 4 for ranks above 64; 1 without).
``noisy_rows`` is given the row stds; ``noisy_rows_normed`` computes them in the same program from
‖W0_i‖² (cached by the caller: W0 is frozen) and the LoRA factors, ‖W'_i‖² = ‖W0_i‖² +
2s⟨W0_i, (BA)_i⟩ + s²‖(BA)_i‖², summed over tiles of the block's rows of W0 (each tile of A loaded
once per block, so A is read m/16 times from cache, not m times), which the noise loop then reads
again while they are still in cache: one read of W0 per step from memory for the norms and the
first draw together. It writes the stds out for the backward's regeneration, which reads them back
as the same fp32 values and so writes the same W0 + ε. The block sizes set the launch and the order
of the norms' sums, not the stream.

The seed is Flat-LoRA's ``mix_seed(seed, step, layer, rank)``, so forward and backward (and an
activation-checkpointing recompute) regenerate the identical ε, and the values depend neither on the
GPU model nor on the launch configuration. The launches are the custom ops ``flatpeft::noisy_rows``
and ``flatpeft::noisy_rows_normed``, so PyTorch's dispatcher (and ``benchmarks/noise_bytes.py``'s
counter) sees their operands: W0 (and A, B, ‖W0_i‖²) or the row stds read, W0 + ε (and the stds)
written. ``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernel on CPU
tensors, which is how it is tested without a GPU.
"""

from __future__ import annotations

import os

import torch

from ._noise import RowNorms

__all__ = ["BLOCK", "lanes", "launch_meta", "noisy_rows", "noisy_rows_normed", "philox_words", "unavailable"]

BLOCK = 1024
_SEED = (1 << 63) - 1

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
    def _store(out_row, w_row, stride_n, j, n, std, z, HAS_W: tl.constexpr, BF16: tl.constexpr):
        mask = j < n
        val = std * z
        if HAS_W:
            val = val + tl.load(w_row + j * stride_n, mask=mask, other=0.0).to(tl.float32)
        if BF16:  # round to nearest even by hand: the same bits on a GPU and in the CPU interpreter
            bits = val.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_row + j, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:  # fp32 as is; fp16 rounded to nearest even by the cast
            tl.store(out_row + j, val.to(out_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_stds(
        w_ptr, rows, live, stride_m, stride_n, n, a_ptr, b_ptr, r, sq_ptr, s, scale,
        R: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        """σ_t‖W'_i‖/√n of a block of rows: ‖W0_i‖² (given) + 2s⟨W0_i, (BA)_i⟩ + s²‖(BA)_i‖², each
        W0_i read once; every tile of A is loaded once for the whole block of rows."""
        k = tl.arange(0, R)
        b = tl.load(b_ptr + rows[:, None] * r + k[None, :], mask=live[:, None] & (k[None, :] < r), other=0.0)
        cross = tl.zeros((BM,), dtype=tl.float32)
        quad = tl.zeros((BM,), dtype=tl.float32)
        for j0 in range(0, n, NB):
            j = j0 + tl.arange(0, NB)
            cols = j < n
            w = tl.load(
                w_ptr + rows[:, None] * stride_m + j[None, :] * stride_n,
                mask=live[:, None] & cols[None, :],
                other=0.0,
            ).to(tl.float32)
            a = tl.load(a_ptr + k[:, None] * n + j[None, :], mask=(k[:, None] < r) & cols[None, :], other=0.0)
            delta = tl.sum(b[:, :, None] * a[None, :, :], axis=1)  # (B·A) on this tile, one row each
            cross += tl.sum(w * delta, axis=1)
            quad += tl.sum(delta * delta, axis=1)
        sq = tl.load(sq_ptr + rows, mask=live, other=0.0)
        return scale * tl.sqrt(tl.maximum(sq + 2.0 * s * cross + s * s * quad, 0.0))

    @triton.jit
    def _noisy_rows_kernel(
        w_ptr, std_ptr, out_ptr, a_ptr, b_ptr, sq_ptr, seed, m, n, stride_m, stride_n, r, s, scale,
        HAS_W: tl.constexpr, NORM: tl.constexpr, BF16: tl.constexpr, Q: tl.constexpr,
        R: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        first = tl.program_id(0).to(tl.int64) * BM
        block = tl.arange(0, BM)
        rows = first + block
        live = rows < m
        if NORM:  # the rows' stds from W0 and the LoRA factors, written for the backward's regeneration
            stds = _row_stds(
                w_ptr, rows, live, stride_m, stride_n, n, a_ptr, b_ptr, r, sq_ptr, s, scale, R, NB, BM
            )
            tl.store(std_ptr + rows, stds, mask=live)
        else:
            stds = tl.load(std_ptr + rows, mask=live, other=0.0)
        tiles = tl.cdiv(n, 4 * Q)
        lane = tl.arange(0, Q).to(tl.int64)
        for row in range(0, BM):  # a loop, not unrolled: one copy of the tile loop in the code
            i = first + row
            std = tl.sum(tl.where(block == row, stds, 0.0), axis=0)
            width = tl.where(i < m, n, 0)  # a row past the end stores nothing
            w_row = w_ptr + i * stride_m
            out_row = out_ptr + i * n
            for t in range(0, tiles):
                z0, z1, z2, z3 = tl.randn4x(seed, (i * tiles + t) * Q + lane)
                j = t * (4 * Q) + lane
                _store(out_row, w_row, stride_n, j, width, std, z0, HAS_W, BF16)
                _store(out_row, w_row, stride_n, j + Q, width, std, z1, HAS_W, BF16)
                _store(out_row, w_row, stride_n, j + 2 * Q, width, std, z2, HAS_W, BF16)
                _store(out_row, w_row, stride_n, j + 3 * Q, width, std, z3, HAS_W, BF16)

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


def lanes(n: int) -> int:
    """Philox counters per tile of a row of ``n`` entries (each tile covers ``4·lanes(n)`` entries):
    the power of two that covers ``n/4``, between 16 and :data:`BLOCK`."""
    return min(BLOCK, max(16, triton.next_power_of_2(-(-n // 4))))


def launch_meta(n: int, rank: int | None) -> dict[str, int]:
    """The kernel's compile-time sizes for rows of ``n`` entries: ``rank`` the LoRA rank when the
    kernel computes the row norms, ``None`` when the stds are given. With the norms, ``BM`` = 16 rows
    per program share each loaded tile of A ((BM, R, NB) products in registers, so 4 rows for ranks
    above 64); without, one row, for the most programs in flight."""
    rp = triton.next_power_of_2(max(rank or 1, 1))
    bm = 1 if rank is None else 16 if rp <= 64 else 4
    return {"Q": lanes(n), "R": rp, "NB": max(16, min(256, 8192 // (bm * rp))), "BM": bm}


def _launch(weight, std, out, seed, n, norms=None) -> None:
    """One program per block of rows; ``norms = (A, B, ‖W0_i‖², s, scale)`` computes ``std``."""
    m = out.shape[0]
    w, sm, sn = (out, 0, 0) if weight is None else (weight, weight.stride(0), weight.stride(1))
    a, b, sq, s, scale = norms if norms is not None else (std, std, std, 0.0, 0.0)
    r = a.shape[0] if norms is not None else 0
    meta = launch_meta(n, r if norms is not None else None)
    _noisy_rows_kernel[(triton.cdiv(m, meta["BM"]),)](
        w, std, out, a, b, sq, seed, m, n, sm, sn, r, s, scale,
        HAS_W=weight is not None, NORM=norms is not None, BF16=out.dtype == torch.bfloat16, **meta,
        enable_fp_fusion=False,  # std·z + W0 as a product then a sum, the formula tested: no FMA
    )  # fmt: skip


@torch.library.custom_op("flatpeft::noisy_rows", mutates_args=())
def _noisy_rows_op(
    weight: torch.Tensor | None, row_std: torch.Tensor, n: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.empty((row_std.shape[0], n), dtype=dtype, device=row_std.device)
    if out.numel():
        _launch(weight, row_std.contiguous().float(), out, seed, n)
    return out


@_noisy_rows_op.register_fake
def _(weight, row_std, n, seed, dtype):
    return row_std.new_empty((row_std.shape[0], n), dtype=dtype)


@torch.library.custom_op("flatpeft::noisy_rows_normed", mutates_args=())
def _noisy_rows_normed_op(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base_sq: torch.Tensor,
    s: float,
    scale: float,
    seed: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = weight.shape
    out = torch.empty((m, n), dtype=dtype, device=weight.device)
    std = torch.empty(m, dtype=torch.float32, device=weight.device)
    if out.numel():
        factors = (lora_a.contiguous().float(), lora_b.contiguous().float(), base_sq.contiguous().float())
        _launch(weight, std, out, seed, n, (*factors, s, scale))
    return out, std


@_noisy_rows_normed_op.register_fake
def _(weight, lora_a, lora_b, base_sq, s, scale, seed, dtype):
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty(weight.shape[0], dtype=torch.float32)


def _check(dtype: torch.dtype, weight_rows: torch.Tensor | None) -> None:
    if dtype not in _DTYPES or (weight_rows is not None and weight_rows.dtype not in _DTYPES):
        raise ValueError(f"the Triton noise kernel writes fp32/fp16/bf16, not {dtype}; use the torch path")


def noisy_rows(
    weight_rows: torch.Tensor | None, row_std: torch.Tensor, n: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """``W0 + ε`` (or ``ε`` when ``weight_rows`` is ``None``) as a contiguous ``(m, n)`` tensor of
    ``dtype`` from the Philox stream of ``seed`` (see the module docstring).

    Raises:
        ValueError: a dtype the kernel does not write (fp64 weights take the PyTorch path).
    """
    _check(dtype, weight_rows)
    return _noisy_rows_op(weight_rows, row_std, n, seed & _SEED, dtype)


def noisy_rows_normed(weight_rows: torch.Tensor, norms: RowNorms, seed: int, dtype: torch.dtype):
    """``(W0 + ε, std)``: the row std ``scale·‖W0_i + s·(B·A)_i‖`` computed in the same pass that
    writes W0 + ε (W0 read once for both), from ``norms`` (``‖W0_i‖²``, cached by the caller, the LoRA
    factors ``A`` ``(r, n)`` and ``B`` ``(m, r)``, ``s`` and ``scale``). The same ε as
    :func:`noisy_rows` with that std.

    Raises:
        ValueError: a dtype the kernel does not write.
    """
    _check(dtype, weight_rows)
    a, b, sq, s, scale = norms.lora_a, norms.lora_b, norms.base_sq, float(norms.s), float(norms.scale)
    return _noisy_rows_normed_op(weight_rows, a, b, sq, s, scale, seed & _SEED, dtype)
