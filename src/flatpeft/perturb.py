"""Shared primitives: seeded filter-wise noise, the functional perturbed base op, exact save/restore.

Nothing here ever writes a frozen weight. A weight perturbation ε is applied by computing the base
op with ``W0 + ε`` (or adding ``x·εᵀ`` to a quantized base's output) inside an autograd function that
regenerates ε from its seed in backward, so the frozen weights stay bit-identical in every dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ._noise import NoiseWorkspace, RowNorms, noisy_rows, standard_normal
from ._peft import Geometry
from ._sharded import sum_squares

__all__ = [
    "RngReplay",
    "filter_noise",
    "first_pass_gradients",
    "global_norm",
    "gram_fro_sq",
    "mix_seed",
    "noisy_base_op",
    "perturbed_parameters",
    "restore_",
    "snapshot",
]

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser), e.g. ``mix_seed(seed, step, layer)``.

    Distinct inputs give unrelated generator seeds, so noise of one (step, layer) never repeats
    another's and no draw depends on the global RNG.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def filter_noise(row_std: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Filter-wise Gaussian noise: row ``i`` of the ``(m, n)`` fp32 result is N(0, row_std[i]²).

    Args:
        row_std: ``(m,)`` fp32 standard deviation per row (output feature / filter).
        n: Entries per row (fan-in).
        seed: Seed of the dedicated generators; the same seed regenerates the same noise (the
            streams per device are described in ``_noise``: on CPU, fixed chunks with one generator each).
    """
    noise = standard_normal((row_std.shape[0], n), seed, row_std.device, torch.float32)
    return noise.mul_(row_std.unsqueeze(1))


class _NoisyBase(torch.autograd.Function):
    """y = op(x, W0 + ε) + b with ε regenerated from its seed in backward (never stored).

    With ``weight=None`` (a quantized base) it returns only ``op(x, ε)``, to be added to the
    base layer's own output. With ``keep=True`` the perturbed weight is saved for backward instead of
    regenerated: one fewer Gaussian draw, one extra copy of the adapted weight until backward (only
    when the input needs a gradient: otherwise backward never reads the weight). W0 + ε is built by
    ``_noise.noisy_rows`` (the Triton kernel on CUDA, ``addcmul`` into reused buffers elsewhere).
    """

    @staticmethod
    def forward(ctx, x, weight_rows, bias, row_std, geo: Geometry, seed: int, keep: bool, workspace):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        w_dtype = dtype or (weight_rows.dtype if weight_rows is not None else x.dtype)
        keep = keep and ctx.needs_input_grad[0]
        w = noisy_rows(weight_rows, row_std, geo.n, seed, w_dtype, workspace, reuse_out=not keep)
        if isinstance(row_std, RowNorms):  # the kernel computed the stds in its pass over W0
            row_std = row_std.std
        ctx.geo, ctx.seed, ctx.keep, ctx.x_shape, ctx.x_dtype = geo, seed, keep, x.shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.w_dtype, ctx.workspace = w_dtype, workspace
        ctx.save_for_backward(w if keep else weight_rows, row_std)
        xin = x.to(w_dtype)
        b = None if bias is None else bias.to(w_dtype)
        with torch.autocast(x.device.type, enabled=False):
            return geo.apply(xin, w, b)

    @staticmethod
    def backward(ctx, grad_out):
        saved, row_std = ctx.saved_tensors
        geo: Geometry = ctx.geo
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = saved
            if not ctx.keep:
                w = noisy_rows(saved, row_std, geo.n, ctx.seed, ctx.w_dtype, ctx.workspace, reuse_out=True)
            grad_x = geo.input_grad(grad_out.to(w.dtype), w, ctx.x_shape).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = geo.bias_grad(grad_out)
        return grad_x, None, grad_b, None, None, None, None, None


