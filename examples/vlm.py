"""A vision-language model with ``flatpeft.FlatTrainer``: LoRA on the language model (and, with
``--projector``, the multimodal projector), the vision tower frozen.

    python examples/vlm.py --smoke                           # tiny random LLaVA-style model, 2 steps
    python examples/vlm.py --method eflat_lora --max-steps 40 --projector

The model is a ``LlavaForConditionalGeneration`` built from configs (a 2-layer CLIP vision tower, a
2-layer LLaMA language model, offline); the task is synthetic: the answer token names the colour of
the image. Every batch carries ``pixel_values``; the adapter is saved as a stock PEFT adapter that
``PeftModel.from_pretrained`` loads. For a real model (e.g. ``llava-hf/llava-1.5-7b-hf`` or
Qwen2-VL), load it with its processor and keep ``target_modules`` on the language model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import peft
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    TrainingArguments,
)

import flatpeft

VOCAB, IMAGE_TOKEN, IMAGE_SIZE, PATCH = 64, 63, 16, 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # one per patch ("default" strategy drops the CLS token)
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r"|.*multi_modal_projector\.linear_[12]"


def tiny_vlm(seed: int = 0) -> LlavaForConditionalGeneration:
    """A random LLaVA-style model from configs: CLIP vision tower → 2-layer MLP projector → LLaMA."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def with_lora(model, rank: int = 8, projector: bool = False) -> peft.PeftModel:
    """LoRA on the language model's linear layers (and the projector's), everything else frozen."""
    targets = LANGUAGE_TARGETS + (PROJECTOR_TARGETS if projector else "")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def vlm_examples(n: int, seed: int = 0, length: int = 6) -> list[dict[str, torch.Tensor]]:
    """``n`` examples: an image of one colour, the image tokens, a prompt, and the answer token (the
    colour's index) as the only label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        colour = int(torch.randint(0, 3, (), generator=g))
        pixels = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), -1.0)
        pixels[colour] = 1.0
        pixels += 0.1 * torch.randn(pixels.shape, generator=g)
        prompt = torch.randint(3, IMAGE_TOKEN, (length,), generator=g)
        ids = torch.cat([torch.full((IMAGE_TOKENS,), IMAGE_TOKEN), prompt, torch.tensor([colour])])
        labels = torch.full_like(ids, -100)
        labels[-1] = colour
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "pixel_values": pixels,
                "labels": labels,
            }
        )
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="flat_lora", choices=flatpeft.list_methods())
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--projector", action="store_true", help="also LoRA on the multimodal projector")
    parser.add_argument("--smoke", action="store_true", help="2 steps (what the test suite runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/vlm"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_steps = 2

    model = with_lora(tiny_vlm(), projector=args.projector)
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    trainer = flatpeft.FlatTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.out),
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            remove_unused_columns=False,
        ),
        train_dataset=vlm_examples(64),
        method=args.method,
    )
    trainer.train()
    trainer.save_model(str(args.out))  # the primary adapter only: vanilla PeftModel.from_pretrained loads it
    unchanged = all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if "vision_tower" in n)
    print(f"vision tower bit-identical: {unchanged}")
    if not unchanged:
        raise SystemExit("the vision tower changed")
    return args.out


if __name__ == "__main__":
    main()
