"""Flat-LoRA's noise path: W0 + ε with filter-wise ε = std_i · z, z ~ N(0, 1), at the fewest bytes moved.

Two implementations of the same law, chosen per call by :func:`use_kernel`:

- the fused Triton kernel (``_noise_triton``): one pass that reads W0 and writes W0 + ε, z from a
  counter-based Philox stream keyed by the (seed, step, layer) seed. Used automatically on CUDA when
  Triton imports; ``FLATPEFT_NOISE_KERNEL=torch`` turns it off, ``=triton`` forces it (on CPU only
  under ``TRITON_INTERPRET=1``, which is how it is tested);
- plain PyTorch everywhere else: z drawn into a reused per-shape workspace (fp32 on CPU, where bf16
  ``randn`` is slower; the compute dtype on other devices), then ``addcmul(W0, std, z)`` writes
  W0 + std·z in one op, computed in fp32 (fp64 for an fp64 weight) and rounded once to the compute
  dtype. On CPU a bf16/fp16 W0 is first widened into a reused fp32 buffer (the same arithmetic and
  bits as one mixed-dtype ``addcmul``, without the temporaries CPU TensorIterator would allocate).

The standard normals z of one seed, per device:

- CPU: the flattened ``(m, n)`` tensor is cut into fixed chunks of :data:`CHUNK` elements; chunk 0
  is drawn by a ``torch.Generator`` seeded with ``seed`` itself and chunk ``k > 0`` by one seeded
  with ``mix_seed(seed, k)``. The chunks are drawn in parallel, each thread taking the next chunk
  left (``torch.get_num_threads()`` threads, the calling one included; ``normal_`` releases the
  GIL), and the values depend neither on the thread count nor on which thread drew what. A tensor
  of at most :data:`CHUNK` entries gets exactly ``torch.randn((m, n), generator=seeded)``. Right
  after an OpenMP region (the previous layer's matmul), libgomp's default spin-wait holds the other
  cores for a few ms, and the calling thread then draws most chunks itself (see the README, Overhead).
- CUDA, plain path: one ``torch.randn`` with a CUDA generator seeded with ``seed``, in the compute
  dtype (bf16 normals in a bf16 run).
- Triton kernel: Philox-4x32-10 words, see ``_noise_triton``; independent of the GPU model.
Each is deterministic for a seed; the three are different streams of the same distribution.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = ["CHUNK", "NoiseWorkspace", "RowNorms", "noisy_rows", "standard_normal", "use_kernel"]

CHUNK = 1 << 16  # entries per CPU generator (256 KiB of fp32): fixed, so the noise ignores thread counts
_MASK64 = (1 << 64) - 1
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child (a DataLoader worker) has none of the parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def chunk_seed(seed: int, k: int) -> int:
    """The generator seed of chunk ``k`` of a draw seeded with ``seed`` (``seed`` itself for chunk 0)."""
    from .perturb import mix_seed

    return seed if k == 0 else mix_seed(seed, k)


def _threads_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flatpeft-noise"))
        return _pool[1]


def _draw_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype z is drawn in: fp32 on CPU, the compute dtype (fp16/bf16/fp32) elsewhere."""
    if device.type == "cpu" or dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def standard_normal(
    shape: tuple[int, int],
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """N(0, 1) samples of ``shape`` from ``seed`` (the per-device streams of the module docstring).

    Args:
        shape: ``(m, n)``.
        seed: Seed of the draw (``mix_seed(seed, step, layer, rank)`` for Flat-LoRA).
        device: Where to draw.
        dtype: dtype of the samples.
        out: Contiguous tensor of ``shape``/``dtype`` to fill (a workspace), or ``None``.
    """
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    if device.type != "cpu":
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return out.normal_(generator=gen)
    flat = out.view(-1)
    chunks = -(-flat.numel() // CHUNK)

    def fill(order) -> None:  # the chunks this thread takes from the shared order, one generator each
        for k in order:
            gen = torch.Generator()
            gen.manual_seed(chunk_seed(seed, k))
            flat[k * CHUNK : (k + 1) * CHUNK].normal_(generator=gen)

    helpers = min(torch.get_num_threads(), chunks) - 1
    if helpers < 1:
        fill(range(chunks))
        return out
    # The calling thread and the pool's threads take chunks from one shared iterator (next() on it
    # is atomic under the GIL; normal_ releases the GIL) until none is left, so a pool thread that
    # gets no core (an OpenMP worker still spinning after a matmul holds it) leaves its share to the
    # others instead of being waited for; one that never started is cancelled.
    order = iter(range(chunks))
    pending = [_threads_pool(helpers).submit(fill, order) for _ in range(helpers)]
    fill(order)
    for job in pending:
        if not job.cancel():
            job.result()
    return out


class NoiseWorkspace:
    """Reused per-shape buffers for the plain path on CPU (a fresh large tensor costs page faults
    there); on other devices the caching allocator already reuses memory and nothing is held."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(
        self, role: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (role, tuple(shape), dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def clear(self) -> None:
        self._buffers.clear()


def use_kernel(device: torch.device) -> bool:
    """Whether W0 + ε on ``device`` goes through the Triton kernel (see the module docstring).

    Raises:
        ValueError: ``FLATPEFT_NOISE_KERNEL`` is not ``auto``, ``torch`` or ``triton``, or asks for the
            kernel where it cannot run.
    """
    choice = os.environ.get("FLATPEFT_NOISE_KERNEL", "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"FLATPEFT_NOISE_KERNEL={choice!r}: use 'auto' (default), 'torch' or 'triton'")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return False
    from . import _noise_triton

    if choice == "triton":
        why = _noise_triton.unavailable(device)
        if why:
            raise ValueError(f"FLATPEFT_NOISE_KERNEL=triton: {why}; unset it or set it to 'torch'")
        return True
    return _noise_triton.unavailable(device) is None


@dataclass
class RowNorms:
    """The inputs of the row stds ``scale·‖W0_i + s·(B·A)_i‖`` for the kernel to compute in its own
    pass over W0 (``_noise_triton.noisy_rows_normed``); :func:`noisy_rows` stores them in ``std``."""

    lora_a: torch.Tensor  # (r, n) fp32
    lora_b: torch.Tensor  # (m, r) fp32
    base_sq: torch.Tensor  # (m,) fp32 ‖W0_i‖²
    s: float
    scale: float
    std: torch.Tensor | None = None


def noisy_rows(
    weight_rows: torch.Tensor | None,
    row_std: torch.Tensor | RowNorms,
    n: int,
    seed: int,
    dtype: torch.dtype,
    workspace: NoiseWorkspace | None = None,
    reuse_out: bool = False,
) -> torch.Tensor:
    """``W0 + ε`` as an ``(m, n)`` tensor of ``dtype`` (``ε`` alone when ``weight_rows`` is ``None``).

    Args:
        weight_rows: Frozen weight as ``(m, n)`` rows (any strides), or ``None``.
        row_std: ``(m,)`` fp32 std of row ``i``, or :class:`RowNorms` (kernel path, with ``weight_rows``
            and not fp64) for the kernel to compute them; they are then left in ``row_std.std``.
        n: Entries per row.
        seed: Seed of the draw.
        dtype: dtype of the result (the compute dtype).
        workspace: Buffers to draw into (CPU); ``None`` allocates.
        reuse_out: The result may live in ``workspace`` (the caller drops it before the next call).
    """
    if isinstance(row_std, RowNorms):
        from . import _noise_triton

        out, row_std.std = _noise_triton.noisy_rows_normed(weight_rows, row_std, seed, dtype)
        return out
    device, m = row_std.device, row_std.shape[0]
    if use_kernel(device) and (weight_rows is None or weight_rows.dtype != torch.float64):
        from . import _noise_triton

        return _noise_triton.noisy_rows(weight_rows, row_std, n, seed, dtype)
    zdtype = _draw_dtype(device, dtype)
    z = workspace.get("z", (m, n), zdtype, device) if workspace is not None else None
    z = standard_normal((m, n), seed, device, zdtype, out=z)
    std = row_std.unsqueeze(1)
    if weight_rows is None:
        return torch.mul(z, std).to(dtype)
    if weight_rows.dtype == torch.float64:  # ε = std·z in fp32 as everywhere, added in fp64 (exact W0)
        return torch.mul(z, std).double().add_(weight_rows).to(dtype)
    out = (
        workspace.get("out", (m, n), dtype, device)
        if workspace is not None and reuse_out
        else torch.empty((m, n), dtype=dtype, device=device)
    )
    if weight_rows.dtype == zdtype:
        return torch.addcmul(weight_rows, std, z, out=out)
    # CPU, bf16/fp16 W0 with fp32 z: a mixed-dtype addcmul would make CPU TensorIterator cast into
    # fresh temporaries (about 2 ns per entry on large layers); the same fp32 arithmetic in a reused
    # fp32 buffer, rounded once to the compute dtype, gives the same bits at a fraction of the time.
    wide = workspace.get("wide", (m, n), zdtype, device) if workspace is not None else None
    wide = weight_rows.to(zdtype) if wide is None else wide.copy_(weight_rows)
    return out.copy_(wide.addcmul_(std, z))
