"""LoRA-SAM and full-space SAM against independent recomputation on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

import flatpeft
from flatpeft import _peft
from helpers import make_batch, tiny_bert


def _lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def _grads_at(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_sam_perturbation_and_gradient():
    rho = 0.3
    model = tiny_bert()
    batch = make_batch()
    ref = copy.deepcopy(model)
    named = _lora_params(ref)
    g = torch.autograd.grad(ref(**batch).loss, [p for _, p in named])
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    expected_point = {n: p.detach() + rho * gi / norm for (n, p), gi in zip(named, g, strict=True)}

    method = flatpeft.attach(model, "lora_sam", rho=rho)
    seen = []

    def loss_fn():
        seen.append({n: p.detach().clone() for n, p in _lora_params(model)})
        return model(**batch).loss

    before = {n: p.detach().clone() for n, p in _lora_params(model)}
    method.backward(loss_fn)
    assert len(seen) == 2
    for n in before:
        assert torch.equal(seen[0][n], before[n])  # first pass at the clean point
        torch.testing.assert_close(seen[1][n], expected_point[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(dict(_lora_params(model))[n], before[n])  # restored bit-for-bit
    eps_norm = torch.sqrt(sum(((seen[1][n] - before[n]) ** 2).sum() for n in before))
    assert eps_norm.item() == pytest.approx(rho, rel=1e-4)

    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in expected_point:
                p.copy_(expected_point[n])
    want = _grads_at(ref, batch)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_sam_full_perturbation_and_gradient():
    rho = 0.5
    model = tiny_bert()
    batch = make_batch()
    ref = copy.deepcopy(model)
    layers = _peft.lora_layers(ref, "default")
    weights = [layer.get_base_layer().weight for _, layer in layers]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(ref(**batch).loss, weights)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for w, g in zip(weights, grads, strict=True):
            w.add_(g, alpha=rho / norm.item())
            w.requires_grad_(False)
    want = _grads_at(ref, batch)

    method = flatpeft.attach(model, "sam_full", rho=rho)
    method.backward(lambda: model(**batch).loss)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_two_pass_methods_replay_dropout_masks():
    # With dropout on and rho = 0, the second pass sees the first pass's masks: exactly one plain pass.
    for name in ("lora_sam", "sam_full"):
        model = tiny_bert(dropout=0.2)
        model.train()
        batch = make_batch()
        torch.manual_seed(5)
        plain = _grads_at(model, batch)
        plain_state = torch.get_rng_state()
        model.zero_grad(set_to_none=True)
        method = flatpeft.attach(model, name, rho=0.0)
        torch.manual_seed(5)
        method.backward(lambda m=model, b=batch: m(**b).loss)
        assert torch.equal(plain_state, torch.get_rng_state())
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, plain[n], rtol=1e-6, atol=1e-7, msg=n)
        method.detach()
