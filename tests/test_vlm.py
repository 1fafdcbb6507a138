"""Every method on a tiny LLaVA-style vision-language model through ``FlatTrainer``: LoRA on the
language model and the projector, batches with ``pixel_values``, the vision tower bit-identical
after training, and the saved adapter loaded by vanilla PEFT reproduces the trained model."""

from __future__ import annotations

import sys
from pathlib import Path

import peft
import pytest
import torch
from transformers import TrainingArguments

import flatpeft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import vlm


def _train_two_steps(model, method: str, tmp_path) -> flatpeft.FlatTrainer:
    """``FlatTrainer`` with ``method``: 2 optimizer steps of 4 examples (images and tokens), on CPU."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = flatpeft.FlatTrainer(model=model, args=args, train_dataset=vlm.vlm_examples(16), method=method)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", flatpeft.list_methods())
def test_every_method_trains_a_vlm_through_flat_trainer(method, tmp_path):
    model = vlm.with_lora(vlm.tiny_vlm(), rank=4, projector=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("vision_tower" in n for n in frozen)
    assert any("multi_modal_projector" in n and "lora_A" in n for n, _ in model.named_parameters())
    trainer = _train_two_steps(model, method, tmp_path)
    assert trainer.flat_method.step == 2
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # vision tower, language model, embeddings, head
    trainer.save_model(str(tmp_path / "adapter"))

    batch = {
        k: torch.stack([e[k] for e in vlm.vlm_examples(2, seed=5)]) for k in ("input_ids", "pixel_values")
    }
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
        loaded = peft.PeftModel.from_pretrained(vlm.tiny_vlm(), str(tmp_path / "adapter")).eval()
        got = loaded(**batch).logits
        plain = vlm.tiny_vlm().eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapter changed the model


def test_flat_trainer_on_a_vlm_with_injected_lora(tmp_path):
    """No ``PeftModel``: LoRA injected with ``peft.inject_adapter_in_model``; Bi-LoRA's auxiliary adapter
    rides along through training and the exported state dict holds the user's adapter only."""
    model = vlm.tiny_vlm()
    model.requires_grad_(False)
    peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=vlm.LANGUAGE_TARGETS), model
    )
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    trainer = _train_two_steps(model, "bi_lora", tmp_path)
    method = trainer.flat_method
    assert method.step == 2 and list(model.peft_config) == ["default", method.aux_name]
    exported = peft.get_peft_model_state_dict(model, adapter_name=method.adapter)
    assert len(exported) == 2 * len(method.layers) == 2 * 2 * 7  # A, B of 7 projections in 2 layers
    assert all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if "vision_tower" in n)
