"""Files and processes (SPEC §6): checkpoints load with weights_only, ``--overwrite`` deletes only after
validation, resume refuses changed data, one writer per run folder, SIGTERM stops with a checkpoint
(also under ``compare``), the last step is checkpointed, strict JSON, and the smaller rules of issue 21."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flatpeft
from flatpeft import _runfolder, _strict_json, cli, compare, models
from flatpeft import train as train_lib
from flatpeft.integrations.transformers import METHOD_STATE_NAME
from helpers import tiny_bert
from test_train import adapter_tensors, make_csv, options, signal_at_micro_batch

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(flatpeft.__file__).resolve().parents[1])


def _crash_at_forward(monkeypatch, n: int) -> None:
    """The n-th training forward raises (a crash mid-run)."""
    calls = {"n": 0}
    forward = train_lib._forward_loss

    def crash(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("power cut")
        return forward(model, batch)

    monkeypatch.setattr(train_lib, "_forward_loss", crash)


def _crashed_run(monkeypatch, data, out, at: int = 3, **overrides) -> None:
    forward = train_lib._forward_loss
    _crash_at_forward(monkeypatch, at)
    with pytest.raises(RuntimeError, match="power cut"):
        train_lib.train(options(data, out, method="lora", **overrides))
    monkeypatch.setattr(train_lib, "_forward_loss", forward)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Payload:
    """Unpickling this runs code that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


# -- 1. checkpoints load with weights_only ------------------------------------------------------------


def test_a_pickle_payload_in_state_pt_is_refused_and_not_run(tmp_path, monkeypatch):
    data, out = make_csv(tmp_path / "d.csv"), tmp_path / "run"
    _crashed_run(monkeypatch, data, out)  # checkpoint at step 2, crash in step 3
    state = out / "checkpoints" / "step-2" / "state.pt"
    real = state.read_bytes()
    marker = tmp_path / "marker"
    torch.save({"step": 2, "history": _Payload(marker)}, state)

    with pytest.raises(ValueError, match=r"state\.pt is not a flatpeft checkpoint that loads safely"):
        train_lib.train({"out": str(out), "resume": True, "progress": False})
    assert not marker.exists()  # the payload never ran

    state.write_bytes(real)  # the real checkpoint resumes
    metrics = train_lib.train({"out": str(out), "resume": True, "progress": False})
    assert metrics["steps"] == 4 and (out / "metrics.json").is_file()


def test_sharded_checkpoint_metadata_is_read_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    from flatpeft._safe_dcp import SafeReader

    saved = {"model": {"w": torch.randn(3, 4), "h": torch.ones(2, dtype=torch.bfloat16)}, "step": 3}
    dcp.save(saved, checkpoint_id=str(tmp_path / "sharded"))  # one process: no process group needed
    loaded = {"model": {"w": torch.zeros(3, 4), "h": torch.zeros(2, dtype=torch.bfloat16)}, "step": 0}
    dcp.load(loaded, storage_reader=SafeReader(tmp_path / "sharded"))
    assert torch.equal(loaded["model"]["w"], saved["model"]["w"]) and loaded["step"] == 3

    marker = tmp_path / "marker"
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"\.metadata is not checkpoint metadata that loads safely"):
        SafeReader(tmp_path / "sharded").read_metadata()
    assert not marker.exists()


# -- 2. compare --overwrite deletes only after validation --------------------------------------------


def _old_comparison(root: Path) -> dict[str, bytes]:
    (root / "runs" / "lora-seed0").mkdir(parents=True)
    (root / compare.MARKER).write_text('{"options": {}}\n')
    (root / "runs" / "lora-seed0" / "metrics.json").write_text('{"test": {"accuracy": 0.5}}\n')
    return _snapshot(root)


