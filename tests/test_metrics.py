"""Evaluation numbers against hand-computed values: macro-F1 and accuracy (classification), loss, token
accuracy and perplexity (causal-LM) from a model with known outputs, and the ``val`` and ``--eval-data``
blocks of ``metrics.json`` recomputed from the saved adapter."""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import peft
import pytest
import torch

from flatpeft import train as train_lib
from flatpeft._evaluate import evaluate, macro_f1
from flatpeft.data import Example, load_examples, load_splits
from flatpeft.models import load_model
from test_train import make_csv  # the 3-class word CSV of the train tests

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("truth", "preds", "expected"),
    [
        # class 0: tp 1, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 1, fn 1 -> 2/3
        ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2], (1 / 2 + 4 / 5 + 2 / 3) / 3),
        # class 2 is only predicted: F1 0 and it counts; class 0: 2/3, class 1: tp 2 -> 1
        ([0, 0, 1, 1], [0, 2, 1, 1], (2 / 3 + 1 + 0) / 3),
        ([1, 1, 1], [1, 1, 1], 1.0),  # one class, all right
        ([0, 1], [1, 0], 0.0),  # every prediction wrong
        # unbalanced: class 0: tp 3, fp 1, fn 1 -> 6/8; class 1: tp 0 -> 0 (macro: not weighted by support)
        ([0, 0, 0, 0, 1], [0, 0, 0, 1, 0], (6 / 8 + 0) / 2),
    ],
)
def test_macro_f1_against_hand_computed_values(truth, preds, expected):
    assert macro_f1(truth, preds) == pytest.approx(expected, rel=1e-12)


class KnownOutputs(torch.nn.Module):
    """A "model" whose logits for example ``i`` are the fixed tensor ``table[i]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _run(task: str, table: torch.Tensor, labels: list) -> SimpleNamespace:
    """The parts of a ``flatpeft train`` run that ``evaluate`` reads; batches of 2 (the set of 5 ends
    with a partial batch)."""

    def batch(examples: list[Example]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[int(e.text)] for e in examples])
        return {
            "input_ids": ids,
            "labels": torch.stack([torch.as_tensor(labels[int(e.text)]) for e in examples]),
        }

    cfg = SimpleNamespace(task=task, eval_batch_size=2, max_new_tokens=0)
    precision = SimpleNamespace(autocast=contextlib.nullcontext)
    return SimpleNamespace(model=KnownOutputs(table), cfg=cfg, batch=batch, precision=precision)


def test_classification_loss_accuracy_and_macro_f1_of_known_logits():
    logits = torch.tensor(
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]
    )
    labels = [0, 1, 2, 2, 2]  # predictions 0, 1, 1, 0, 2: right, right, wrong, wrong, right
    out = evaluate(_run("classification", logits, labels), [Example(str(i), labels[i]) for i in range(5)])
    log_softmax = torch.log_softmax(logits.double(), -1)
    loss = -sum(float(log_softmax[i, c]) for i, c in enumerate(labels)) / 5
    assert out["n"] == 5 and out["loss"] == pytest.approx(loss, rel=1e-6)
    assert out["accuracy"] == pytest.approx(3 / 5)
    # class 0: tp 1, fp 1 -> 2/3; class 1: tp 1, fp 1 -> 2/3; class 2: tp 1, fn 2 -> 2/4
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)


def test_causal_lm_loss_token_accuracy_and_perplexity_of_known_logits():
    vocab, length = 4, 4
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, length, vocab, generator=gen)
    labels = torch.randint(0, vocab, (5, length), generator=gen)
    labels[:, :2] = -100  # the prompt: no loss
    labels[4, 3] = -100  # padding
    out = evaluate(_run("causal-lm", logits, labels), [Example(str(i)) for i in range(5)])
    # Position t predicts token t + 1: every (example, t) whose next label is not -100, by hand.
    nll, hits, count = 0.0, 0, 0
    for i in range(5):
        for t in range(length - 1):
            target = int(labels[i, t + 1])
            if target == -100:
                continue
            row = logits[i, t].double()
            nll -= float(row[target] - torch.logsumexp(row, 0))
            hits += int(int(row.argmax()) == target)
            count += 1
    assert count == 9 and out["n"] == 5
    assert out["loss"] == pytest.approx(nll / count, rel=1e-6)
    assert out["token_accuracy"] == pytest.approx(hits / count)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-6)


def _scores(model, tokenizer, examples: list[Example]) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of the loaded adapter, counted here from the logits."""
    batch = tokenizer([e.text for e in examples], padding=True, return_tensors="pt")
    truth = torch.tensor([e.label for e in examples])
    with torch.no_grad():
        logits = model(**batch).logits
    preds = logits.argmax(-1)
    f1 = []
    for c in sorted(set(truth.tolist()) | set(preds.tolist())):
        tp = int(((preds == c) & (truth == c)).sum())
        wrong = int(((preds == c) ^ (truth == c)).sum())  # false positives and false negatives
        f1.append(2 * tp / (2 * tp + wrong))
    return {
        "loss": float(torch.nn.functional.cross_entropy(logits, truth)),
        "accuracy": float((preds == truth).float().mean()),
        "macro_f1": sum(f1) / len(f1),
        "n": len(examples),
    }


def test_val_and_eval_data_blocks_of_metrics_json_hold_the_saved_adapters_numbers(tmp_path):
    data, extra = make_csv(tmp_path / "data.csv", 90, 0), make_csv(tmp_path / "extra.csv", 21, 7)
    out = tmp_path / "run"
    options = {"model": "tiny", "data": data, "out": str(out), "max_steps": 6, "batch_size": 8,
               "lr": 0.05, "rank": 4, "val_size": 0.2, "eval_data": [extra], "checkpoint_every": 0,
               "progress": False}  # fmt: skip
    metrics = train_lib.train(options)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))

    base, tokenizer = load_model("tiny", "classification", num_labels=3, seed=0)
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    splits = load_splits(data, val_size=0.2, eval_data=[extra])
    assert len(splits.val) == 18
    extra_examples = load_examples(extra, labels=splits.labels)[0]
    assert len(extra_examples) == 21
    expected = {
        "val": _scores(model, tokenizer, splits.val),
        "eval": _scores(model, tokenizer, extra_examples),
    }
    assert set(metrics["eval"]) == {extra}
    for block, got in (("val", metrics["val"]), ("eval", metrics["eval"][extra])):
        want = expected[block]
        assert got["n"] == want["n"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6), block
        assert got["accuracy"] == pytest.approx(want["accuracy"]), block
        assert got["macro_f1"] == pytest.approx(want["macro_f1"]), block
