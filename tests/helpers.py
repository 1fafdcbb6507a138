"""Shared test helpers: tiny randomly initialised models built in the test, no network."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import weakref

import peft
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import flatpeft

VOCAB = 64


def tiny_bert(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
    base_only: bool = False,
    **lora_kwargs,
) -> peft.PeftModel:
    """A 2-layer BERT classifier (hidden 32) with LoRA on every linear layer (or the bare base)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    base = BertForSequenceClassification(cfg).to(dtype)
    if base_only:
        return base
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"], "lora_dropout": dropout}
    kwargs.update(lora_kwargs)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", **kwargs))
    # PEFT starts B at zero; give it a random start so every gradient and perturbation is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def tiny_gpt2(seed: int = 0, **lora_kwargs) -> peft.PeftModel:
    """A 2-layer GPT-2 whose attention uses Conv1D (LoRA with fan_in_fan_out)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    base = GPT2LMHeadModel(cfg)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
    kwargs.update(lora_kwargs)
    return peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base_only: bool = False,
    hidden: int = 32,
    **lora_kwargs,
) -> peft.PeftModel | LlamaForCausalLM:
    """A 2-layer LLaMA with LoRA on every linear layer but the head, B drawn non-zero (bitsandbytes'
    CPU 4-bit kernels need ``hidden >= 64``)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg).to(dtype)
    return base if base_only else with_lora(base, **lora_kwargs)


def with_lora(base, **lora_kwargs) -> peft.PeftModel:
    """``base`` with LoRA (r 4) on every linear layer but the head, B drawn non-zero (seeded)."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    kwargs.update(lora_kwargs)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def lm_batch(seed: int = 0, n: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    """Random token sequences with every token a label (equal lengths: shard means average exactly)."""
    g = torch.Generator().manual_seed(2000 + seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_batch(seed: int = 0, n: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = ids[:, 1] % 3  # a learnable rule: the class is the second token mod 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def defaults_for(name: str, total_steps: int = 10, **overrides) -> dict:
    """Overrides that make every method runnable in a short test: T where the config has one."""
    fields = {f.name for f in dataclasses.fields(flatpeft.get_method(name).config_class)}
    out = {"total_steps": total_steps} if "total_steps" in fields else {}
    out.update(overrides)
    return out


def run_backward(method: flatpeft.Method, model, batch, upper_batch=None):
    """``method.backward`` with the loss closure(s) the method declares it needs."""
    kwargs = {}
    if method.needs_upper_loss:
        upper = upper_batch if upper_batch is not None else make_batch(seed=99)
        kwargs["upper_loss_fn"] = lambda: model(**upper).loss
    return method.backward(lambda: model(**batch).loss, **kwargs)


def assert_passes_released(method: flatpeft.Method, model, steps: int = 2) -> None:
    """Run ``steps`` backward calls whose loss closures assert that every loss computed before is no
    longer referenced (by the method, its graph bookkeeping or its return value)."""
    refs: list[weakref.ref] = []

    def tracked(batch):
        def loss_fn():
            assert all(ref() is None for ref in refs), "an earlier pass's loss is still referenced"
            loss = model(**batch).loss
            refs.append(weakref.ref(loss))
            return loss

        return loss_fn

    for _ in range(steps):
        upper = {"upper_loss_fn": tracked(make_batch(seed=99))} if method.needs_upper_loss else {}
        assert method.backward(tracked(make_batch()), **upper).grad_fn is None
        model.zero_grad(set_to_none=True)
    assert len(refs) >= steps * method.passes


def train(model, name: str, steps: int = 3, lr: float = 1e-2, seed: int = 0, **overrides):
    """Attach ``name``, run ``steps`` AdamW steps on fixed batches, return the method."""
    method = flatpeft.attach(model, name, **defaults_for(name, seed=seed, **overrides))
    opt = torch.optim.AdamW(method.parameters(), lr=lr)
    method.bind(opt)
    for i in range(steps):
        run_backward(method, model, make_batch(i % 2))
        opt.step()
        opt.zero_grad()
    return method


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed"


def torchrun_argv(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N`` on 127.0.0.1 and a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*launcher, "--master_addr", "127.0.0.1", "--master_port", str(port)]


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``args`` on 2 CPU ranks (one thread each, offline); assert every rank succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*torchrun_argv(), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def exit_worker() -> None:
    """End a torchrun worker that finished its work without the interpreter's teardown, as
    ``flatpeft.cli.run`` does (that teardown can abort in a C++ destructor on CPU ranks)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
