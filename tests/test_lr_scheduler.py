"""``flatpeft train --lr-scheduler {linear,cosine,constant}``: after the linear warm-up the learning
rate follows Transformers' curve of that name (the Trainer's ``lr_scheduler_type``), step by step."""

from __future__ import annotations

import json
import math

import pytest

from flatpeft import train as train_lib

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR = 10, 0.01


def expected(kind: str, step: int, warmup: int) -> float:
    """The factor of the peak lr after ``step`` optimizer steps, written out from the definitions."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (STEPS - warmup)
    return {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[kind]


@pytest.fixture
def small_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"w{i % 5} v{i % 2}", "label": i % 2}) + "\n" for i in range(24))
    )
    return str(path)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup, warmup_steps", [(3, 3), (0.15, 2), (0, 0)])  # a fraction rounds up
def test_the_lr_curve_follows_the_named_schedule(tmp_path, small_jsonl, kind, warmup, warmup_steps):
    options = {"model": "tiny", "data": small_jsonl, "out": str(tmp_path / "run"), "max_steps": STEPS}
    options |= {"batch_size": 4, "lr": LR, "warmup": warmup, "lr_scheduler": kind, "log_every": 1}
    options |= {"checkpoint_every": 0, "progress": False, "test_size": 0.25, "val_size": 0}
    train_lib.train(options)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = [entry["lr"] for entry in log if "lr" in entry]  # after step 1, 2, ..., STEPS
    assert lrs == pytest.approx(
        [LR * expected(kind, s, warmup_steps) for s in range(1, STEPS + 1)], abs=1e-12
    )
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["lr_scheduler"] == kind


def test_the_default_stays_linear_and_an_unknown_schedule_is_refused(tmp_path, small_jsonl):
    assert train_lib.TrainConfig().lr_scheduler == "linear"
    with pytest.raises(ValueError, match="lr_scheduler must be linear, cosine or constant, got 'step'"):
        train_lib.train(
            {"model": "tiny", "data": small_jsonl, "out": str(tmp_path / "r"), "lr_scheduler": "step"}
        )
    assert not (tmp_path / "r").exists()
