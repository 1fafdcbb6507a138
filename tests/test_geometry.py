"""Filter-wise geometry of ``nn.Conv1d`` / ``nn.Conv3d`` bases (a row is one output filter, fan-in =
in_channels/groups × kernel volume), and ``scope="all"`` noise of weights that are not adapted
(Flat-LoRA Appendix C: entry-wise σ_t·|w|, GPT-2 ``Conv1D`` included)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

import flatpeft
from flatpeft import _peft
from flatpeft.perturb import filter_noise, noisy_base_op
from helpers import tiny_gpt2


def _conv_layer(dims: int, groups: int = 1):
    """A LoRA layer (``inject_adapter_in_model``) on an ``nn.Conv{dims}d`` with 4→6 channels."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    torch.manual_seed(0)
    net = nn.Sequential(conv(4, 6, 3, padding=1, stride=1, groups=groups))
    net = peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), net)
    return net, net[0]


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_rows_fan_in_and_regenerated_op(dims, groups):
    """m = out_channels, n = in/groups × kernel volume; the regenerating op's output and input gradient
    equal autograd through conv(x, W0 + ε)."""
    _, layer = _conv_layer(dims, groups)
    geo = _peft.geometry(layer)
    assert (geo.kind, geo.m, geo.n) == ("conv", 6, 4 // groups * 3**dims)
    x = torch.randn(2, 4, *([5] * dims), requires_grad=True)
    weight, bias = _peft.dense_weight(layer), _peft.base_bias(layer)
    std = torch.rand(geo.m) * 0.1 + 0.01
    y = noisy_base_op(x, geo, geo.rows(weight), bias, std, seed=11)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    conv = (nn.functional.conv1d, None, nn.functional.conv3d)[dims - 1]
    w = (geo.rows(weight) + filter_noise(std, geo.n, 11)).reshape(weight.shape)
    y2 = conv(x2, w, bias, 1, 1, 1, groups)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(geo.bias_grad(g), g.sum(dim=(0, *range(2, g.dim()))))


def test_conv3d_noise_row_std_is_sigma_times_row_norm_over_root_fan_in(monkeypatch):
    """Hand-set Conv3d filters of different norms: the noise flat_lora adds to filter i has standard
    deviation σ‖W'_i‖/√n (n = 4 × 3³ = 108), measured on the perturbed weight the op computes with."""
    net, layer = _conv_layer(3)
    with torch.no_grad():
        w = layer.get_base_layer().weight
        for i in range(6):
            w[i].fill_(0.1 * (i + 1))  # row norm 0.1·(i+1)·√108
        layer.lora_B["default"].weight.zero_()  # W' = W0
    sigma, n = 0.5, 108
    method = flatpeft.attach(net, "flat_lora", sigma=sigma, schedule="constant", seed=5)
    want = torch.tensor([sigma * 0.1 * (i + 1) * math.sqrt(n) / math.sqrt(n) for i in range(6)])
    torch.testing.assert_close(method.row_stds()[0], want)
    seen = []
    apply = _peft.Geometry.apply
    monkeypatch.setattr(
        _peft.Geometry, "apply", lambda self, x, rows, b: seen.append(rows) or apply(self, x, rows, b)
    )
    before = w.detach().clone()
    method.backward(lambda: net(torch.randn(1, 4, 4, 4, 4)).square().mean())
    eps = seen[0] - before.reshape(6, n)
    assert eps.shape == (6, n)
    measured = eps.std(dim=1)
    assert torch.allclose(measured, want, rtol=0.2)  # 108 draws a row: ~7 % sampling error
    assert measured[5] / measured[0] > 4  # the rows follow their own norms
    assert torch.equal(w, before)


def test_scope_all_noise_follows_each_entry_of_a_gpt2_conv1d_weight(monkeypatch):
    """A GPT-2 ``Conv1D`` weight that is not adapted (stored (in, out)) gets ε_ij ~ N(0, (σ|w_ij|)²):
    ε/|w| is the documented generator's unit draw over the stored layout, entry by entry."""
    model = tiny_gpt2(target_modules=["c_attn"])  # c_proj, c_fc stay plain Conv1D
    fc = model.base_model.model.transformer.h[0].mlp.c_fc
    method = flatpeft.attach(model, "flat_lora", sigma=0.1, schedule="constant", seed=2, scope="all")
    index = method._others[fc]["weight"]
    seen = []
    real = type(fc).forward

    def spy(self, x):
        if self is fc:
            seen.append(self.weight.detach().clone())
        return real(self, x)

    monkeypatch.setattr(type(fc), "forward", spy)
    ids = torch.randint(1, 64, (2, 8))
    method.backward(lambda: model(input_ids=ids, labels=ids).loss)
    stored = fc.weight.detach()
    eps = seen[0] - stored
    unit = filter_noise(torch.ones(stored.shape[0]), stored.shape[1], method._layer_seed(index))
    torch.testing.assert_close(eps, 0.1 * stored.abs() * unit, rtol=1e-5, atol=1e-8)
    assert (eps == 0).sum() == (stored == 0).sum()  # zero where the weight is zero: entry-wise, not row RMS