def noisy_base_op(
    x: torch.Tensor,
    geo: Geometry,
    weight_rows: torch.Tensor | None,
    bias: torch.Tensor | None,
    row_std: torch.Tensor | RowNorms,
    seed: int,
    keep: bool = False,
    workspace: NoiseWorkspace | None = None,
) -> torch.Tensor:
    """The base op at ``W0 + ε`` with filter-wise noise ε regenerated from ``seed`` (see ``_NoisyBase``).

    Args:
        x: Layer input.
        geo: Geometry of the adapted layer.
        weight_rows: Frozen weight as ``(m, n)`` rows, or ``None`` to return only ``op(x, ε)``.
        bias: Base bias (``None`` if absent or when ``weight_rows`` is ``None``).
        row_std: ``(m,)`` fp32 noise standard deviation per row, or ``_noise.RowNorms`` for the Triton
            kernel to compute it in the same pass (left in ``row_std.std``).
        seed: Generator seed of this (step, layer).
        keep: Save ``W0 + ε`` for backward instead of regenerating it.
        workspace: Reused buffers for the draws (CPU); ``None`` allocates fresh ones.
    """
    if geo.kind == "conv":
        return _NoisyBase.apply(x, weight_rows, bias, row_std, geo, seed, keep, workspace)
    # A linear op on (..., n) inputs runs on the 2-D view, and the output is reshaped out here: an
    # output reshaped inside the autograd function would be a view that callers could not modify in
    # place (PEFT's AdaLoRA layer adds its branch with ``result += ...``).
    out = _NoisyBase.apply(x.reshape(-1, x.shape[-1]), weight_rows, bias, row_std, geo, seed, keep, workspace)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def perturbed_parameters(
    entries: dict[nn.Module, dict[str, Callable[[torch.Tensor], torch.Tensor]]],
) -> Iterator[None]:
    """Within the block, each listed module computes with ``make(p)`` in place of its parameter ``p``.

    ``entries[module][name] = make``. A forward pre-hook puts the tensor ``make(p)`` where the
    parameter was and a forward hook puts the very same ``nn.Parameter`` object back, so no stored
    weight is ever written (bit-identical in every dtype), gradients reach a trainable ``p`` through
    ``make``, and a recomputed forward (activation checkpointing) calls ``make`` again. Parameters
    still swapped when the block exits (a forward that raised) are put back too.
    """
    swapped: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter]] = {}

    def restore(module: nn.Module, name: str) -> None:
        _, _, param = swapped.pop((id(module), name))
        module.__dict__.pop(name, None)
        module._parameters[name] = param

    def pre_hook(module: nn.Module, args) -> None:
        for name, make in entries[module].items():
            if (id(module), name) in swapped:  # re-entered (a nested call): keep the outer swap
                continue
            param = module._parameters.pop(name)
            swapped[(id(module), name)] = (module, name, param)
            module.__dict__[name] = make(param)

    def post_hook(module: nn.Module, args, output) -> None:
        for name in entries[module]:
            if (id(module), name) in swapped:
                restore(module, name)

    handles = []
    try:
        for module in entries:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, name, _ in list(swapped.values()):
            restore(module, name)


# -- exact save/restore and norms ------------------------------------------------------------------


def snapshot(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``params`` (restore with :func:`restore_`, never by subtraction)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    """Copy ``saved`` back into ``params`` bit-for-bit."""
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)


def global_norm(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """sqrt(Σ ‖t‖²) over the non-``None`` tensors, in fp32; FSDP2 shards are reduced over all ranks."""
    return sum_squares(tensors).sqrt()


def gram_fro_sq(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖B·A‖_F² without forming B·A: sum((BᵀB) ⊙ (AAᵀ)) — O((m + n)·r²) instead of O(m·n·r)."""
    b32, a32 = b.float(), a.float()
    return ((b32.t() @ b32) * (a32 @ a32.t())).sum()


def first_pass_gradients(
    loss_fn: Callable[[], torch.Tensor],
    wanted: Sequence[torch.Tensor],
    trainable: Sequence[torch.Tensor],
    backward_fn,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The first pass of a two-pass method: its detached loss and gradients w.r.t. ``wanted``, leaving
    every ``.grad`` of ``trainable`` as it was.

    The first pass must not touch gradients that earlier micro-batches accumulated. Rather than
    ``torch.autograd.grad`` (which bypasses the gradient hooks that DistributedDataParallel relies on),
    the loss is backpropagated with the caller's own ``backward_fn`` (so DDP all-reduces it and AMP loss
    scaling applies) into zeroed ``.grad`` buffers, read, and the accumulated gradients are copied back
    in place bit-for-bit. Only the detached loss leaves this function, so the first pass's graph (its
    saved activations) is freed before the second pass runs.

    Args:
        loss_fn: Computes the first-pass loss.
        wanted: Leaf tensors whose gradient is returned (``None`` where none flowed).
        trainable: Every parameter that may receive a gradient (the method's ``parameters()``).
        backward_fn: How to backpropagate (``loss.backward()`` or ``accelerator.backward``).
    """
    held = {id(t): t for t in (*trainable, *wanted)}.values()
    stash = []
    for t in held:
        stash.append(None if t.grad is None else t.grad.detach().clone())
        if t.grad is not None:
            t.grad.zero_()
    loss = loss_fn()
    backward_fn(loss)
    grads = [None if t.grad is None else t.grad.detach().clone() for t in wanted]
    with torch.no_grad():
        for t, saved in zip(held, stash, strict=True):
            if saved is None:
                t.grad = None
            else:
                t.grad.copy_(saved)
    return loss.detach(), grads


class RngReplay:
    """Capture the global RNG state so a second forward pass draws the same dropout masks.

    Two-pass methods (SAM family) call :meth:`replay` before the second pass: the gradient is then
    taken of the same stochastic loss at the perturbed point, and with ρ = 0 the two passes (and
    the RNG state afterwards) are exactly those of a single plain pass. Nothing is reseeded.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
