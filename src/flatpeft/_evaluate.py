"""Evaluating a ``flatpeft train`` run: loss and accuracy / macro-F1 (classification), token accuracy,
perplexity and generated answers' exact match (causal-LM), and the end-of-run expected sharpness."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._train_config import FULL

if TYPE_CHECKING:
    from . import data as data_lib
    from .train import Run

__all__ = ["evaluate", "macro_f1", "sharpness"]


@torch.no_grad()
def evaluate(
    run: Run, examples: list[data_lib.Example], *, generate: bool = False, samples: list | None = None
) -> dict[str, float]:
    """Loss (and accuracy, macro-F1 for classification; token accuracy, perplexity for causal-LM).

    The model is evaluated in eval mode (no dropout) at its clean weights, under the run's autocast.
    Sharded (``--fsdp``), every rank must call it: each forward all-gathers the weights, so every rank
    evaluates the whole set (the same numbers everywhere).

    Args:
        generate: Causal-LM with ``max_new_tokens`` > 0: also answer each prompt greedily and report
            ``exact_match``, the fraction of answers equal to the response after normalisation.
        samples: A list that receives :data:`SAMPLES` answers spread over the set as
            ``{"prompt", "response", "prediction", "correct"}`` records.
    """
    if not examples:
        return {}
    was_training = run.model.training
    run.model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    truth, preds = [], []
    for start in range(0, len(examples), run.cfg.eval_batch_size):
        batch = run.batch(examples[start : start + run.cfg.eval_batch_size])
        labels = batch.pop("labels")
        with run.precision.autocast():
            logits = run.model(**batch).logits.float()
        if run.cfg.task == "classification":
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
            truth += labels.tolist()
            preds += logits.argmax(-1).tolist()
        else:
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            loss_sum += float(nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
    out = {"loss": loss_sum / max(count, 1), "n": len(examples)}
    if run.cfg.task == "classification":
        out["accuracy"] = sum(t == p for t, p in zip(truth, preds, strict=True)) / len(truth)
        out["macro_f1"] = macro_f1(truth, preds)
    else:
        out["token_accuracy"] = correct / max(count, 1)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        if generate and run.cfg.max_new_tokens:
            out["exact_match"] = _exact_match(run, examples, samples)
    run.model.train(was_training)
    return out


SAMPLES = 25  # answers per evaluation set written to the run folder's predictions.jsonl


def _exact_match(run: Run, examples: list[data_lib.Example], samples: list | None) -> float:
    """Greedy answers to every prompt of ``examples``, scored by normalised exact match."""
    from . import data as data_lib
    from ._generate import exact_match, generate_answers

    chat = data_lib.uses_chat_template(run.tokenizer, run.cfg.chat_template)
    prompts = [data_lib.prompt_ids(run.tokenizer, e.text, chat)[-run.cfg.max_length :] for e in examples]
    with run.precision.autocast():
        answers = generate_answers(
            run.model,
            run.tokenizer,
            prompts,
            max_new_tokens=run.cfg.max_new_tokens,
            batch_size=run.cfg.eval_batch_size,
            device=run.device,
            synced_gpus=run.cfg.fsdp and run.ranks.world > 1,
        )
    hits = [exact_match(a, e.response) for a, e in zip(answers, examples, strict=True)]
    if samples is not None:  # spread over the set (a split may be ordered by class)
        picked = sorted({i * len(examples) // SAMPLES for i in range(SAMPLES)})
        samples += [
            {"prompt": examples[i].text, "response": examples[i].response, "prediction": answers[i]}
            | {"correct": hits[i]}
            for i in picked
        ]
    return sum(hits) / len(hits)


def macro_f1(truth: list[int], preds: list[int]) -> float:
    """Unweighted mean F1 over the classes present in ``truth`` or ``preds``."""
    scores = []
    for c in sorted(set(truth) | set(preds)):
        tp = sum(t == c and p == c for t, p in zip(truth, preds, strict=True))
        fp = sum(t != c and p == c for t, p in zip(truth, preds, strict=True))
        fn = sum(t == c and p != c for t, p in zip(truth, preds, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def sharpness(run: Run) -> dict[str, Any] | None:
    """Expected full-space sharpness of the final adapter on up to 4 test batches, when available
    (not under ``--fsdp``: ``flatpeft sharpness`` measures the saved adapter on one process).

    Every run draws the same noise (seed :data:`NOISE_SEED`, not the run's seed): runs of one
    comparison are measured with common random numbers, so their differences are paired draw by
    draw. The result keeps every draw and the Monte-Carlo standard error. Without a test or
    validation example (``--test-size 0 --val-size 0``) the probe is skipped: the result is
    ``{"skipped": reason}``, which ``metrics.json`` records as ``sharpness_skipped``."""
    try:
        from . import sharpness
    except ImportError:
        return None
    if run.cfg.method == FULL or run.cfg.fsdp:
        return None  # measured on the adapted layers of an unsharded PEFT model
    examples = run.splits.test or run.splits.val
    if not examples:  # the probe measures on held-out data, and there is none: say so, do not fail
        return {"skipped": NO_HELD_OUT}
    size = run.cfg.eval_batch_size
    batches = [run.batch(examples[i : i + size]) for i in range(0, min(len(examples), 4 * size), size)]
    with run.precision.autocast():
        result = sharpness.expected_sharpness(
            run.model,
            None,
            batches,
            sigma=run.cfg.sharpness_sigma,
            n_samples=run.cfg.sharpness_samples,
            space="full",
            seed=NOISE_SEED,
            progress=run.cfg.progress,
        )
    run.model.train()
    return {
        "expected_full": float(result.value),
        "stderr": result.stderr,
        "samples": result.samples,
        "noise_seed": NOISE_SEED,
        "sigma": run.cfg.sharpness_sigma,
        "n_samples": run.cfg.sharpness_samples,
        "n_examples": sum(len(b["labels"]) for b in batches),
    }


NOISE_SEED = 0  # the sharpness probe's noise, the same for every run
NO_HELD_OUT = (
    "no test or validation examples (--test-size 0 --val-size 0): the probe measures on held-out data; "
    "set --test-size or --val-size to measure it"
)
