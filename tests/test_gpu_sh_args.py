"""``benchmarks/gpu.sh`` reads its output folder and flags in any order: ``--smoke OUT`` is the smoke
run into OUT, not the full suite into a folder named ``--smoke``. The suite itself is replaced by a
stub interpreter that records the arguments it was given (the real smoke run is in test_benchmark)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_sh(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    """Run gpu.sh with a stub ``$PYTHON``; the suite's arguments (after the script name) and stderr."""
    record = tmp_path / "argv"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\n[[ $1 == -c ]] && exit 0\nprintf "%s\\n" "$@" > {record}\n')
    stub.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args],
        env={**os.environ, "PYTHON": str(stub)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    argv = record.read_text().splitlines() if record.exists() else []
    assert not argv or argv[0] == "benchmarks/gpu_suite.py"
    return proc.returncode, argv[1:], proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["OUT", "--smoke"],
        ["--smoke", "OUT"],
        ["--smoke", "--out-dir", "OUT"],
        ["--out-dir=OUT", "--smoke"],
    ],
)
def test_smoke_flag_and_output_folder_in_any_order(tmp_path, args):
    code, argv, err = gpu_sh(tmp_path, *args)
    assert code == 0, err
    assert argv == ["--out-dir", "OUT", "--smoke"]


def test_flag_values_are_not_taken_for_the_output_folder(tmp_path):
    code, argv, err = gpu_sh(
        tmp_path, "--budget-s", "60", "--smoke", "OUT", "--only", "exactness", "llama-tiny"
    )
    assert code == 0, err
    assert argv == ["--out-dir", "OUT", "--budget-s", "60", "--smoke", "--only", "exactness", "llama-tiny"]


def test_flags_alone_write_to_a_dated_results_folder(tmp_path):
    code, argv, err = gpu_sh(tmp_path, "--smoke")
    assert code == 0, err
    assert (
        argv[0] == "--out-dir" and argv[1].startswith("benchmarks/results/gpu-") and argv[2:] == ["--smoke"]
    )


def test_two_output_folders_are_an_error(tmp_path):
    code, argv, err = gpu_sh(tmp_path, "A", "B")
    assert code == 2 and argv == [] and "two output folders given (A, B)" in err
