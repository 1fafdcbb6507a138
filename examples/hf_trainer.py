"""Flat-LoRA with the Hugging Face Trainer: swap ``Trainer`` for ``flatpeft.FlatTrainer``.

    python examples/hf_trainer.py [--method flat_lora] [--max-steps 40]

Runs offline on a tiny randomly initialised BERT and a synthetic task. T (total optimizer steps) is
read from the Trainer; gradient accumulation, AMP and ``accelerator.backward`` work as usual;
checkpoints also hold the method state so ``trainer.train(resume_from_checkpoint=...)`` is exact.
With TRL: ``class FlatSFTTrainer(flatpeft.FlatTrainerMixin, trl.SFTTrainer): pass``.
"""

import argparse

import peft
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import flatpeft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="flat_lora", choices=flatpeft.list_methods())
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=3)  # fmt: skip
    ids = torch.randint(1, 100, (256, 16))
    train = [{"input_ids": row, "labels": row[0] % 3} for row in ids]
    model = peft.get_peft_model(
        BertForSequenceClassification(config),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    trainer = flatpeft.FlatTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
        ),
        train_dataset=train,
        method=args.method,
        method_config={},  # e.g. {"sigma": 0.1} for flat_lora, {"rho": 0.05} for bi_lora
    )
    trainer.train()  # logs the current σ/ρ next to the loss
    trainer.save_model(args.out)  # the primary adapter only: vanilla PeftModel.from_pretrained loads it


if __name__ == "__main__":
    main()
