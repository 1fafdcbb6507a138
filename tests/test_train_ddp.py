"""``flatpeft train`` under torchrun: 2 CPU ranks (gloo) write one complete run folder for every method,
equal a 1-process run on the same flags (lora, flat_lora), resume exactly and stop together on NaN.

Three torchrun launches: the real ``-m flatpeft train`` for lora, and this file as a worker
(``torchrun tests/test_train_ddp.py JOBS.json``) that runs several ``flatpeft train`` command lines in
one process group, so every method does not pay for its own launch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import peft
import pytest
import torch
from safetensors.torch import load_file

import flatpeft
from flatpeft import train as train_lib
from flatpeft.models import load_model
from helpers import exit_worker, torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = [*flatpeft.list_methods(), train_lib.FULL]
OPTIONS = {"max_steps": 4, "batch_size": 8, "grad_accum": 2, "lr": 0.01, "rank": 4, "checkpoint_every": 2}
OPTIONS |= {"log_every": 1}


def _run_jobs(folder, jobs: list[dict]) -> None:
    """Run ``jobs`` (``{"argv": [...], "expect": exit code, "nan_at": call on rank 1}``) on 2 ranks."""
    fd, path = tempfile.mkstemp(prefix="jobs-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(jobs, f)
    torchrun(os.path.abspath(__file__), path)


def _train_argv(data, out, method, model="tiny") -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    return [
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        str(out),
        "--method",
        method,
        *flags,
        "--no-progress",
    ]


def _single(data, out, method, model) -> dict[str, torch.Tensor]:
    """The same run in this one process."""
    run = {"model": model, "data": data, "out": str(out), "method": method, "progress": False}
    train_lib.train(OPTIONS | run)
    return _adapter(out)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_train import make_csv

    return make_csv(tmp_path_factory.mktemp("data") / "small.csv")


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> str:
    """The tiny model saved without dropout, so that 2 ranks can equal 1 process exactly."""
    folder = tmp_path_factory.mktemp("model") / "tiny-no-dropout"
    model, tokenizer = load_model("tiny", "classification", num_labels=3, seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, no_dropout_model):
    """Every method (with dropout), flat_lora without dropout, and lora with a NaN on rank 1."""
    out = tmp_path_factory.mktemp("ddp-runs")
    jobs = [{"argv": _train_argv(data, out / m, m)} for m in METHODS]
    jobs.append({"argv": _train_argv(data, out / "flat_lora-exact", "flat_lora", no_dropout_model)})
    jobs.append({"argv": _train_argv(data, out / "nan", "lora"), "expect": 1, "nan_at": 5})
    _run_jobs(out, jobs)
    return out


def test_every_method_writes_one_complete_run_folder(runs, data):
    base, _ = load_model("tiny", "classification", num_labels=3, seed=0)
    for method in METHODS:
        out = runs / method
        weights = "model" if method == train_lib.FULL else "adapter"
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [".lock", weights, "checkpoints", "config.json", "log.jsonl", "metrics.json"]
        ), method
        config = json.loads((out / "config.json").read_text())
        assert config["world_size"] == 2 and config["total_steps"] == 4, method
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 4 and metrics["world_size"] == 2, method
        assert set(metrics["test"]) == {"loss", "accuracy", "macro_f1", "n"}, method
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == [1, 2, 3, 4], method  # one writer: no duplicate lines
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"], method
        state = torch.load(out / "checkpoints" / "step-2" / "state.pt", weights_only=False)
        assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2, method
        if method != train_lib.FULL:  # vanilla PEFT loads the adapter
            model = peft.PeftModel.from_pretrained(base, out / "adapter")
            assert model.peft_config["default"].r == 4
            base = model.unload()


def test_nan_on_one_rank_stops_both_and_keeps_the_last_checkpoint(runs):
    out = runs / "nan"  # the worker checked that both ranks exited with code 1 (and did not hang)
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]


def test_flat_lora_on_two_ranks_equals_one_process(runs, data, no_dropout_model, tmp_path):
    single = _single(data, tmp_path / "single", "flat_lora", no_dropout_model)
    ranked = _adapter(runs / "flat_lora-exact")
    assert single.keys() == ranked.keys()
    for k in single:
        torch.testing.assert_close(ranked[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    assert _losses(runs / "flat_lora-exact") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)


def test_lora_with_torchrun_m_flatpeft_train_equals_one_process(data, no_dropout_model, tmp_path):
    torchrun("-m", "flatpeft", *_train_argv(data, tmp_path / "ddp", "lora", no_dropout_model))
    single = _single(data, tmp_path / "single", "lora", no_dropout_model)
    ranked = _adapter(tmp_path / "ddp")
    assert single.keys() == ranked.keys()
    for k in single:
        torch.testing.assert_close(ranked[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)


def test_resume_under_torchrun_equals_the_uninterrupted_run(runs, tmp_path):
    """Every method, with dropout (per-rank RNG streams): drop everything after the step-2 checkpoint."""
    jobs = []
    for method in METHODS:
        cut = tmp_path / method
        shutil.copytree(runs / method, cut)
        shutil.rmtree(cut / ("model" if method == train_lib.FULL else "adapter"))
        shutil.rmtree(cut / "checkpoints" / "step-4")  # the last step's checkpoint
        (cut / "metrics.json").unlink()
        jobs.append({"argv": ["train", "--resume", "--out", str(cut), "--no-progress"]})
    _run_jobs(tmp_path, jobs)
    for method in METHODS:
        if method == train_lib.FULL:
            full = load_file(runs / method / "model" / "model.safetensors")
            resumed = load_file(tmp_path / method / "model" / "model.safetensors")
        else:
            full, resumed = _adapter(runs / method), _adapter(tmp_path / method)
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full), method
        log_full = (runs / method / "log.jsonl").read_text()
        assert (tmp_path / method / "log.jsonl").read_text() == log_full, method


# -- the worker (run by torchrun) ------------------------------------------------------------------


def _nan_on_rank_1(forward, rank: int, at: int | None):
    """``forward`` whose ``at``-th call on rank 1 returns NaN."""
    calls = {"n": 0}

    def nan_loss(model, batch):
        calls["n"] += 1
        loss = forward(model, batch)
        return loss * float("nan") if rank == 1 and calls["n"] == at else loss

    return nan_loss


def _worker(jobs_file: str) -> None:
    import torch.distributed as dist

    from flatpeft import cli

    dist.init_process_group("gloo")  # train() joins it and leaves it running
    rank = dist.get_rank()
    forward = train_lib._forward_loss
    with open(jobs_file) as f:
        jobs = json.load(f)
    failures = []
    for job in jobs:
        train_lib._forward_loss = _nan_on_rank_1(forward, rank, job.get("nan_at"))
        code = cli.main(job["argv"])
        if code != job.get("expect", 0):
            failures.append(f"rank {rank}: {job['argv']} exited with {code}")
    train_lib._forward_loss = forward
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1])
    exit_worker()
