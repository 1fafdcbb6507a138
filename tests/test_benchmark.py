"""The overhead benchmark runs end to end on a tiny model (its numbers are not checked: timing is
the benchmark's job, not a test's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import overhead


def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    specs = ["bi_lora", "lora[2 passes]", "flat_lora[keep]"]
    argv = ["--model", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1", "--batch-size", "2"]
    report = overhead.main([*argv, "--length", "8", "--no-memory", "--methods", *specs, "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"lora", *specs}
    rows = report["results"]
    assert rows["lora"]["round_ratios"] == [1.0, 1.0]
    for spec in specs:
        assert len(rows[spec]["round_means"]) == 2 and all(t > 0 for t in rows[spec]["round_means"])
        assert rows[spec]["time_ratio"] > 0 and rows[spec]["memory_ratio"] is None


def test_bi_lora_layer_benchmark_smoke():
    import bi_lora_layer

    argv = [
        "--in-features",
        "8",
        "--out",
        "16",
        "--tokens",
        "4",
        "--rank",
        "2",
        "--rounds",
        "1",
        "--passes",
        "1",
    ]
    result = bi_lora_layer.main(argv)
    assert result.keys() == {"lora", "two adapters", "fused"} and all(ms > 0 for ms in result.values())
