"""Every method on a diffusers ``UNet2DConditionModel`` whose LoRA was added with diffusers' own
``add_adapter`` (no ``PeftModel``), as diffusers' training scripts do: the contract (frozen weights,
small strength), the same noise and timestep in both passes of a two-pass method, and the LoRA file
round trip through ``save_lora_weights`` / ``load_lora_weights``. Skipped without diffusers.

Parametrised over the registry and the contract tests' variants: no per-method branches.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import flatpeft
from helpers import assert_bit_identical, defaults_for, frozen_state, run_backward
from test_contract import VARIANTS, _relative_gap

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import text_to_image_lora as t2i

# Attention projections (diffusers' scripts) and the ResNet convolutions (filter-wise Conv2d rows).
TARGETS = [*t2i.LORA_TARGETS, "conv1", "conv2"]


@pytest.fixture(params=[*flatpeft.list_methods(), *VARIANTS])
def method_spec(request) -> tuple[str, dict]:
    return VARIANTS.get(request.param, (request.param, {}))


def tiny_unet(dtype: torch.dtype = torch.float32, seed: int = 0):
    """The tiny pipeline's UNet, frozen, with LoRA from ``unet.add_adapter`` (B drawn non-zero, seeded)."""
    unet = t2i.tiny_pipeline(seed).unet.to(dtype)
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return unet


