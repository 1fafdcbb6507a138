"""``flatpeft train`` for large models, on CPU with the tiny LLaMA: ``--precision``,
``--gradient-checkpointing``, ``--load-in-4bit``/``--load-in-8bit`` (bitsandbytes), ``--fsdp`` (FSDP2 on
2 gloo ranks under torchrun), exact resume with each, and the checks that refuse bad combinations
before anything is written.

Two torchrun launches run every FSDP2 job: this file is the worker (``torchrun tests/test_train_scale.py
JOBS.json``), running several ``flatpeft train`` command lines in one process group and recording each
exit code, so that a method failing under FSDP2 fails its own test only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback

import peft
import pytest
import torch
from safetensors.torch import load_file

import flatpeft
from flatpeft import _scale, cli
from flatpeft import compare as compare_lib
from flatpeft import train as train_lib
from flatpeft.models import load_model
from helpers import exit_worker, torchrun_argv

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"model": "tiny", "task": "causal-lm", "max_steps": 4, "batch_size": 8, "lr": 0.01, "rank": 4}
OPTIONS |= {"checkpoint_every": 2, "log_every": 1, "progress": False}
LLM_SCALE = ["--fsdp", "--precision", "bf16", "--gradient-checkpointing"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> str:
    # Responses of one length: each rank's per-token mean loss then weighs like one process's.
    rows = [{"prompt": f"say {w}", "response": f" {w}!"} for w in ["yes", "now", "hey", "you"] * 10]
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def options(data, out, **overrides):
    return OPTIONS | {"data": data, "out": str(out)} | overrides


def argv(data, out, *flags: str) -> list[str]:
    base = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items() if k != "progress"]
    return ["train", *base, "--no-progress", "--data", data, "--out", str(out), *flags]


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def cut_at_step_2(run, to):
    """A copy of the run folder as it was after its step-2 checkpoint (for --resume)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "adapter")
    (to / "metrics.json").unlink()
    for later in (to / "checkpoints").glob("step-*"):  # the last step's checkpoint too
        if int(later.name.split("-")[1]) > 2:
            shutil.rmtree(later)
    return to


def assert_same_adapter(a, b, **tolerance):
    assert a.keys() == b.keys()
    for k in a:
        if tolerance:
            torch.testing.assert_close(b[k], a[k], msg=k, **tolerance)
        else:
            assert torch.equal(a[k], b[k]), k


# -- precision ---------------------------------------------------------------------------------------


