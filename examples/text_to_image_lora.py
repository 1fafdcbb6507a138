"""Text-to-image LoRA (DreamBooth style) on a diffusers pipeline with Accelerate and a flatpeft method.

    python examples/text_to_image_lora.py --smoke                    # tiny random pipeline, 2 steps
    python examples/text_to_image_lora.py --tiny --method flat_lora --steps 20
    python examples/text_to_image_lora.py --pretrained-model runwayml/stable-diffusion-v1-5 \\
        --images my_subject/ --prompt "a photo of sks dog" --mixed-precision bf16 --grad-accum 2

LoRA goes on the UNet's attention projections with ``unet.add_adapter`` (as diffusers' own training
scripts do: no ``PeftModel`` wrapper), the method attaches to the UNet, and each micro-batch's
latents, noise, timesteps and text embeddings are drawn ONCE, outside the loss closure, so every pass
of a two-pass method (``lora_sam``, ``fm_lora``, ``sam_full``) sees the same noise and timestep. The
LoRA file is written with the pipeline's ``save_lora_weights``; ``--tiny`` then loads it into a fresh
pipeline with ``load_lora_weights`` and checks that it reproduces the trained UNet.

``--tiny`` builds every component from configs (as diffusers' own tests do; the CLIP tokenizer from a
hand-written character vocabulary) and trains on a few generated images: no download. A real model
(``--pretrained-model``, a Stable Diffusion 1.x/2.x folder or Hub name) needs the network once.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import peft
import torch
import torch.nn.functional as F

import flatpeft

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def tiny_tokenizer(folder: Path):
    """A CLIP tokenizer over single printable ASCII characters (no merges), written to ``folder``."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {
        t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])
    }
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_pipeline(seed: int = 0):
    """A random Stable-Diffusion-style pipeline built from configs (the sizes of diffusers' own tests)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_tokenizer(Path(folder))
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=16,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def generated_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` images in [-1, 1]: a bright square on a dark background at random places (the "subject")."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), -0.8)
    for i in range(n):
        x, y = torch.randint(0, size // 2, (2,), generator=g).tolist()
        images[i, :, y : y + size // 2, x : x + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return images


def folder_images(folder: Path, size: int) -> torch.Tensor:
    """The images of ``folder`` (png/jpg), resized and center-cropped to ``size``, in [-1, 1]."""
    from PIL import Image
    from torchvision import transforms

    prep = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(0.5, 0.5),
        ]
    )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no .png/.jpg images in {folder}")
    return torch.stack([prep(Image.open(p).convert("RGB")) for p in files])


def micro_batch_loss(pipe, unet, pixels: torch.Tensor, ids: torch.Tensor, g: torch.Generator):
    """The loss closure of one micro-batch. Everything random (the latents' sample, the noise, the
    timesteps) and the text embeddings are drawn HERE, once, not inside the closure: a two-pass method
    calls the closure twice and must see the same noisy latents and timesteps both times."""
    vae, scheduler = pipe.vae, pipe.scheduler
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(g) * vae.config.scaling_factor
        text = pipe.text_encoder(ids.expand(len(pixels), -1))[0]
    noise = torch.randn(latents.shape, generator=g).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=g)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)

    def loss_fn() -> torch.Tensor:
        pred = unet(noisy, timesteps, text).sample
        return F.mse_loss(pred.float(), target.float())

    return loss_fn


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--pretrained-model", help="a Stable Diffusion folder or Hub name (needs the network once)"
    )
    source.add_argument("--tiny", action="store_true", help="a random tiny pipeline from configs (offline)")
    parser.add_argument("--smoke", action="store_true", help="--tiny with 2 steps (what the test suite runs)")
    single_split = [m for m in flatpeft.list_methods() if not flatpeft.get_method(m).needs_upper_loss]
    parser.add_argument("--method", default="flat_lora", choices=single_split)
    parser.add_argument(
        "--images",
        type=Path,
        help="folder of subject images (needs Pillow and torchvision; default: generated squares)",
    )
    parser.add_argument("--prompt", default="a photo of sks square")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (real model), 16 (tiny)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/text_to_image_lora"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.steps = True, 2
    if not args.tiny and not args.pretrained_model:
        parser.error("name a model with --pretrained-model, or use --tiny / --smoke offline")
    if min(args.steps, args.batch_size, args.grad_accum, args.rank) < 1:
        parser.error("--steps, --batch-size, --grad-accum and --rank must be at least 1")
    return args


def main(argv=None) -> float | None:
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum
    )
    if args.tiny:
        pipe = tiny_pipeline(args.seed)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model, safety_checker=None)
    size = args.resolution or (16 if args.tiny else 512)
    images = folder_images(args.images, size) if args.images else generated_images(8, size, args.seed)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    device = accelerator.device
    vae.to(device)
    text_encoder.to(device)
    ids = pipe.tokenizer(
        args.prompt,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)

    # --- flatpeft: LoRA as diffusers' scripts add it, then attach a method ---------------------------
    unet.add_adapter(
        peft.LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    )
    method = flatpeft.attach(unet, args.method, total_steps=args.steps)  # before building the optimizer
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=1e-2), lr=args.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    method.bind(optimizer)  # Accelerate-aware: runs after each real optimizer step
    # -------------------------------------------------------------------------------------------------

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    unet.train()
    for step in range(args.steps):
        for _ in range(args.grad_accum):
            with accelerator.accumulate(unet):
                pick = torch.randint(0, len(images), (args.batch_size,), generator=g)
                loss_fn = micro_batch_loss(pipe, unet, images[pick].to(device), ids, g)
                loss = method.backward(loss_fn, backward_fn=accelerator.backward)  # not accelerator.backward
                optimizer.step()
                optimizer.zero_grad()
        if accelerator.is_main_process and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  {method.strength()}")

    unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)  # no autocast wrapper left on forward
    method.detach()  # auxiliary adapters (Bi-LoRA) are gone; only the user's adapter remains
    lora = convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(unet, adapter_name=method.adapter))
    metadata = unet.peft_config[method.adapter].to_dict()  # r, lora_alpha, targets: what the loader needs
    StableDiffusionPipeline.save_lora_weights(
        args.out, unet_lora_layers=lora, unet_lora_adapter_metadata=metadata
    )
    print(f"{method.step} optimizer steps; LoRA written to {args.out}")
    if not args.tiny:
        return None
    # The file loads into a fresh pipeline (same random base) and reproduces the trained UNet.
    fresh = tiny_pipeline(args.seed)
    fresh.load_lora_weights(args.out)
    x = torch.randn((1, 4, size // 2, size // 2), generator=g)
    t, text = torch.tensor([500]), torch.randn((1, ids.shape[1], 32), generator=g)
    with torch.no_grad():
        gap = float((fresh.unet(x, t, text).sample - unet.to("cpu").float()(x, t, text).sample).abs().max())
    print(f"reloaded with load_lora_weights: max |difference| {gap:.2e}")
    if not math.isfinite(gap) or gap > 1e-5:
        raise SystemExit("the reloaded LoRA does not reproduce the trained UNet")
    return gap


if __name__ == "__main__":
    main()
