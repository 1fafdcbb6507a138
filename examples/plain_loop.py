"""Flat-LoRA in a plain PyTorch loop: the whole API in ten lines (see the marked block).

    python examples/plain_loop.py [--method flat_lora] [--steps 60]

Runs offline on a tiny randomly initialised BERT and a synthetic task (the label is the first token
mod 3); swap in your own model and data loader.
"""

import argparse

import peft
import torch
from transformers import BertConfig, BertForSequenceClassification

import flatpeft


def main() -> None:
    parser = argparse.ArgumentParser()
    single_split = [m for m in flatpeft.list_methods() if not flatpeft.get_method(m).needs_upper_loss]
    parser.add_argument("--method", default="flat_lora", choices=single_split)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=3)  # fmt: skip
    base = BertForSequenceClassification(config)
    ids = torch.randint(1, 100, (256, 16))
    data = [(ids[i : i + 16], ids[i : i + 16, 0] % 3) for i in range(0, 256, 16)]

    # --- flatpeft: the ten lines --------------------------------------------------------------------
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    method = flatpeft.attach(model, args.method, total_steps=args.steps)  # before building the optimizer
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.01), lr=3e-3)
    method.bind(optimizer)  # post-step work (step counter, Bi-LoRA clipping) runs after optimizer.step()
    for step in range(args.steps):
        x, y = data[step % len(data)]
        strength = method.strength()  # e.g. this step's σ_t
        loss = method.backward(lambda x=x, y=y: model(input_ids=x, labels=y).loss)  # not loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}  {strength}")
    method.detach()  # back to a vanilla PeftModel
    model.save_pretrained("runs/plain_loop_adapter")  # a stock PEFT adapter
    # -------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