class UNetLoss(nn.Module):
    """A user's wrapper: ``model(**batch).loss`` is the ε-prediction MSE of the UNet inside."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, target):
        pred = self.unet(sample, timestep, encoder_hidden_states).sample
        return types.SimpleNamespace(loss=nn.functional.mse_loss(pred, target))


def unet_batch(seed: int = 0, n: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + seed)
    return {
        "sample": torch.randn((n, 4, 8, 8), generator=g, dtype=dtype),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "encoder_hidden_states": torch.randn((n, 16, 32), generator=g, dtype=dtype),
        "target": torch.randn((n, 4, 8, 8), generator=g, dtype=dtype),
    }


def _train(model, name: str, options: dict, steps: int = 3, dtype=torch.float32, attach_to=None):
    method = flatpeft.attach(attach_to or model, name, **defaults_for(name, **options))
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    method.bind(opt)
    for i in range(steps):
        run_backward(method, model, unet_batch(i % 2, dtype=dtype), upper_batch=unet_batch(99, dtype=dtype))
        opt.step()
        opt.zero_grad()
    return method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_bit_identical_on_a_unet(method_spec, dtype):
    name, options = method_spec
    unet = tiny_unet(dtype)
    before = frozen_state(unet)
    lora_before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    method = _train(UNetLoss(unet), name, options, dtype=dtype, attach_to=unet)
    assert unet.active_adapters() == ["default"] and method.adapter == "default"
    assert_bit_identical(before, frozen_state(unet))
    after = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert after.keys() >= lora_before.keys()
    assert any(not torch.equal(after[n], lora_before[n]) for n in lora_before)  # it trained


def test_small_strength_on_a_unet_approaches_plain_backward(method_spec):
    """The contract test's small-strength check (see test_contract) on the UNet, fp64, through a user's
    wrapper module around it (the method finds the UNet's LoRA layers and ``peft_config`` inside). The
    first-order constant may reach 100 here (lora_sam measured 14.8 on this UNet, 1.2-9.3 the others);
    the gap must still shrink exactly linearly with the strength."""
    name, options = method_spec
    model_fn = lambda dtype: UNetLoss(tiny_unet(dtype))  # noqa: E731
    batch_fn = lambda seed: unet_batch(seed, dtype=torch.float64)  # noqa: E731
    if not flatpeft.get_method(name).config_class.strength_fields():
        assert _relative_gap(name, options, 0.0, model_fn, batch_fn) == 0.0
        return
    coarse, fine = (_relative_gap(name, options, s, model_fn, batch_fn) for s in (1e-6, 1e-7))
    for s, gap in ((1e-6, coarse), (1e-7, fine)):
        assert 0.01 * s <= gap <= 100 * s, (s, gap)
    assert coarse / fine == pytest.approx(10.0, rel=1e-3)


def _seen_inputs(unet):
    """A forward pre-hook recording the (noisy latents, timesteps) every UNet pass is given."""
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    return seen, handle


def _redrawing_loss(pipe, unet, pixels, ids, g):
    """The mistake the example avoids: noise and timesteps drawn INSIDE the closure."""
    return lambda: t2i.micro_batch_loss(pipe, unet, pixels, ids, g)()


@pytest.mark.parametrize("make_loss", [t2i.micro_batch_loss, _redrawing_loss], ids=["example", "redraws"])
def test_two_pass_methods_see_the_same_noise_and_timestep(method_name, make_loss):
    """Every pass of one ``backward`` evaluates the UNet on the same noisy latents and timesteps when the
    loss closure is the example's (drawn once per micro-batch); the closure that redraws them inside
    gives a two-pass method different ones: the control shows the check can fail."""
    if make_loss is _redrawing_loss and flatpeft.get_method(method_name).passes == 1:
        pytest.skip("one pass per backward: a redrawing closure is harmless")
    pipe = t2i.tiny_pipeline()
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=t2i.LORA_TARGETS))
    method = flatpeft.attach(pipe.unet, method_name, **defaults_for(method_name))
    method.step = 5
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer("a photo", padding="max_length", max_length=16, return_tensors="pt").input_ids
    loss_fn = make_loss(pipe, pipe.unet, t2i.generated_images(2, 16, 0), ids, g)
    seen, handle = _seen_inputs(pipe.unet)
    upper = {"upper_loss_fn": loss_fn} if method.needs_upper_loss else {}
    method.backward(loss_fn, **upper)
    handle.remove()
    assert len(seen) >= method.passes
    redraws = any(not (torch.equal(s[0], seen[0][0]) and torch.equal(s[1], seen[0][1])) for s in seen[1:])
    assert redraws == (make_loss is _redrawing_loss)


def test_saved_lora_loads_into_a_fresh_pipeline(method_spec, tmp_path):
    """After training, the user's adapter alone is exported (``get_peft_model_state_dict``), written by
    ``save_lora_weights``, and ``load_lora_weights`` on a fresh pipeline reproduces the trained UNet."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    name, options = method_spec
    pipe = t2i.tiny_pipeline()
    unet = pipe.unet
    unet.requires_grad_(False)
    # Attention projections only: diffusers 0.42's load_lora_weights loads a file that also holds the
    # ResNet convolutions' LoRA into only some of the layers (seen with plain LoRA, no method attached).
    unet.add_adapter(
        peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=t2i.LORA_TARGETS)
    )
    method = _train(UNetLoss(unet), name, options, attach_to=unet)
    exported = peft.get_peft_model_state_dict(unet, adapter_name=method.adapter)
    assert exported and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in exported)
    assert len(exported) == 2 * len(method.layers)  # A and B of each of the user's layers, nothing else
    method.detach()
    assert list(unet.peft_config) == ["default"] and unet.active_adapters() == ["default"]
    lora = convert_state_dict_to_diffusers(exported)
    metadata = unet.peft_config[method.adapter].to_dict()  # lora_alpha != r must reach the loader
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=lora, unet_lora_adapter_metadata=metadata
    )

    fresh = t2i.tiny_pipeline()
    fresh.load_lora_weights(tmp_path)
    batch = unet_batch(7)
    with torch.no_grad():
        want = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"]).sample
        got = fresh.unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"]).sample
        unet.disable_adapters()
        base = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"]).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base, want, atol=1e-4)  # the LoRA changed the output: the check has teeth


