"""The examples run, in smoke mode (the tiny models they build, a few steps), so the README's code keeps
working: ``examples/plain_loop.py``, ``hf_trainer.py``, ``ddp.py`` (2 CPU ranks) and ``demo.py``, the
script behind ``make demo`` (``--smoke``: the tiny model instead of MiniLM, 2 steps), ``vlm.py`` and
``text_to_image_lora.py`` (diffusers; skipped without it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest

from helpers import torchrun_argv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args: list, cwd: Path, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _assert_stock_adapter(folder: Path) -> None:
    """A stock PEFT LoRA adapter: its config and LoRA weights, nothing of an auxiliary branch."""
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    keys = set(peft.load_peft_weights(str(folder)))
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert not [d for d in folder.iterdir() if d.is_dir()]


def test_plain_loop_example(tmp_path):
    out = _run([sys.executable, EXAMPLES / "plain_loop.py", "--steps", "3"], tmp_path)
    assert "step   0  loss" in out and "sigma" in out
    _assert_stock_adapter(tmp_path / "runs" / "plain_loop_adapter")


def test_hf_trainer_example(tmp_path):
    _run(
        [sys.executable, EXAMPLES / "hf_trainer.py", "--max-steps", "3", "--out", tmp_path / "out"], tmp_path
    )
    _assert_stock_adapter(tmp_path / "out")


def test_ddp_example_on_two_ranks(tmp_path):
    out = _run([*torchrun_argv(), EXAMPLES / "ddp.py", "--steps", "3", "--out", tmp_path / "out"], tmp_path)
    assert out.count("step   0  loss") == 1  # rank 0 prints
    _assert_stock_adapter(tmp_path / "out")


def test_demo_smoke(tmp_path):
    out = _run([sys.executable, EXAMPLES / "demo.py", "--smoke", "--out", tmp_path / "demo"], tmp_path)
    report = json.loads((tmp_path / "demo" / "compare.json").read_text())
    runs = [(r["label"], r["steps"]) for r in report["runs"]]
    assert runs == [("lora", 2), ("flat_lora", 2), ("bi_lora", 2)]
    assert all(r["test"]["n"] == 30 for r in report["runs"])
    assert (tmp_path / "demo" / "compare.md").read_text().strip() in out


def test_vlm_example(tmp_path):
    out = _run(
        [sys.executable, EXAMPLES / "vlm.py", "--smoke", "--projector", "--out", tmp_path / "vlm"], tmp_path
    )
    assert "vision tower bit-identical: True" in out
    _assert_stock_adapter(tmp_path / "vlm")


def test_text_to_image_example(tmp_path):
    """bf16 autocast through Accelerate, 2 micro-batches per optimizer step, a two-pass method; the
    LoRA file reloads with load_lora_weights and reproduces the trained UNet (the script checks)."""
    pytest.importorskip("diffusers")
    args = ["--smoke", "--method", "lora_sam", "--mixed-precision", "bf16", "--grad-accum", "2"]
    out = _run(
        [sys.executable, EXAMPLES / "text_to_image_lora.py", *args, "--out", tmp_path / "lora"], tmp_path
    )
    assert "step   1  loss" in out and "2 optimizer steps" in out
    assert "reloaded with load_lora_weights: max |difference| 0.00e+00" in out
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
