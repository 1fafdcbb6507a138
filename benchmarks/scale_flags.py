"""Seconds per step and peak RSS of ``flatpeft train`` with each large-model flag, on CPU.

Every configuration is one ``flatpeft train`` (``torchrun --nproc_per_node 2`` for the DDP/FSDP rows)
on the same model, data, batch and seed; the numbers are those the run writes to ``metrics.json``:
the median seconds per optimizer step (first step excluded) and the peak RSS of rank 0's process
(which includes Python, PyTorch and Transformers themselves).

    python benchmarks/scale_flags.py                        # MiniLM on tweets, lora
    python benchmarks/scale_flags.py --model tiny --task causal-lm --data sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROWS = {
    "fp32": [],
    "bf16": ["--precision", "bf16"],
    "fp16": ["--precision", "fp16"],
    "fp32 + checkpointing": ["--gradient-checkpointing"],
    "bf16 + checkpointing": ["--precision", "bf16", "--gradient-checkpointing"],
    "4-bit (QLoRA)": ["--load-in-4bit"],
    "8-bit": ["--load-in-8bit"],
    "DDP, 2 ranks": ["+torchrun"],
    "FSDP2, 2 ranks": ["+torchrun", "--fsdp"],
    "FSDP2, 2 ranks, bf16 + checkpointing": [
        "+torchrun",
        "--fsdp",
        "--precision",
        "bf16",
        "--gradient-checkpointing",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="classification")
    parser.add_argument("--data", default="tweets")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/scale-flags-cpu.json")
    args = parser.parse_args()
    common = [
        "train", "--model", args.model, "--task", args.task, "--data", args.data, "--method", args.method,
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length),
        "--train-size", str(args.steps * args.batch_size), "--val-size", "64", "--test-size", "64",
        "--checkpoint-every", "0", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, flags) in enumerate(ROWS.items()):
            out = Path(tmp) / f"run{i}"
            launcher = [sys.executable, "-m", "flatpeft"]
            if "+torchrun" in flags:
                flags = [f for f in flags if f != "+torchrun"]
                launcher = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                ]
                launcher += ["-m", "flatpeft"]
            command = [*common, *flags, "--out", str(out)]
            proc = subprocess.run([*launcher, *command], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{label}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            metrics = json.loads((out / "metrics.json").read_text())
            row = {
                "label": label,
                "flags": " ".join(flags),
                "seconds_per_step": metrics["seconds_per_step"],
                "peak_rss_mb": metrics["peak_memory_mb"],
                "test_loss": metrics["test"]["loss"],
            }
            results.append(row)
            print(
                f"{label:40s} {row['seconds_per_step']:.4f} s/step  {row['peak_rss_mb']:.0f} MB", flush=True
            )
    report = {
        "command": " ".join(sys.argv),
        "common": " ".join(common),
        "rows": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
