"""The Triton noise kernel compiles for a real GPU (sm_90, H100/H200) with Triton's own compiler and
the ``ptxas`` it bundles, no GPU needed: the interpreter tests check what it computes, this that the
CUDA build of the same code is valid, without a register spill worth the name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_the_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "compile.json"
    variants = ["norms+noise bf16 r=16", "noise, stds given, bf16"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--arch", "90", "--out", str(out),
         "--variants", *variants],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["variants"]) == set(variants)
    for name, stats in report["variants"].items():
        assert stats["cubin_bytes"] > 0, name
        assert 0 < stats["registers"] <= 255, (name, stats)
        assert stats.get("spill_load_bytes", 0) <= 64, (name, stats)