@pytest.mark.parametrize(
    "bad",
    [
        ["--methods", "nosuch"],
        ["--methods", "lora", "--data", "missing.csv"],
        ["--methods", "lora", "--resume"],
    ],
    ids=["unknown-method", "missing-data", "with-resume"],
)
def test_compare_overwrite_keeps_the_old_folder_when_the_input_is_bad(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, root = make_csv(tmp_path / "d.csv"), tmp_path / "cmp"
    before = _old_comparison(root)
    args = ["compare", "--model", "tiny", "--data", data, "--seeds", "0", "--out", str(root), "--overwrite"]
    assert cli.main([*args, *bad]) == 2
    assert _snapshot(root) == before


def test_a_second_comparison_in_the_same_folder_is_refused(tmp_path):
    root = tmp_path / "cmp"
    held = _runfolder.RunLock(root)
    held.acquire()
    try:
        with pytest.raises(ValueError, match=r"cmp is in use by another flatpeft process"):
            compare.compare({"model": "tiny", "data": make_csv(tmp_path / "d.csv")}, ["lora"], [0], str(root))
    finally:
        held.release()
    assert [p.name for p in root.iterdir()] == [".lock"]


# -- 3. resume verifies the data, and finds it from any working directory ------------------------------


def test_resume_refuses_changed_data_and_resolves_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_csv(tmp_path / "d.csv")
    out = tmp_path / "run"
    _crashed_run(monkeypatch, "d.csv", out)  # relative --data
    assert json.loads((out / "config.json").read_text())["config"]["data"] == str(tmp_path / "d.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    original = (tmp_path / "d.csv").read_text()
    rows = list(csv.reader(original.splitlines()))
    flip = {"pos": "neg", "neg": "pos", "neu": "neu"}
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *([text, flip[label]] for text, label in rows[1:])])
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"the data .*d\.csv changed since .*run started"):
        train_lib.train({"out": str(out), "resume": True, "progress": False})
    assert _snapshot(out) == before

    (tmp_path / "d.csv").write_text(original)
    assert train_lib.train({"out": str(out), "resume": True, "progress": False})["steps"] == 4


def test_a_relative_eval_data_path_is_recorded_absolute_and_resumes_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_csv(tmp_path / "d.csv")
    make_csv(tmp_path / "extra.csv")
    out = tmp_path / "run"
    _crashed_run(monkeypatch, "d.csv", out, eval_data=["extra.csv"])  # relative --eval-data
    saved = json.loads((out / "config.json").read_text())["config"]["eval_data"]
    assert saved == [str(tmp_path / "extra.csv")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # extra.csv is not reachable by its relative name from here
    assert train_lib.train({"out": str(out), "resume": True, "progress": False})["steps"] == 4


# -- 4. one writer per run folder ----------------------------------------------------------------------


def test_a_second_writer_gets_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    data, out = make_csv(tmp_path / "d.csv"), tmp_path / "run"
    first = _runfolder.RunLock(out)  # another process's claim (flock: one per open file description)
    prepare = train_lib.prepare

    def the_other_run_claims_first(cfg, ranks):  # both saw an empty folder; the other one got there first
        run = prepare(cfg, ranks)
        first.acquire()
        return run

    monkeypatch.setattr(train_lib, "prepare", the_other_run_claims_first)
    message = r"is in use by another flatpeft process \(pid \d+\); wait for it .* or use another --out"
    try:
        with pytest.raises(ValueError, match=message):
            train_lib.train(options(data, out, method="lora"))
        assert [p.name for p in out.iterdir()] == [".lock"]  # this run wrote nothing
    finally:
        first.release()
    monkeypatch.setattr(train_lib, "prepare", prepare)

    # A crashed run resumed twice at once: the second --resume is refused, nothing changes.
    _crashed_run(monkeypatch, data, tmp_path / "crashed")
    before = _snapshot(tmp_path / "crashed")
    held = _runfolder.RunLock(tmp_path / "crashed")
    held.acquire()
    try:
        with pytest.raises(ValueError, match=message):
            train_lib.train({"out": str(tmp_path / "crashed"), "resume": True, "progress": False})
    finally:
        held.release()
    assert _snapshot(tmp_path / "crashed") == before


def test_a_second_process_cannot_claim_a_held_run_folder(tmp_path):
    lock = _runfolder.RunLock(tmp_path / "run")
    lock.acquire()
    try:
        code = (
            "import sys; from flatpeft import _runfolder\n"
            "try:\n    _runfolder.RunLock(sys.argv[1]).acquire()\n"
            "except ValueError as e:\n    print(e); sys.exit(3)\n"
        )
        child = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "run")],
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHONPATH": SRC},
            timeout=120,
        )
    finally:
        lock.release()
    assert child.returncode == 3 and f"pid {os.getpid()}" in child.stdout


