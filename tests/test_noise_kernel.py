"""The fused Triton noise kernel (``flatpeft._noise_triton``), run on CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` is set by ``conftest.py`` before anything imports Triton (on machines without
CUDA), so the kernel's ``@triton.jit`` functions, and Triton's own ``tl.randn4x``, are interpreted
ones that run on CPU tensors. ``FLATPEFT_NOISE_KERNEL=triton`` forces the dispatch CUDA takes by default,
so the glue code of the CUDA path (``_noise.use_kernel`` → custom op → kernel) runs here too.
"""

from __future__ import annotations

import math

import pytest
import torch

import flatpeft
from flatpeft import _noise
from flatpeft.perturb import mix_seed, noisy_base_op
from helpers import assert_bit_identical, frozen_state, make_batch, tiny_bert

pytest.importorskip("triton")
K = pytest.importorskip("flatpeft._noise_triton")
M32 = 0xFFFFFFFF


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FLATPEFT_NOISE_KERNEL", "triton")
    if type(K._noisy_rows_kernel).__name__ != "InterpretedFunction":
        if torch.cuda.is_available():
            pytest.skip("CPU interpreter tests (a CUDA machine runs the kernel in benchmarks/gpu.sh)")
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)")


def _philox_ref(seed: int, counter: int) -> list[int]:
    """Philox-4x32-10 in plain Python integers: key (seed lo, seed hi), counter (c lo, c hi, 0, 0)."""
    c0, c1, c2, c3 = counter & M32, (counter >> 32) & M32, 0, 0
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return [c0, c1, c2, c3]