def test_aux_adapter_keeps_the_users_active_adapter_and_leaves_no_trace():
    """Bi-LoRA's auxiliary adapter goes in through PEFT's injection API next to the ACTIVE adapter of a
    UNet carrying two; outside backward only that adapter runs; detaching removes the auxiliary
    adapter everywhere and leaves both user adapters as they were."""
    unet = tiny_unet()
    unet.add_adapter(
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=t2i.LORA_TARGETS), adapter_name="style"
    )
    unet.set_adapter("style")
    adapters = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    method = flatpeft.attach(unet, "bi_lora", rho=0.05)
    assert method.adapter == "style" and unet.active_adapters() == ["style"]
    assert sorted(unet.peft_config) == sorted(["default", "style", method.aux_name])
    assert all(layer.active_adapters == ["style"] for layer in method.aux_layers)
    styled = [m for m in unet.modules() if hasattr(m, "lora_A") and "style" in m.lora_A]
    assert method.aux_layers == styled and len(styled) == 32  # q, k, v, out of 8 attention modules
    exported = peft.get_peft_model_state_dict(unet, adapter_name="style")
    assert not any(method.aux_name in k for k in exported)
    method.backward(lambda: UNetLoss(unet)(**unet_batch()).loss)
    method.detach()
    assert sorted(unet.peft_config) == ["default", "style"] and unet.active_adapters() == ["style"]
    after = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert after.keys() == adapters.keys()
    assert all(torch.equal(after[n], adapters[n]) for n in adapters)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags


# -- bad input ---------------------------------------------------------------------------------------


def test_a_unet_without_lora_is_refused_naming_add_adapter():
    unet = t2i.tiny_pipeline().unet
    with pytest.raises(TypeError, match=r"add_adapter\(peft\.LoraConfig"):
        flatpeft.attach(unet, "flat_lora", total_steps=3)


def test_a_unet_with_disabled_lora_is_refused():
    unet = tiny_unet()
    unet.disable_adapters()
    with pytest.raises(ValueError, match=r"disabled.*enable_adapters\(\)"):
        flatpeft.attach(unet, "lora")
    unet.enable_adapters()
    flatpeft.attach(unet, "lora").detach()


def test_two_active_adapters_are_refused_naming_set_adapter():
    unet = tiny_unet()
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=t2i.LORA_TARGETS), adapter_name="style")
    unet.set_adapters(["default", "style"])
    with pytest.raises(ValueError, match=r"exactly one active adapter.*set_adapter"):
        flatpeft.attach(unet, "lora")


def test_a_method_that_cannot_run_on_the_module_says_so_at_attach():
    """A convolution with string padding has no filter-wise geometry: the methods that perturb the base
    weight refuse it when attached (before any step), naming the fix; plain LoRA runs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 3, 3, padding="same")

        def forward(self, x):
            return types.SimpleNamespace(loss=self.conv(x).square().mean())

    torch.manual_seed(0)
    net = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["conv"]), Net())
    with pytest.raises(ValueError, match=r"padding='same'.*exclude the layer from LoraConfig.target_modules"):
        flatpeft.attach(net, "flat_lora", total_steps=3)
    method = flatpeft.attach(net, "lora")
    method.backward(lambda: net(torch.randn(1, 2, 4, 4, 4)).loss)
    assert net.conv.lora_A["default"].weight.grad is not None


def test_sharpness_measures_a_unet_and_leaves_it_bit_identical():
    """``flatpeft.sharpness`` takes the UNet itself (LoRA from ``add_adapter``): every adapted layer's
    effective weight is perturbed (the loss moves), the estimate is finite, and no stored weight moved."""
    unet = tiny_unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    loss = lambda m, b: UNetLoss(m)(**b).loss  # noqa: E731
    result = flatpeft.expected_sharpness(unet, loss, [unet_batch(0)], sigma=0.5, n_samples=4, progress=False)
    samples = torch.tensor(result.samples)
    assert torch.isfinite(samples).all() and samples.abs().min() > 0
    assert result.details["tensors"] == sum(1 for m in unet.modules() if hasattr(m, "lora_A"))  # 48
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