# -- 5. SIGTERM finishes the step, checkpoints, exits non-zero; resume is exact ------------------------


def test_sigterm_checkpoints_exits_143_and_resume_is_bit_exact(tmp_path, monkeypatch):
    data = make_csv(tmp_path / "d.csv")
    common = {"method": "flat_lora", "max_steps": 6, "grad_accum": 2, "batch_size": 4, "checkpoint_every": 0}
    train_lib.train(options(data, tmp_path / "full", **common))

    fetch = signal_at_micro_batch(monkeypatch, 4, signal.SIGTERM)  # in step 3 (micro-batches 4, 5)
    cut = tmp_path / "cut"
    config = tmp_path / "cut.json"
    config.write_text(json.dumps(options(data, cut, **common)))
    missed = []  # a handler outside the run (without one, SIGTERM would end pytest itself)

    def outside_handler(signum, frame):
        missed.append(signum)

    previous = signal.signal(signal.SIGTERM, outside_handler)
    try:
        code = cli.main(["train", "--config", str(config)])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not missed and code == 128 + signal.SIGTERM  # the run's own handler took it
    assert restored is outside_handler  # and put the previous one back
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-3"]  # step 3 was finished
    assert not (cut / "adapter").exists()
    monkeypatch.setattr(train_lib.Stream, "__getitem__", fetch)

    train_lib.train({"out": str(cut), "resume": True, "progress": False})
    full, resumed = adapter_tensors(tmp_path / "full"), adapter_tensors(cut)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_compare_passes_sigterm_on_to_its_run_and_waits_for_the_checkpoint(tmp_path):
    data, root = make_csv(tmp_path / "d.csv"), tmp_path / "cmp"
    argv = [
        sys.executable, "-m", "flatpeft", "compare", "--model", "tiny", "--data", data, "--methods", "lora",
        "--seeds", "0", "--out", str(root), "--max-steps", "100000", "--checkpoint-every", "0",
        "--batch-size", "4", "--no-progress",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run, child_pid = root / "runs" / "lora-seed0", None
    try:
        deadline = time.monotonic() + 240
        while not (run / "log.jsonl").exists():  # written once the run is set up and training
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()
            time.sleep(0.2)
        child_pid = int((run / ".lock").read_text())  # the run holds its folder's lock
        time.sleep(1.0)
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=240)
    finally:  # whatever happens, leave nothing running (the run would train 100000 steps)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is None:
            with contextlib.suppress(OSError, ValueError):
                child_pid = int((run / ".lock").read_text())
        if child_pid is not None and parent.returncode != 128 + signal.SIGTERM:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)

    assert parent.returncode == 128 + signal.SIGTERM, err
    assert "stopped with a checkpoint" in err and "--resume" in err
    assert next(p.name for p in (run / "checkpoints").iterdir()).startswith("step-")
    with pytest.raises(ProcessLookupError):  # compare waited for its child: nothing left running
        os.kill(child_pid, 0)


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to its workers: both ranks finish the same step, rank 0 writes one
    checkpoint (loadable with weights_only), and the launch exits non-zero."""
    from helpers import torchrun_argv

    data, out = make_csv(tmp_path / "d.csv"), tmp_path / "ddp"
    argv = [
        *torchrun_argv(), "-m", "flatpeft", "train", "--model", "tiny", "--data", data, "--method", "lora",
        "--out", str(out), "--max-steps", "100000", "--checkpoint-every", "0", "--batch-size", "4",
        "--no-progress",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "log.jsonl").exists():  # written once both ranks are training
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:  # whatever happens, leave no rank running (the run would train 100000 steps)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()

    assert launcher.returncode != 0, err[-3000:]
    stopped = set(re.findall(r"stopped at step (\d+); checkpoint", err))  # what each rank reported
    assert len(stopped) == 1, err[-3000:]
    steps = [p.name for p in (out / "checkpoints").iterdir()]
    assert steps == [f"step-{stopped.pop()}"], steps
    state = _runfolder.load_state(out / "checkpoints" / steps[0] / "state.pt")
    assert state["step"] == int(steps[0].removeprefix("step-"))
    assert not (out / "adapter").exists()


# -- 6. the last step is checkpointed; resuming a finished training evaluates only ---------------------


def test_a_crash_in_evaluation_resumes_without_training(tmp_path, monkeypatch):
    data, out = make_csv(tmp_path / "d.csv"), tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("crash while evaluating")

    monkeypatch.setattr(train_lib, "_held_out", crash)
    with pytest.raises(RuntimeError, match="crash while evaluating"):
        train_lib.train(options(data, out, method="lora", checkpoint_every=0))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]
    monkeypatch.undo()

    def no_training(*args, **kwargs):
        raise AssertionError("resume trained again")

    monkeypatch.setattr(train_lib, "_loss_fn", no_training)
    metrics = train_lib.train({"out": str(out), "resume": True, "progress": False})
    assert metrics["steps"] == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()


# -- 7. strict JSON ------------------------------------------------------------------------------------


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_on_disk_has_no_nan_or_infinity(tmp_path, monkeypatch):
    assert _strict_json.dumps({"a": [float("nan"), 1.5, (float("inf"),)], "b": -float("inf")}) == (
        '{"a": [null, 1.5, [null]], "b": null}'
    )
    monkeypatch.setattr(flatpeft.Method, "strength", lambda self: {"sigma": float("nan")})
    monkeypatch.setattr(train_lib, "_peak_memory", lambda device: {"peak_memory_mb": float("inf")})
    data, out = make_csv(tmp_path / "d.csv"), tmp_path / "run"
    train_lib.train(options(data, out, method="lora", log_every=1))
    for name in ("config.json", "metrics.json"):
        _strict((out / name).read_text())
    assert _strict((out / "metrics.json").read_text())["peak_memory_mb"] is None
    log = [_strict(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["sigma"] for e in log] == [None] * 4


# -- 8. smaller rules --------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_does_not_repeat_log_lines(tmp_path, monkeypatch):
    data, out = make_csv(tmp_path / "d.csv"), tmp_path / "run"
    _crashed_run(monkeypatch, data, out, checkpoint_every=0, log_every=1)  # crash in step 3, no checkpoint
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True
    train_lib.train({"out": str(out), "resume": True, "progress": False})
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_compare_run_folder_names_are_injective_and_collisions_are_refused(tmp_path, monkeypatch):
    a, b = compare.expand_specs(["lora:lr=1e-3", "lora:lr=1e+3"])
    assert compare.folder_name(a, 0) != compare.folder_name(b, 0)
    (plain,) = compare.expand_specs(["flat_lora:sigma=0.1"])
    assert compare.folder_name(plain, 0) == "flat_lora-sigma0.1-seed0"  # readable names stay as they were

    monkeypatch.setattr(compare, "folder_name", lambda row, seed: "same-seed0")
    with pytest.raises(ValueError, match="would share the run folder 'same-seed0'"):
        data = make_csv(tmp_path / "d.csv")
        compare.compare(
            {"model": "tiny", "data": data},
            ["lora", "flat_lora"],
            [0],
            str(tmp_path / "c"),
        )
    assert not (tmp_path / "c").exists()


def _trainer(out, **kw):
    from test_trainer import _args, _dataset

    args = _args(out, max_steps=2, save_strategy="steps", save_steps=1, **kw)
    return flatpeft.FlatTrainer(model=tiny_bert(), args=args, train_dataset=_dataset(16), method="flat_lora")


def test_flat_trainer_method_state_is_atomic_checked_and_required(tmp_path):
    _trainer(tmp_path / "t").train()
    ckpt = tmp_path / "t" / "checkpoint-1"
    assert (ckpt / METHOD_STATE_NAME).is_file()
    assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]

    marker = tmp_path / "marker"
    torch.save({"step": _Payload(marker)}, ckpt / METHOD_STATE_NAME)
    with pytest.raises(ValueError, match=rf"{METHOD_STATE_NAME} is not a flatpeft checkpoint"):
        _trainer(tmp_path / "t").train(resume_from_checkpoint=str(ckpt))
    assert not marker.exists()

    (ckpt / METHOD_STATE_NAME).unlink()
    with pytest.raises(ValueError, match=rf"{METHOD_STATE_NAME} is missing: .* restart at step 0"):
        _trainer(tmp_path / "t").train(resume_from_checkpoint=str(ckpt))


def test_prune_saved_adapters_keeps_the_users_own_adapters(tmp_path):
    from peft import LoraConfig

    model = tiny_bert()
    model.add_adapter("mine", LoraConfig(r=2, target_modules=["query"]))
    method = flatpeft.attach(model, "bi_lora")
    model.save_pretrained(tmp_path / "out")
    assert {"mine", "bi_lora_aux"} <= {p.name for p in (tmp_path / "out").iterdir()}
    from flatpeft import _peft

    _peft.prune_saved_adapters(str(tmp_path / "out"), model, keep=method.adapter)
    folders = {p.name for p in (tmp_path / "out").iterdir() if p.is_dir()}
    assert "mine" in folders and "bi_lora_aux" not in folders


def test_smollm2_cache_is_keyed_by_content_and_cleans_killed_conversions(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    monkeypatch.setenv("FLATPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_smollm2_file", lambda: gguf)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    converted = []

    def convert(source, target):
        converted.append(source.read_bytes())
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_smollm2", convert)
    gguf.write_bytes(b"A" * 64)
    first = models.smollm2_path()
    os.utime(gguf, ns=(1, 1))
    gguf.write_bytes(b"B" * 64)  # same size, other content
    second = models.smollm2_path()
    assert first != second and converted == [b"A" * 64, b"B" * 64]
    assert models.smollm2_path() == second and len(converted) == 2  # cached

    stale = tmp_path / "cache" / f".{second.name}-killed"  # what a killed conversion leaves
    (stale / "sub").mkdir(parents=True)
    gguf.write_bytes(b"C" * 64)

    def fail(source, target):
        (target / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_smollm2", fail)
    with pytest.raises(OSError, match="disk full"):
        models.smollm2_path()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [".smollm2.lock", first.name, second.name]
    )  # the stale folder and the failed one are gone


@pytest.mark.parametrize("value", ["0", "false", "", "no"])
def test_flatpeft_debug_off_values_do_not_turn_debug_on(value, monkeypatch, capsys):
    monkeypatch.setenv("FLATPEFT_DEBUG", value)
    assert cli.main(["compare", "--methods", "nosuch", "--model", "tiny"]) == 2
    assert "error:" in capsys.readouterr().err


def test_flatpeft_debug_1_raises(monkeypatch):
    monkeypatch.setenv("FLATPEFT_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.main(["compare", "--methods", "nosuch", "--model", "tiny"])


def test_stale_lock_of_a_dead_process_does_not_block(tmp_path):
    """flock is released by the OS when its holder dies: a lock file left behind claims nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999\n")
    lock = _runfolder.RunLock(out)
    lock.acquire()
    lock.release()
    shutil.rmtree(out)
