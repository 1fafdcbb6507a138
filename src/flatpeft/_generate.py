"""Generation-based evaluation of causal-LM runs: greedy answers to held-out prompts, scored by exact
match of the normalised answer against the reference response.

The papers behind flatpeft score their LLM fine-tunes by what the model generates (GSM8K accuracy,
HumanEval pass@1, VQA answers), not by token loss; this is the offline analogue for short answers.
Prompts are formatted exactly as in training (:func:`flatpeft.data.prompt_ids`), left-padded into
batches, and decoded greedily until the end-of-sequence token or ``max_new_tokens``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["exact_match", "generate_answers", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a / an / the removed, whitespace collapsed (the
    normalisation of SQuAD's exact-match score): ``" Positive."`` → ``"positive"``."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` and ``reference`` are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def _stop_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The tokenizer's end-of-sequence token and the model's own stop tokens (e.g. an end of turn)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [] if extra is None else [extra]
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy answers to tokenized ``prompts``, decoded without special tokens and stripped.

    Each batch is left-padded with the pad token (masked out), so every prompt's last token sits at the
    same position and the first new token of each row follows its own prompt.

    Args:
        model: A causal LM (a ``PeftModel`` or a Transformers model) in eval mode.
        tokenizer: Its tokenizer (pad and end-of-sequence tokens).
        prompts: Token ids of each prompt, as :func:`flatpeft.data.prompt_ids` makes them.
        max_new_tokens: Most tokens generated per prompt.
        batch_size: Prompts per ``generate`` call.
        device: Where the batches go.
        synced_gpus: Keep sharded (FSDP) ranks stepping together until every rank has finished.

    Returns:
        One answer per prompt, in order: the text up to the first stop token.
    """
    from transformers import GenerationConfig

    stops = _stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=stops or None,
    )
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=config,
            synced_gpus=synced_gpus,
        )
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers
