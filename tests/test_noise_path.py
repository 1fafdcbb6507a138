"""Flat-LoRA's plain PyTorch noise path: chunked CPU draws, the fused W0 + std·z, the ‖W0_i‖² cache and
``keep_budget_gb``."""

from __future__ import annotations

import pytest
import torch

import flatpeft
from flatpeft import _noise, _peft
from flatpeft.perturb import filter_noise, mix_seed
from helpers import assert_bit_identical, frozen_state, make_batch, tiny_bert


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("FLATPEFT_NOISE_KERNEL", "torch")


def test_cpu_draw_is_the_same_whatever_the_thread_count():
    shape = (3, _noise.CHUNK + 1000)  # two chunks, the second ragged
    seed = mix_seed(0, 1, 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _noise.standard_normal(shape, seed, torch.device("cpu"), torch.float32)
        torch.set_num_threads(2)
        two = _noise.standard_normal(shape, seed, torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    flat = one.reshape(-1)
    # The documented streams: chunk 0 from the seed itself, chunk k from mix_seed(seed, k).
    pieces = flat.split(_noise.CHUNK)
    assert len(pieces) == 4 and pieces[-1].numel() == 3000
    for k, piece in enumerate(pieces):
        gen = torch.Generator().manual_seed(seed if k == 0 else mix_seed(seed, k))
        assert torch.equal(piece, torch.randn(piece.numel(), generator=gen)), k
    small = _noise.standard_normal((4, 50), seed, torch.device("cpu"), torch.float32)
    assert torch.equal(small, torch.randn((4, 50), generator=torch.Generator().manual_seed(seed)))


def test_fused_rows_equal_w0_plus_std_z_and_leave_w0_untouched():
    torch.manual_seed(0)
    m, n, seed = 6, 40, 5
    std = torch.rand(m)
    z = filter_noise(torch.ones(m), n, seed)
    ws = _noise.NoiseWorkspace()
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(m, n).to(dtype)
        before = w.clone()
        got = _noise.noisy_rows(w, std, n, seed, dtype, ws, reuse_out=True)
        expected = (w.float() + std[:, None] * z).to(dtype)
        # addcmul may fuse the multiply-add: within one rounding of fp32 before the cast.
        torch.testing.assert_close(
            got.float(), expected.float(), rtol=0, atol=0 if dtype != torch.float32 else 1e-6
        )
        assert torch.equal(w, before)
        again = _noise.noisy_rows(w, std, n, seed, dtype, ws, reuse_out=True)
        assert again.data_ptr() == got.data_ptr()  # the workspace is reused
    fresh = _noise.noisy_rows(w, std, n, seed, torch.bfloat16, ws, reuse_out=False)
    assert fresh.data_ptr() != again.data_ptr()  # a kept W0+ε never lives in the workspace
    w64 = torch.randn(m, n, dtype=torch.float64)
    got = _noise.noisy_rows(w64, std, n, seed, torch.float64, ws)
    assert torch.equal(got, w64 + (std[:, None] * z).double())  # ε in fp32, W0 exact in fp64


def test_base_row_norms_are_cached_until_the_weight_changes():
    model = tiny_bert()
    _, layer = _peft.lora_layers(model.base_model.model, "default")[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    geo = _peft.geometry(layer)
    cache: dict = {}
    fresh = _peft.effective_row_norms(layer, geo, "default")
    assert torch.equal(_peft.effective_row_norms(layer, geo, "default", cache), fresh)
    cached = cache["value"]
    assert _peft.effective_row_norms(layer, geo, "default", cache) is not None and cache["value"] is cached
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(2)  # an in-place change: the version counter moves
    torch.testing.assert_close(
        _peft.effective_row_norms(layer, geo, "default", cache),
        _peft.effective_row_norms(layer, geo, "default"),
    )
    assert cache["value"] is not cached


def _saved_weight_copies(model, method, dims: set[tuple[int, int]]) -> int:
    """How many copies of an adapted weight (W0+ε, not W0 itself) autograd saves during one step."""
    count = 0
    stored = {p.data_ptr() for p in model.parameters() if not p.requires_grad}

    def pack(t):
        nonlocal count
        count += tuple(t.shape) in dims and t.data_ptr() not in stored
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        method.backward(lambda: model(**make_batch()).loss)
    return count


def test_keep_budget_keeps_the_layers_that_fit_and_regenerates_the_rest():
    grads, kept = {}, {}
    geos = flatpeft.attach(tiny_bert(), "flat_lora", sigma=0.1, schedule="constant").geos
    sizes = [g.m * g.n * 4 for g in geos]  # fp32 bytes of W0+ε per layer
    part = sum(sizes[:-1]) / 1e9  # every layer but the last fits
    for budget in (None, 0.0, part, "regenerate"):
        model = tiny_bert()
        before = frozen_state(model)
        kwargs = {"noise_memory": "regenerate"} if budget == "regenerate" else {"noise_memory": "keep"}
        if budget not in (None, "regenerate"):
            kwargs["keep_budget_gb"] = budget
        method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", **kwargs)
        dims = {(g.m, g.n) for g in method.geos}
        kept[budget] = [method._keeps(i, torch.float32) for i in range(len(method.layers))]
        saved = _saved_weight_copies(model, method, dims)
        kept[budget, "saved"] = saved
        grads[budget] = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        assert_bit_identical(before, frozen_state(model))
    assert kept[None] == [True] * len(sizes) and kept[0.0] == [False] * len(sizes)
    assert kept[part] == [True] * (len(sizes) - 1) + [False]
    # Saved W0+ε copies: one per kept layer whose input needs a gradient (the last layer's does).
    assert kept[0.0, "saved"] == kept["regenerate", "saved"] < kept[part, "saved"] == kept[None, "saved"] - 1
    for budget in (None, 0.0, part):
        for a, b in zip(grads[budget], grads["regenerate"], strict=True):
            assert torch.equal(a, b)


def test_keep_budget_needs_keep_and_a_non_negative_value():
    model = tiny_bert()
    with pytest.raises(ValueError, match="noise_memory='keep'"):
        flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", keep_budget_gb=1.0)
    with pytest.raises(ValueError, match="keep_budget_gb"):
        flatpeft.attach(model, "flat_lora", schedule="constant", noise_memory="keep", keep_budget_gb=-1.0)


def test_cpu_half_precision_rows_are_the_bits_of_one_mixed_dtype_addcmul():
    """bf16/fp16 W0 with fp32 noise goes through a reused fp32 buffer instead of one mixed-dtype
    ``addcmul`` (CPU temporaries); the result is the same bits, with or without a workspace."""
    torch.manual_seed(0)
    m, n, seed = 300, 257, 11
    std = torch.rand(m) * 0.1
    z = filter_noise(torch.ones(m), n, seed)
    ws = _noise.NoiseWorkspace()
    for dtype in (torch.bfloat16, torch.float16):
        stored = torch.randn(n, m).to(dtype)  # strided rows (GPT-2 Conv1D)
        w = stored.t()
        one_op = torch.addcmul(w, std[:, None], z).to(dtype)  # computed in fp32, rounded once
        for workspace in (ws, None):
            got = _noise.noisy_rows(w, std, n, seed, dtype, workspace, reuse_out=workspace is not None)
            assert got.dtype == dtype and torch.equal(got, one_op), (dtype, workspace)
        assert torch.equal(stored.t(), w)
