"""``flatpeft train --lr-scheduler {linear,cosine,constant}``: after the warm-up the learning rate
follows Transformers' curve of that name (the Trainer's ``lr_scheduler_type``), step by step; the
warm-up and the default (linear) are what they were before the option existed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import get_scheduler

from flatpeft import train as train_lib

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR = 10, 0.01


def expected(kind: str, step: int, warmup: float) -> float:
    """The factor of the peak lr after ``step`` optimizer steps, written out from the definitions."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / (STEPS - warmup)
    return {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[kind]


@pytest.fixture
def small_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"w{i % 5} v{i % 2}", "label": i % 2} for i in range(24)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup, warmup_steps", [(3, 3.0), (0.15, 1.5), (0, 0.0)])  # fraction of 10 steps
def test_the_lr_curve_follows_the_named_schedule(tmp_path, small_jsonl, kind, warmup, warmup_steps):
    options = {"model": "tiny", "data": small_jsonl, "out": str(tmp_path / "run"), "max_steps": STEPS}
    options |= {"batch_size": 4, "lr": LR, "warmup": warmup, "lr_scheduler": kind, "log_every": 1}
    options |= {"checkpoint_every": 0, "progress": False, "test_size": 0.25, "val_size": 0}
    train_lib.train(options)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = [entry["lr"] for entry in log if "lr" in entry]  # after step 1, 2, ..., STEPS
    want = [LR * expected(kind, s, warmup_steps) for s in range(1, STEPS + 1)]
    assert lrs == pytest.approx(want, abs=1e-12)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["lr_scheduler"] == kind


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_after_the_warm_up_the_curve_is_transformers_own(kind):
    """Against ``transformers.get_scheduler`` itself, bit for bit, from the end of the warm-up on."""
    warmup, total = 4, 37
    theirs = get_scheduler(
        "constant_with_warmup" if kind == "constant" else kind,
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
        num_warmup_steps=warmup,
        num_training_steps=total,
    ).lr_lambdas[0]
    cfg = train_lib.TrainConfig(warmup=warmup, lr_scheduler=kind)
    ours = train_lib.lr_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), total)
    ours = ours.lr_lambdas[0]
    assert [ours(s) for s in range(warmup, total + 3)] == [theirs(s) for s in range(warmup, total + 3)]
    assert [ours(s) for s in range(warmup)] == [(s + 1) / (warmup + 1) for s in range(warmup)]  # not 0


def test_the_default_stays_linear_and_an_unknown_schedule_is_refused(tmp_path, small_jsonl):
    assert train_lib.TrainConfig().lr_scheduler == "linear"
    options = {"model": "tiny", "data": small_jsonl, "out": str(tmp_path / "r"), "lr_scheduler": "step"}
    with pytest.raises(ValueError, match="lr_scheduler must be linear, cosine or constant, got 'step'"):
        train_lib.train(options)
    assert not (tmp_path / "r").exists()
