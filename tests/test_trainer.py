"""FlatTrainer / FlatTrainerMixin, run for every registered method on tiny models."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import flatpeft
from flatpeft.integrations.transformers import METHOD_STATE_NAME
from helpers import assert_bit_identical, frozen_state, make_batch, tiny_bert, tiny_gpt2, trainable_state


def _dataset(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    batch = make_batch(seed, n=n)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _args(out, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.01,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_runs_every_method(method_name, tmp_path):
    model = tiny_bert()
    frozen = frozen_state(model)
    before = trainable_state(model)
    trainer = flatpeft.FlatTrainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(), method=method_name
    )
    trainer.train()
    method = trainer.flat_method
    assert method.step == 4  # optimizer steps, not micro-batches (gradient_accumulation_steps=2)
    if "total_steps" in {f for f, *_ in method.config.describe()}:
        assert method.config.total_steps == 4
    assert_bit_identical(frozen, frozen_state(model))
    after = trainable_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for key in method.strength():
        assert all(key in h for h in logged)

    # The saved adapter is the primary one only, and vanilla PEFT reproduces the trained model.
    trainer.save_model(str(tmp_path / "final"))
    assert not [d for d in os.listdir(tmp_path / "final") if os.path.isdir(tmp_path / "final" / d)]
    model.eval()
    batch = make_batch(9)
    with torch.no_grad():
        expected = model(**batch).logits
    loaded = peft.PeftModel.from_pretrained(tiny_bert(base_only=True), str(tmp_path / "final")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_trainer_weight_decay_groups(tmp_path):
    model = tiny_bert()
    trainer = flatpeft.FlatTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), method="lora")
    trainer.create_optimizer()
    no_decay = {
        id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]
    }
    for name, p in model.named_parameters():
        if p.requires_grad and name.endswith("bias"):
            assert id(p) in no_decay, name
    n_opt = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    assert n_opt == len(trainer.flat_method.parameters())


def test_trainer_resume_is_exact(tmp_path):
    def make(out, max_steps):
        model = tiny_bert()
        args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=3)
        method_config = {"sigma": 0.1, "total_steps": 6}
        return model, flatpeft.FlatTrainer(
            model=model, args=args, train_dataset=_dataset(), method="flat_lora", method_config=method_config
        )

    ref_model, ref = make(tmp_path / "ref", 6)
    ref.train()
    ckpt = tmp_path / "ref" / "checkpoint-3"
    assert (ckpt / METHOD_STATE_NAME).is_file()
    state = torch.load(ckpt / METHOD_STATE_NAME, weights_only=False)
    assert state["step"] == 3 and state["config"]["total_steps"] == 6

    model, resumed = make(tmp_path / "ref", 6)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.flat_method.step == 6
    assert_bit_identical(trainable_state(ref_model), trainable_state(model))


def test_trainer_total_steps_from_epochs(tmp_path):
    model = tiny_bert()
    args = _args(tmp_path, max_steps=-1, num_train_epochs=2)  # 32 examples / (4 x 2) = 4 steps/epoch
    trainer = flatpeft.FlatTrainer(model=model, args=args, train_dataset=_dataset(), method="flat_lora")
    trainer.train()
    assert trainer.flat_method.config.total_steps == 8
    assert trainer.flat_method.step == 8
    assert trainer.state.log_history[-2]["sigma"] == pytest.approx(
        0.05 * 0.5 * (1 - torch.cos(torch.tensor(torch.pi * 7 / 8)).item())
    )


def test_mixin_composes_with_another_trainer_subclass(tmp_path):
    calls = []

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(1)
            return super().compute_loss(model, inputs, *args, **kwargs)

    class FlatCounting(flatpeft.FlatTrainerMixin, CountingTrainer):
        pass

    trainer = FlatCounting(
        model=tiny_bert(), args=_args(tmp_path), train_dataset=_dataset(), method="lora_sam"
    )
    trainer.train()
    assert len(calls) == 4 * 2 * 2  # steps x micro-batches x passes


@pytest.mark.parametrize("method", ["flat_lora", "lora_sam", "sam_full"])
def test_trainer_gpt2_fan_in_fan_out(method, tmp_path):
    model = tiny_gpt2()
    frozen = frozen_state(model)
    ids = make_batch(0, n=16)["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = flatpeft.FlatTrainer(model=model, args=_args(tmp_path), train_dataset=data, method=method)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert_bit_identical(frozen, frozen_state(model))


def test_trainer_dora(method_name, tmp_path):
    model = tiny_bert(use_dora=True)
    frozen = frozen_state(model)
    trainer = flatpeft.FlatTrainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(), method=method_name
    )
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert_bit_identical(frozen, frozen_state(model))


def test_lora_through_flat_trainer_equals_plain_trainer(tmp_path):
    # Same loss scaling, gradient accumulation and optimizer as the stock Trainer, bit for bit.
    plain_model, flat_model = tiny_bert(), tiny_bert()
    Trainer(model=plain_model, args=_args(tmp_path / "a"), train_dataset=_dataset()).train()
    flatpeft.FlatTrainer(
        model=flat_model, args=_args(tmp_path / "b"), train_dataset=_dataset(), method="lora"
    ).train()
    assert_bit_identical(trainable_state(plain_model), trainable_state(flat_model))


def test_mixin_with_trl_sft_trainer(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[j] for j in torch.randint(0, 60, (10,), generator=g)) for _ in range(32)]

    class FlatSFTTrainer(flatpeft.FlatTrainerMixin, trl.SFTTrainer):
        pass

    model = tiny_gpt2()
    frozen = frozen_state(model)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, max_length=16, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = FlatSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        method="flat_lora",
    )
    trainer.train()
    assert trainer.flat_method.step == 3 and trainer.flat_method.config.total_steps == 3
    sigmas = [h["sigma"] for h in trainer.state.log_history if "sigma" in h]
    assert sigmas == pytest.approx([0.0, 0.05 * 0.25, 0.05 * 0.75])  # cosine ramp at t = 0, 1, 2 of T = 3
    assert_bit_identical(frozen, frozen_state(model))


def test_method_seed_follows_the_trainer_seed_unless_given(tmp_path):
    """Different Trainer seeds must give different method randomness (noise, auxiliary start, split)."""
    from transformers import TrainingArguments

    def trainer(method="flat_lora", **kwargs):
        args = TrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=7, max_steps=1
        )
        return flatpeft.FlatTrainer(
            model=tiny_bert(), args=args, train_dataset=_dataset(), method=method, **kwargs
        )

    t = trainer()
    assert t.flat_config.seed == 7
    t.create_optimizer()
    assert t.flat_method.config.seed == 7
    assert trainer(method_config={"seed": 3}).flat_config.seed == 3  # an explicit seed wins
    assert trainer(method=flatpeft.make_config("flat_lora", seed=5, total_steps=4)).flat_config.seed == 5