def test_bf16_with_gradient_checkpointing_completes_and_records_the_flags(sft, tmp_path):
    out = tmp_path / "run"
    assert cli.main(argv(sft, out, "--precision", "bf16", "--gradient-checkpointing")) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["gradient_checkpointing"] is True
    assert not (config["load_in_4bit"] or config["load_in_8bit"] or config["fsdp"])
    state = torch.load(out / "checkpoints" / "step-2" / "state.pt", weights_only=False)
    assert {t.dtype for t in state["trainable"].values()} == {torch.float32}  # fp32 master weights
    assert {t.dtype for t in adapter(out).values()} == {torch.float32}
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_bf16_stores_frozen_weights_in_bf16_trains_fp32_and_keeps_them_bit_identical(
    method_name, task, sft, tmp_path
):
    if task == "classification":
        from test_train import make_csv

        data = make_csv(tmp_path / "small.csv")
    else:
        data = sft
    cfg = train_lib.resolve(options(data, tmp_path / "run", task=task, method=method_name, precision="bf16"))
    run = train_lib.prepare(cfg)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    trainable = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert {p.dtype for p in trainable} == {torch.float32}  # adapters, auxiliary adapters, a new head
    for step in range(2):
        batch = run.batch(run.splits.train[8 * step : 8 * step + 8])
        extra = {"upper_loss_fn": train_lib._loss_fn(run, batch, 1.0)} if run.method.needs_upper_loss else {}
        loss = run.method.backward(train_lib._loss_fn(run, batch, 1.0), **extra)
        assert torch.isfinite(loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
    for n, p in run.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# -- activation checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_blocks_in_train_mode(sft, tmp_path, reentrant):
    counts = {}
    for checkpointing in (False, True):
        flags = {"gradient_checkpointing": checkpointing}
        flags["gradient_checkpointing_reentrant"] = reentrant and checkpointing
        run = train_lib.prepare(train_lib.resolve(options(sft, tmp_path / "run", **flags)))
        assert run.model.training
        mlp = run.model.get_base_model().model.layers[0].mlp
        calls = []
        mlp.forward = lambda *a, calls=calls, forward=mlp.forward, **k: calls.append(1) or forward(*a, **k)
        batch = run.batch(run.splits.train[:8])
        run.method.backward(train_lib._loss_fn(run, batch, 1.0))
        counts[checkpointing] = len(calls)
    assert counts == {False: 1, True: 2}  # the block's forward runs again in backward


def test_gradient_checkpointing_gives_the_same_adapter(method_name, sft, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train_lib.train(options(sft, plain, method=method_name, max_steps=3, checkpoint_every=0))
    train_lib.train(
        options(
            sft,
            checkpointed,
            method=method_name,
            max_steps=3,
            checkpoint_every=0,
            gradient_checkpointing=True,
        )
    )
    assert_same_adapter(adapter(plain), adapter(checkpointed), rtol=1e-5, atol=1e-7)


def test_reentrant_gradient_checkpointing_gives_the_same_adapter(sft, tmp_path):
    for method in ("lora", "lora_sam"):  # one pass, and two passes (the first through autograd.grad)
        plain, checkpointed = tmp_path / f"{method}-plain", tmp_path / f"{method}-reentrant"
        train_lib.train(options(sft, plain, method=method, max_steps=3, checkpoint_every=0))
        flags = {"gradient_checkpointing": True, "gradient_checkpointing_reentrant": True}
        train_lib.train(options(sft, checkpointed, method=method, max_steps=3, checkpoint_every=0, **flags))
        assert_same_adapter(adapter(plain), adapter(checkpointed), rtol=1e-5, atol=1e-7)


# -- fp16 and the grad scaler -----------------------------------------------------------------------


def test_fp16_skips_an_overflowing_step_and_resumes_exactly(sft, tmp_path, monkeypatch):
    forward, calls = train_lib._forward_loss, {"n": 0}

    def overflow_first(model, batch):  # a finite loss whose scaled fp16 gradients overflow
        calls["n"] += 1
        loss = forward(model, batch)
        return loss * 1e6 if calls["n"] == 1 else loss

    monkeypatch.setattr(train_lib, "_forward_loss", overflow_first)
    out = tmp_path / "run"
    metrics = train_lib.train(options(sft, out, method="flat_lora", precision="fp16"))
    assert metrics["skipped_steps"] == [1]
    entries = log(out)
    assert entries[0]["skipped"] and entries[0]["loss_scale"] == 2.0**15  # halved from 2**16
    assert all("skipped" not in e and e["loss_scale"] == 2.0**15 for e in entries[1:])
    state = torch.load(out / "checkpoints" / "step-2" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0**15
    assert state["method"]["step"] == 1  # the skipped step ran no optimizer step, so no post-step hook
    assert state["scheduler"]["last_epoch"] == 1  # nor an LR-schedule step

    resumed = cut_at_step_2(out, tmp_path / "resumed")
    train_lib.train({"out": str(resumed), "resume": True, "progress": False})
    assert_same_adapter(adapter(out), adapter(resumed))
    assert log(resumed) == entries  # the loss scale too: the scaler's state was restored


def test_precision_step_reports_a_skipped_step_and_leaves_the_weights():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    hooks = []
    optimizer.register_step_post_hook(lambda *_: hooks.append(1))
    precision = _scale.Precision("fp16", torch.device("cpu"), sharded=False)
    precision.backward_fn((weight * 2).sum())
    assert torch.equal(weight.grad, torch.full((3,), 2.0 * 2**16))  # scaled
    precision.unscale(optimizer)
    assert torch.equal(weight.grad, torch.full((3,), 2.0))
    assert precision.step(optimizer) and hooks == [1]
    weight.grad = torch.tensor([1.0, float("inf"), 1.0])
    before = weight.detach().clone()
    assert not precision.step(optimizer) and hooks == [1]
    assert torch.equal(weight, before) and precision.state_dict()["scale"] == 2.0**15


# -- quantized bases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_a_quantized_base_trains_with_every_method_that_can(flag, method_name, sft, tmp_path, capsys):
    """Every method trains a QLoRA / 8-bit base, or refuses it with a clear error, writing nothing."""
    out = tmp_path / "run"
    code = cli.main(argv(sft, out, flag, "--method", method_name))
    if code == 2:
        assert "quantized" in capsys.readouterr().err and not out.exists()
        return
    assert code == 0
    assert json.loads((out / "config.json").read_text())["config"][flag[2:].replace("-", "_")]
    model = peft.PeftModel.from_pretrained(load_model("tiny", "causal-lm", seed=0)[0], out / "adapter")
    assert model.peft_config["default"].r == 4  # a stock adapter, loaded on the dense base


@pytest.mark.parametrize("bits", [4, 8])
def test_the_base_is_quantized_and_its_weights_stay_bit_identical(bits, sft, tmp_path):
    import bitsandbytes as bnb

    cfg = train_lib.resolve(
        options(sft, tmp_path / "run", method="flat_lora", **{f"load_in_{bits}bit": True})
    )
    run = train_lib.prepare(cfg)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, layer) for m in run.model.modules()) == 14  # 7 linear layers per block
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    for step in range(2):
        batch = run.batch(run.splits.train[8 * step : 8 * step + 8])
        run.method.backward(train_lib._loss_fn(run, batch, 1.0))
        run.optimizer.step()
        run.optimizer.zero_grad()
        train_lib.evaluate(run, run.splits.val)  # eval mode too (bitsandbytes may repack for inference)
    for n, p in run.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_classifier_keeps_its_new_head_dense_and_trains(bits, tmp_path):
    from test_train import make_csv

    data, out = make_csv(tmp_path / "small.csv"), tmp_path / "run"
    cfg = train_lib.resolve(options(data, out, task="classification", **{f"load_in_{bits}bit": True}))
    run = train_lib.prepare(cfg)
    head = run.model.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and head.weight.requires_grad
    train_lib.train(cfg)
    assert peft.PeftModel.from_pretrained(load_model("tiny", "classification", 3)[0], out / "adapter")


def test_sam_full_refuses_a_quantized_base_and_writes_nothing(sft, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(argv(sft, out, "--load-in-4bit", "--method", "sam_full")) == 2
    assert "sam_full needs dense base weights" in capsys.readouterr().err
    assert not out.exists()


# -- bad input writes nothing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit exclude each other"),
        (["--fsdp", "--load-in-4bit"], "--fsdp cannot shard bitsandbytes layers"),
        (["--fsdp"], "launch with `torchrun --nproc_per_node N -m flatpeft train ... --fsdp`"),
        (["--gradient-checkpointing-reentrant"], "needs --gradient-checkpointing"),
        (["--method", "full", "--load-in-8bit"], "--method full trains every weight"),
    ],
)
def test_conflicting_flags_write_nothing(flags, message, sft, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert cli.main(argv(sft, out, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_missing_bitsandbytes_names_the_extra(flag, sft, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    out = tmp_path / "run"
    assert cli.main(argv(sft, out, flag)) == 2
    assert f"{flag} needs bitsandbytes" in (err := capsys.readouterr().err)
    assert "pip install 'flatpeft[quant]'" in err
    assert not out.exists()


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or fp16"):
        train_lib.TrainConfig.from_dict({"precision": "fp8"})
    with pytest.raises(SystemExit):  # argparse lists the choices
        cli.main(["train", "--precision", "fp8"])


def test_compare_passes_the_flags_to_every_run(sft, tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(
        compare_lib, "_launch_torchrun", lambda f, n: launched.append((json.loads(f.read_text()), n))
    )
    args = [
        "compare",
        "--data",
        sft,
        "--task",
        "causal-lm",
        "--model",
        "tiny",
        "--methods",
        "lora",
        "flat_lora",
    ]
    args += ["--seeds", "0", "--out", str(tmp_path / "cmp"), "--no-progress", *LLM_SCALE]
    assert cli.main(args) == 2  # --fsdp needs several processes per run
    assert "--fsdp shards the model" in capsys.readouterr().err and not (tmp_path / "cmp").exists()

    assert cli.main([*args, "--nproc", "2"]) == 1  # every (captured) run "failed": nothing to tabulate
    assert [n for _, n in launched] == [2, 2]
    for config, _ in launched:
        assert config["fsdp"] and config["gradient_checkpointing"] and config["precision"] == "bf16"


# -- FSDP2 under torchrun ------------------------------------------------------------------------------


def _run_jobs(folder, jobs: dict[str, list[str]]) -> dict[str, list[int | str]]:
    """Run ``{name: flatpeft argv}`` on 2 ranks in one torchrun launch; ``{name: [code rank 0, rank 1]}``."""
    path = folder / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*torchrun_argv(), os.path.abspath(__file__), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    (folder / "stderr.txt").write_text(proc.stderr)  # every job's traceback, for a failing test
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((folder / f"results-rank{r}.json").read_text()) for r in range(2)]
    return {name: [results[0][name], results[1][name]] for name in jobs}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, sft):
    """Every method with --fsdp --precision bf16 --gradient-checkpointing; lora in fp32 (to compare
    with one process) and in fp16 (the sharded grad scaler); and a 4-bit base under DDP."""
    out = tmp_path_factory.mktemp("fsdp")
    jobs = {m: argv(sft, out / m, *LLM_SCALE, "--method", m) for m in flatpeft.list_methods()}
    jobs["lora-fp32"] = argv(sft, out / "lora-fp32", "--fsdp")
    jobs["lora-fp16"] = argv(sft, out / "lora-fp16", "--fsdp", "--precision", "fp16")
    jobs["ddp-4bit"] = argv(sft, out / "ddp-4bit", "--load-in-4bit", "--method", "flat_lora")  # QLoRA + DDP
    return out, _run_jobs(out, jobs)


@pytest.fixture(scope="module")
def fsdp_resumed(fsdp_runs, tmp_path_factory):
    """The runs of ``fsdp_runs`` that completed, cut back to their step-2 checkpoint and resumed."""
    runs, codes = fsdp_runs
    out = tmp_path_factory.mktemp("fsdp-resumed")
    jobs = {}
    for name, code in codes.items():
        if code == [0, 0]:
            cut_at_step_2(runs / name, out / name)
            jobs[name] = ["train", "--resume", "--out", str(out / name), "--no-progress"]
    return out, _run_jobs(out, jobs)


@pytest.mark.parametrize("method", flatpeft.list_methods())
def test_fsdp_writes_one_run_folder_with_a_stock_adapter(method, fsdp_runs, sft, tmp_path):
    runs, codes = fsdp_runs
    assert codes[method] == [0, 0], codes[method]
    out = runs / method
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",  # the run's claim on its folder
        "adapter",
        "checkpoints",
        "config.json",
        "log.jsonl",
        "metrics.json",
        "predictions.jsonl",  # answers generated by the sharded model (every rank steps in sync)
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["config"]["fsdp"]
    assert [e["step"] for e in log(out)] == [1, 2, 3, 4]
    checkpoint = out / "checkpoints" / "step-2"
    assert (checkpoint / "state.pt").is_file() and (checkpoint / "sharded" / ".metadata").is_file()

    # Vanilla PEFT loads the gathered adapter onto the bf16 base and scores what the sharded run scored.
    metrics = json.loads((out / "metrics.json").read_text())
    run = train_lib.prepare(train_lib.resolve(options(sft, tmp_path / "unused", precision="bf16")))
    base = load_model("tiny", "causal-lm", seed=0)[0].to(torch.bfloat16)
    run.model = peft.PeftModel.from_pretrained(base, out / "adapter")
    assert train_lib.evaluate(run, run.splits.test)["loss"] == pytest.approx(
        metrics["test"]["loss"], rel=1e-5
    )


@pytest.mark.parametrize("method", flatpeft.list_methods())
def test_fsdp_resume_reproduces_the_uninterrupted_run(method, fsdp_runs, fsdp_resumed):
    runs, _ = fsdp_runs
    resumed, codes = fsdp_resumed
    assert codes.get(method) == [0, 0], codes.get(method)
    assert_same_adapter(adapter(runs / method), adapter(resumed / method))
    assert log(resumed / method) == log(runs / method)


def test_fsdp_on_two_ranks_equals_one_process(fsdp_runs, sft, tmp_path):
    runs, codes = fsdp_runs
    assert codes["lora-fp32"] == [0, 0]
    train_lib.train(options(sft, tmp_path / "single"))
    assert_same_adapter(adapter(tmp_path / "single"), adapter(runs / "lora-fp32"), rtol=1e-4, atol=1e-5)
    single = [e["loss"] for e in log(tmp_path / "single")]
    assert [e["loss"] for e in log(runs / "lora-fp32")] == pytest.approx(single, rel=1e-5)


def test_fsdp_fp16_uses_the_sharded_grad_scaler_and_resumes(fsdp_runs, fsdp_resumed):
    runs, codes = fsdp_runs
    assert codes["lora-fp16"] == [0, 0]
    assert all(e["loss_scale"] == 2.0**16 for e in log(runs / "lora-fp16"))
    resumed, codes = fsdp_resumed
    assert codes["lora-fp16"] == [0, 0]
    assert_same_adapter(adapter(runs / "lora-fp16"), adapter(resumed / "lora-fp16"))


def test_a_4bit_base_trains_data_parallel_and_resumes(fsdp_runs, fsdp_resumed):
    runs, codes = fsdp_runs
    assert codes["ddp-4bit"] == [0, 0]  # every rank loads its own quantized copy of the tiny model
    assert json.loads((runs / "ddp-4bit" / "config.json").read_text())["world_size"] == 2
    resumed, codes = fsdp_resumed
    assert codes["ddp-4bit"] == [0, 0]
    assert_same_adapter(adapter(runs / "ddp-4bit"), adapter(resumed / "ddp-4bit"))


# -- the worker (run by torchrun) -----------------------------------------------------------------------


def _worker(jobs_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # train() joins it and leaves it running
    rank = dist.get_rank()
    with open(jobs_file) as f:
        jobs = json.load(f)
    results: dict[str, int | str] = {}
    for name, job_argv in jobs.items():
        try:
            results[name] = cli.main(job_argv)
        except Exception as e:  # the same on both ranks: record it and go on with the next job
            traceback.print_exc()
            results[name] = f"{type(e).__name__}: {e}"
        dist.barrier()
    with open(os.path.join(os.path.dirname(jobs_file), f"results-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1])
    exit_worker()
