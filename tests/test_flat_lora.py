"""Flat-LoRA formulas on hand-set tensors: noise law, schedule, seeding, exact functional perturbation."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from torch import nn

import flatpeft
from flatpeft import _peft
from flatpeft.methods.flat_lora import noise_scale
from flatpeft.perturb import filter_noise, mix_seed, noisy_base_op, perturbed_parameters
from helpers import assert_bit_identical, frozen_state, make_batch, tiny_bert, tiny_gpt2


class _OneLinear(nn.Module):
    def __init__(self, n: int = 512, m: int = 48):
        super().__init__()
        self.lin = nn.Linear(n, m)
        with torch.no_grad():  # rows with very different norms: row i scaled by (i + 1)
            self.lin.weight.mul_(torch.arange(1, m + 1, dtype=torch.float32).unsqueeze(1))

    def forward(self, x):
        return self.lin(x)


def _one_linear_model(n=512, m=48) -> peft.PeftModel:
    torch.manual_seed(0)
    model = peft.get_peft_model(_OneLinear(n, m), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.normal_(0, 0.5)
    return model


def _noise_seen_in_backward(model, method, x) -> torch.Tensor:
    """εᵀ read off the base layer (inputs = identity rows) inside ``method.backward``."""
    layer = model.base_model.model.lin
    base = layer.get_base_layer()
    seen = {}

    def loss_fn():
        seen["out"] = base(torch.eye(base.in_features))
        return model(x).pow(2).mean()

    method.backward(loss_fn)
    with torch.no_grad():
        clean = base(torch.eye(base.in_features))
    return (seen["out"] - clean).detach().t()


def test_row_std_matches_sigma_times_row_norm():
    model = _one_linear_model()
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant")
    eps = _noise_seen_in_backward(model, method, torch.randn(4, 512))
    layer = model.base_model.model.lin
    w_eff = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    expected = 0.1 * w_eff.detach().norm(dim=1) / math.sqrt(512)
    ratio = eps.std(dim=1) / expected
    # 512 draws per row: the sample std has relative standard error 1/sqrt(2*511) ≈ 3.1%.
    assert ratio.sub(1).abs().max() < 5 * 0.031
    assert ratio.mean().sub(1).abs() < 5 * 0.031 / math.sqrt(48)
    assert eps.mean(dim=1).abs().div(expected / math.sqrt(512)).max() < 5  # zero mean


@pytest.mark.parametrize(
    ("schedule", "values"),
    [
        ("cosine", (0.0, 0.05, 0.1, 0.1)),
        ("linear", (0.0, 0.05, 0.1, 0.1)),
        ("constant", (0.1, 0.1, 0.1, 0.1)),
    ],
)
def test_schedule_values(schedule, values):
    got = tuple(noise_scale(0.1, schedule, t, 20) for t in (0, 10, 20, 30))
    assert got == pytest.approx(values, abs=1e-12)
    assert noise_scale(0.1, "cosine", 5, 20) == pytest.approx(0.1 * 0.5 * (1 - math.cos(math.pi / 4)))
    method = flatpeft.attach(_one_linear_model(), "flat_lora", sigma=0.1, schedule=schedule, total_steps=20)
    method.step = 10
    assert method.sigma_t() == pytest.approx(values[1])
    assert method.strength() == {"sigma": pytest.approx(values[1])}


def test_same_noise_within_a_step_new_noise_next_step():
    model = _one_linear_model()
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", seed=1)
    x1, x2 = torch.randn(4, 512), torch.randn(4, 512)
    first = _noise_seen_in_backward(model, method, x1)
    second = _noise_seen_in_backward(model, method, x2)  # another micro-batch, same optimizer step
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    method.after_step()
    third = _noise_seen_in_backward(model, method, x1)
    assert (third - first).abs().mean() > 0.5 * first.abs().mean()
    method.detach()
    other = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", seed=2)
    assert (_noise_seen_in_backward(model, other, x1) - first).abs().mean() > 0.5 * first.abs().mean()


def test_dropout_masks_unaffected_by_noise():
    # With dropout on, Flat-LoRA draws no number from the global RNG: the state after its backward
    # equals the state after a plain backward from the same start.
    model = tiny_bert(dropout=0.1)
    model.train()
    batch = make_batch()
    torch.manual_seed(123)
    model(**batch).loss.backward()
    plain_state = torch.get_rng_state()
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant")
    torch.manual_seed(123)
    method.backward(lambda: model(**batch).loss)
    assert torch.equal(plain_state, torch.get_rng_state())


def test_mix_seed_distinct_and_stable():
    seeds = {mix_seed(0, t, layer) for t in range(50) for layer in range(50)}
    assert len(seeds) == 2500
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 3, 2)
    assert all(0 <= s < 2**63 for s in seeds)


def _conv_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv"])
@pytest.mark.parametrize("keep", [False, True])
def test_functional_op_matches_explicit_autograd(kind, keep):
    """Forward and input gradient of the regenerating op equal autograd through op(x, W0 + ε)."""
    if kind == "linear":
        layer = _one_linear_model(n=16, m=6).base_model.model.lin
        x = torch.randn(5, 16, requires_grad=True)
    elif kind == "conv1d":
        layer = tiny_gpt2().base_model.model.transformer.h[0].attn.c_attn
        x = torch.randn(2, 3, 32, requires_grad=True)
    else:
        layer = _conv_model().base_model.model.conv
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
    geo = _peft.geometry(layer)
    assert geo.kind == kind
    weight, bias = _peft.dense_weight(layer), _peft.base_bias(layer)
    std = torch.rand(geo.m) * 0.1 + 0.01
    y = noisy_base_op(x, geo, geo.rows(weight), bias, std, seed=7, keep=keep)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)

    x2 = x.detach().clone().requires_grad_(True)
    w_pert = geo.rows(weight) + filter_noise(std, geo.n, 7)
    y2 = geo.apply(x2, w_pert, bias)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)

    # Quantized-base form: base output plus op(x, ε) alone.
    x3 = x.detach().clone().requires_grad_(True)
    y3 = layer.get_base_layer()(x3) + noisy_base_op(x3, geo, None, None, std, seed=7, keep=keep)
    (gx3,) = torch.autograd.grad(y3, x3, g)
    torch.testing.assert_close(y3, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx3, gx2, rtol=1e-5, atol=1e-5)


def test_keep_and_regenerate_give_identical_gradients():
    grads = []
    for mode in ("regenerate", "keep"):
        model = tiny_bert()
        method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", noise_memory=mode)
        method.backward(lambda m=model: m(**make_batch()).loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_activation_checkpointing_recomputes_the_same_noise():
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert()
        if checkpointing:
            inner = model.base_model.model
            enable = (
                getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})
            assert inner.is_gradient_checkpointing
        model.train()
        method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant")
        method.backward(lambda m=model: m(**make_batch()).loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7, msg=k)


def test_conv2d_and_fp16_frozen_weights_bit_identical():
    model = _conv_model()
    before = frozen_state(model)
    method = flatpeft.attach(model, "flat_lora", sigma=0.2, schedule="constant")
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    method.bind(opt)
    for _ in range(3):
        method.backward(lambda: model(torch.randn(2, 3, 6, 6)).pow(2).mean())
        opt.step()
        opt.zero_grad()
    assert_bit_identical(before, frozen_state(model))

    half = tiny_bert(dtype=torch.float16)
    before = frozen_state(half)
    method = flatpeft.attach(half, "flat_lora", sigma=0.1, schedule="constant")
    loss = method.backward(lambda: half(**make_batch()).loss)
    assert torch.isfinite(loss)
    assert_bit_identical(before, frozen_state(half))


def test_rslora_and_dora_noise_uses_effective_weight():
    for kwargs in ({"use_rslora": True}, {"use_dora": True}):
        model = tiny_bert(**kwargs)
        method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant")
        for (_, layer), geo, std in zip(method.layers, method.geos, method.row_stds(), strict=True):
            w = copy.deepcopy(layer.get_base_layer().weight).float() + layer.get_delta_weight("default")
            torch.testing.assert_close(std, 0.1 * geo.rows(w).norm(dim=1) / math.sqrt(geo.n))
        assert torch.isfinite(method.backward(lambda m=model: m(**make_batch()).loss))


def _two_steps(model, method) -> None:
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    method.bind(opt)
    for i in range(2):
        assert torch.isfinite(method.backward(lambda i=i: model(**make_batch(i)).loss))
        opt.step()
        opt.zero_grad()


def test_adalora_base_noise_uses_its_svd_delta():
    """AdaLoRA (Flat-LoRA's Table 5 combines them): row norms of W0 + PEFT's delta P·Λ·Q, and training
    leaves the frozen weights bit-identical."""
    torch.manual_seed(0)
    base = tiny_bert(base_only=True)
    config = peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=4, target_r=2, total_step=10, target_modules=["query", "value", "dense"]
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_E" in name:
                p.normal_(0, 0.05)
    before = frozen_state(model)
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant")
    assert method.layers and not isinstance(method.layers[0][1].lora_B["default"], nn.Module)
    for (_, layer), geo, std in zip(method.layers, method.geos, method.row_stds(), strict=True):
        w = layer.get_base_layer().weight.float() + layer.get_delta_weight("default")
        torch.testing.assert_close(std, 0.1 * geo.rows(w).norm(dim=1) / math.sqrt(geo.n))
    _two_steps(model, method)
    assert_bit_identical(before, frozen_state(model))


# -- scope="all": Flat-LoRA (all), Appendix C ----------------------------------------------------------


def test_perturbed_parameters_is_functional_and_exact():
    """Inside the block a module computes with make(p); outside it holds the same Parameter objects,
    bit-identical, and a trainable p gets the gradient at the perturbed point."""
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
        norm.bias.copy_(torch.linspace(-0.2, 0.3, 6))
    norm.bias.requires_grad_(False)
    weight, bias = norm.weight, norm.bias
    before = (weight.detach().clone(), bias.detach().clone())
    x = torch.randn(3, 6)
    dw, db = torch.full((6,), 0.25), torch.full((6,), -0.5)
    with perturbed_parameters({norm: {"weight": lambda p: p + dw, "bias": lambda p: p + db}}):
        out = norm(x)
        assert norm.weight is weight  # only inside the module's forward
    expected = nn.functional.layer_norm(x, (6,), before[0] + dw, before[1] + db)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), weight)
    w = (before[0] + dw).requires_grad_(True)
    (ref,) = torch.autograd.grad(nn.functional.layer_norm(x, (6,), w, before[1] + db).square().sum(), w)
    torch.testing.assert_close(grad, ref)
    assert norm.weight is weight and norm.bias is bias and norm._forward_pre_hooks == {}
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    with pytest.raises(RuntimeError), perturbed_parameters({norm: {"weight": lambda p: p * 2}}):
        norm(torch.randn(3, 5))  # a forward that raises leaves the parameter restored
    assert norm.weight is weight and "weight" not in norm.__dict__


def test_scope_all_perturbs_layer_norms_biases_and_embeddings_by_their_rows(monkeypatch):
    """The LayerNorm weight seen in forward is w + ε with ε_i ~ N(0, (σ|w_i|)²) regenerated from the
    documented generator; the word embedding gets noise too; nothing stored
    changes; scope="layers" leaves them alone."""
    model = tiny_bert()
    before = frozen_state(model)
    seen = []
    real = nn.functional.layer_norm
    monkeypatch.setattr(
        nn.functional,
        "layer_norm",
        lambda x, s, w=None, b=None, eps=1e-5: seen.append(w) or real(x, s, w, b, eps),
    )
    batch = make_batch()
    layers = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", seed=3)
    layers.backward(lambda: model(**batch).loss)
    norm = model.base_model.model.bert.embeddings.LayerNorm
    assert all(w is norm.weight for w in seen[:1])  # layers scope: the stored weight itself
    layers.detach()
    model.zero_grad()
    seen.clear()
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", seed=3, scope="all")
    index = method._others[norm]["weight"]
    method.backward(lambda: model(**batch).loss)
    std = 0.1 * norm.weight.detach().abs()
    expected = norm.weight.detach() + filter_noise(std, 1, mix_seed(3, 0, index, 0)).reshape(-1)
    torch.testing.assert_close(seen[0].detach(), expected, rtol=0, atol=1e-7)
    emb = model.base_model.model.bert.embeddings.word_embeddings
    assert "weight" in method._others[emb]  # entry-wise σ|E_vj| (test_diffusers: Conv1D, embeddings)
    assert all(
        m not in method._others or "weight" not in method._others[m] for m in [g.base for g in method.geos]
    )
    assert_bit_identical(before, frozen_state(model))
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)


def test_scope_all_with_zero_sigma_is_plain_backward_and_trains_exactly():
    model = tiny_bert()
    batch = make_batch()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    method = flatpeft.attach(model, "flat_lora", sigma=0.0, scope="all")
    method.backward(lambda: model(**batch).loss)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, plain[n]), n
    method.detach()
    before = frozen_state(model)
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, scope="all", schedule="constant")
    _two_steps(model, method)
    assert_bit_identical(before, frozen_state(model))