def _normals_ref(seed: int, m: int, n: int) -> torch.Tensor:
    """The kernel's ``(m, n)`` N(0, 1) entries from the reference words (Box–Muller, float64): row i,
    entry j takes word (j mod 4Q) // Q of counter (i·T + j // 4Q)·Q + j mod Q, T = ⌈n / 4Q⌉."""
    q = K.lanes(n)
    tiles = -(-n // (4 * q))
    out = torch.empty(m, n, dtype=torch.float64)

    def uniform(w):
        x = w - (1 << 32) if w >= 1 << 31 else w  # int32 bitcast
        x = ~x if x < 0 else x
        return float(torch.tensor(x, dtype=torch.float32) * torch.tensor(4.6566127342e-10))

    for i in range(m):
        for j in range(n):
            tile, rest = divmod(j, 4 * q)
            word, lane = divmod(rest, q)
            words = _philox_ref(seed, (i * tiles + tile) * q + lane)
            pair = words[0:2] if word < 2 else words[2:4]
            u1, u2 = max(1e-7, uniform(pair[0])), uniform(pair[1])
            radius, theta = math.sqrt(-2.0 * math.log(u1)), 2 * math.pi * u2
            out[i, j] = radius * (math.cos(theta) if word % 2 == 0 else math.sin(theta))
    return out


def test_philox_words_equal_the_integer_reference_bit_for_bit():
    seed = mix_seed(3, 7, 11, 0)  # a 63-bit (seed, step, layer) seed: both key words non-zero
    counters = [0, 1, 2, 1023, 1024, 4097, (1 << 32) + 5, 123_456_789_012]
    got = K.philox_words(seed, torch.tensor(counters, dtype=torch.int64))
    assert got.tolist() == [_philox_ref(seed, c) for c in counters]
    assert K.philox_words(5, torch.tensor([9])).tolist() == [_philox_ref(5, 9)]


@pytest.mark.parametrize("n", [50, 4 * 1024 + 100])  # one short tile (Q = 16); two tiles of 4·BLOCK
def test_normals_follow_the_documented_stream_with_all_four_words(n):
    seed = mix_seed(1, 2, 3)
    m = 3 if n < 100 else 2
    z = K.noisy_rows(None, torch.ones(m), n, seed, torch.float32)
    ref = _normals_ref(seed, m, n)
    torch.testing.assert_close(z.double(), ref, rtol=0, atol=2e-5)
    assert z.unique().numel() == m * n  # the four words give four distinct streams, rows differ


def test_w0_plus_eps_is_the_formula_and_w0_stays_bit_identical():
    torch.manual_seed(0)
    m, n, seed = 40, 130, 99
    z = K.noisy_rows(None, torch.ones(m), n, seed, torch.float32)
    std = torch.rand(m) * 0.1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(m, n).to(dtype)
        before = w.clone()
        out = K.noisy_rows(w, std, n, seed, dtype)
        expected = (w.float() + std[:, None] * z).to(dtype)  # fp32 arithmetic, rounded to nearest even
        assert out.dtype == dtype and torch.equal(out, expected), dtype
        assert torch.equal(w, before)
    stored = torch.randn(n, m)  # a strided view: GPT-2 Conv1D rows are the stored weight transposed
    out = K.noisy_rows(stored.t(), std, n, seed, torch.float32)
    assert torch.equal(out, stored.t() + std[:, None] * z)
    eps = K.noisy_rows(None, std, n, seed, torch.bfloat16)  # quantized base: ε alone
    assert torch.equal(eps, (std[:, None] * z).bfloat16())


@pytest.mark.parametrize("r", [3, 8, 96])  # 96: blocks of 4 rows instead of 16
def test_fused_row_stds_are_the_effective_norms_and_give_the_same_noise(r):
    torch.manual_seed(0)
    m, n, s, scale, seed = 37, 1500, 2.0, 0.1 / math.sqrt(1500), mix_seed(4, 5, 6)  # ragged last block
    a, b = torch.randn(r, n) * 0.05, torch.randn(m, r)
    stored = torch.randn(n, m)  # strided rows, as GPT-2 Conv1D's transposed storage
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = stored.t().to(dtype)
        before = w.clone()
        base_sq = w.float().pow(2).sum(1)
        out, std = K.noisy_rows_normed(w, _noise.RowNorms(a, b, base_sq, s, scale), seed, dtype)
        expected = scale * (w.double() + s * b.double() @ a.double()).norm(dim=1)
        torch.testing.assert_close(std.double(), expected, rtol=1e-5, atol=0)
        assert torch.equal(out, K.noisy_rows(w, std, n, seed, dtype)), dtype  # the backward's regeneration
        assert torch.equal(w, before)


def test_rows_have_zero_mean_unit_std_and_pass_a_ks_test():
    m, n = 8, 8192
    z = K.noisy_rows(None, torch.ones(m), n, mix_seed(0, 1, 2), torch.float32).double()
    # Per row: the mean has standard error 1/√n, the std a relative standard error 1/√(2n).
    assert z.mean(1).abs().max() < 5 / math.sqrt(n)
    assert z.std(1).sub(1).abs().max() < 5 / math.sqrt(2 * n)
    flat = z.reshape(-1).sort().values
    count = flat.numel()
    cdf = 0.5 * (1 + torch.special.erf(flat / math.sqrt(2)))
    grid = torch.arange(1, count + 1, dtype=torch.float64) / count
    ks = torch.maximum(grid - cdf, cdf - (grid - 1 / count)).max().item()
    assert ks < 1.95 / math.sqrt(count)  # Kolmogorov–Smirnov against N(0, 1) at α = 0.001
    shifted = flat + 0.05  # the test has the power to see a shift of 0.05 σ
    cdf2 = 0.5 * (1 + torch.special.erf(shifted / math.sqrt(2)))
    assert torch.maximum(grid - cdf2, cdf2 - (grid - 1 / count)).max().item() > 1.95 / math.sqrt(count)


def test_dispatch_uses_the_kernel_when_forced_and_torch_otherwise(monkeypatch):
    cpu = torch.device("cpu")
    assert _noise.use_kernel(cpu)
    monkeypatch.setenv("FLATPEFT_NOISE_KERNEL", "auto")
    assert not _noise.use_kernel(cpu)  # automatic on CUDA only
    monkeypatch.setenv("FLATPEFT_NOISE_KERNEL", "torch")
    assert not _noise.use_kernel(cpu)
    monkeypatch.setenv("FLATPEFT_NOISE_KERNEL", "cuda")
    with pytest.raises(ValueError, match=r"'auto'.*'torch'.*'triton'"):
        _noise.use_kernel(cpu)
    monkeypatch.setenv("FLATPEFT_NOISE_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="unset it or set it to 'torch'"):
        _noise.use_kernel(cpu)


def test_functional_op_through_the_kernel_matches_explicit_autograd():
    torch.manual_seed(0)
    from flatpeft import _peft

    model = tiny_bert()
    layer = next(layer for _, layer in _peft.lora_layers(model.base_model.model, "default"))
    geo = _peft.geometry(layer)
    weight, bias = _peft.dense_weight(layer), _peft.base_bias(layer)
    std = torch.rand(geo.m) * 0.1 + 0.01
    x = torch.randn(4, geo.n, requires_grad=True)
    y = noisy_base_op(x, geo, geo.rows(weight), bias, std, seed=7)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    w_pert = geo.rows(weight) + std[:, None] * K.noisy_rows(None, torch.ones(geo.m), geo.n, 7, torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = geo.apply(x2, w_pert, bias)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)


def test_flat_lora_on_the_kernel_path_regenerates_what_keep_holds_and_keeps_weights_exact():
    grads, stds = [], []
    for mode in ("regenerate", "keep"):
        model = tiny_bert()
        before = frozen_state(model)
        method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", noise_memory=mode)
        method.backward(lambda m=model: m(**make_batch()).loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        stds.append(method.row_stds())
        assert_bit_identical(before, frozen_state(model))
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_kernel_noise_std_is_sigma_times_effective_row_norm():
    import peft
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(2048, 16))
    with torch.no_grad():
        base[0].weight.mul_(torch.arange(1, 17, dtype=torch.float32).unsqueeze(1))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant")
    seen = {}
    inner = layer.get_base_layer()

    def loss_fn():
        seen["w"] = inner(torch.eye(2048)).t() - inner.bias[:, None]  # W0 + ε read off the patched base
        return model(torch.randn(2, 2048)).pow(2).mean()

    method.backward(loss_fn)
    eps = seen["w"].detach() - inner.weight
    w_eff = inner.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    expected = 0.1 * w_eff.detach().norm(dim=1) / math.sqrt(2048)
    ratio = eps.std(dim=1) / expected
    assert ratio.sub(1).abs().max() < 5 / math.sqrt(2 * 2047)
    torch.testing.assert_close(method.row_stds()[0], expected)


def test_activation_checkpointing_on_the_kernel_path_recomputes_the_same_noise():
    """The first forward's fused pass writes the row stds; the checkpointed recompute draws with them."""
    from test_flat_lora import test_activation_checkpointing_recomputes_the_same_noise as same_noise

    same_noise()
