"""What LLM users run, on one process: activation checkpointing and quantized (bitsandbytes 4-bit NF4
and 8-bit) bases, for every registered method. Sharding (FSDP2) is in test_fsdp.py."""

from __future__ import annotations

import pytest
import torch

import flatpeft
from helpers import defaults_for, lm_batch, tiny_llama, with_lora

STEPS = 3


def _train(model, name: str, steps: int = STEPS, **overrides):
    method = flatpeft.attach(model, name, **defaults_for(name, total_steps=steps + 1, **overrides))
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    method.bind(optimizer)
    losses = []
    for step in range(steps):
        batch, upper = lm_batch(step), lm_batch(50 + step)
        extra = {"upper_loss_fn": lambda u=upper: model(**u).loss} if method.needs_upper_loss else {}
        losses.append(float(method.backward(lambda b=batch: model(**b).loss, **extra)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return method, losses


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# -- activation checkpointing ------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_adapter(method_name, reentrant):
    plain = tiny_llama()
    _train(plain, method_name)
    base = tiny_llama(base_only=True)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    checkpointed = with_lora(base)
    checkpointed.train()
    assert checkpointed.base_model.model.model.gradient_checkpointing
    recomputed = []
    block = checkpointed.base_model.model.model.layers[0].mlp
    block.register_forward_pre_hook(lambda *_: recomputed.append(torch.is_grad_enabled()))
    _train(checkpointed, method_name)
    assert len(recomputed) > STEPS  # the block ran again in backward: checkpointing was on
    ref, got = _adapter(plain), _adapter(checkpointed)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


# -- quantized bases (bitsandbytes runs 4-bit and 8-bit layers on CPU) -------------------------------

bnb = pytest.importorskip("bitsandbytes")
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(base_only=True, hidden=64).save_pretrained(path)
    return path


def _quantized(base_dir, kind: str):
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**QUANT[kind]))
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = with_lora(base)
    model.train()  # bitsandbytes repacks 4-bit weights (lossily) on an eval-mode CPU forward
    return model


def _quantized_weights(model) -> dict[str, torch.Tensor]:
    """The dequantized weight of every quantized layer (bitsandbytes repacks 4-bit storage for the CPU
    on its first forward, so the stored bytes are not the invariant; the weight they encode is)."""
    from flatpeft import _peft

    return {
        name: _peft.dequantized(layer).clone()
        for name, layer in model.named_modules()
        if isinstance(layer, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
    }


@pytest.mark.parametrize("kind", list(QUANT))
def test_quantized_base_trains(base_dir, method_name, kind):
    model = _quantized(base_dir, kind)
    if flatpeft.get_method(method_name).needs_dense_base:
        with pytest.raises(ValueError, match=r"dense base weights.*quantized"):
            flatpeft.attach(model, method_name, **defaults_for(method_name))
        return
    frozen, before = _quantized_weights(model), _adapter(model)
    assert frozen  # the base really is quantized
    _, losses = _train(model, method_name)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = _adapter(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in _quantized_weights(model).items():
        assert torch.equal(frozen[k], v), f"{k} changed"


@pytest.mark.parametrize("kind", list(QUANT))
def test_flat_lora_on_a_quantized_base_is_the_dense_computation_on_its_dequantized_weight(base_dir, kind):
    """Noisy forward and gradients on the quantized base equal those of a dense model holding the
    dequantized weights (same LoRA factors, same seed): base(x) + x·εᵀ is x·(W + ε)ᵀ."""
    from transformers import LlamaForCausalLM

    from flatpeft import _peft

    quantized = _quantized(base_dir, kind)
    dense_base = LlamaForCausalLM.from_pretrained(base_dir)
    modules = dict(dense_base.named_modules())
    for name, layer in quantized.base_model.model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            modules[name.replace(".base_layer", "")].weight.data.copy_(_peft.dequantized(layer).float())
    dense = with_lora(dense_base)
    assert not dense.load_state_dict(_adapter(quantized), strict=False).unexpected_keys
    batch = lm_batch(3)
    results = []
    for model in (quantized, dense):
        method = flatpeft.attach(model, "flat_lora", sigma=0.2, schedule="constant", seed=7)
        method.after_step()  # any step but 0: the noise of step 1
        loss = method.backward(lambda m=model: m(**batch).loss)
        plain = float(model(**batch).loss)
        results.append(
            (
                float(loss),
                plain,
                {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            )
        )
        method.detach()
    (q_loss, q_plain, q_grads), (d_loss, _, d_grads) = results
    assert abs(q_loss - q_plain) > 1e-4  # the noise is really there
    assert q_loss == pytest.approx(d_loss, rel=1e-5)
    assert q_grads.keys() == d_grads.keys() and q_grads
    for k in d_grads:
        torch.testing.assert_close(q_grads[k], d_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_dequantized_weight_survives_bitsandbytes_cpu_repacking(base_dir):
    """An eval-mode CPU forward repacks 4-bit weights for bitsandbytes' AVX512-BF16 kernels (absmax
    rounded to bf16); the dequantized weight flat_lora reads must keep its layout."""
    from flatpeft import _peft

    model = _quantized(base_dir, "nf4")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    before = _peft.dequantized(layer).float()
    model.eval()
    with torch.no_grad():
        model(**lm_batch(0))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16 kernels: bitsandbytes did not repack")
    after = _peft.dequantized(layer).float()
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-3)  # same layout; bf16-rounded scales
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # the layer is left packed
