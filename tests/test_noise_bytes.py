"""benchmarks/noise_bytes.py: the counting rule on hand-made ops, and the noise path's counted bytes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import noise_bytes


def test_counting_rule_on_hand_made_ops():
    m, n = 6, 10
    w = torch.randn(m, n).bfloat16()
    std, z = torch.rand(m, 1), torch.randn(m, n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    with noise_bytes.ByteCounter(cpu_casts=False) as c:
        torch.addcmul(w, std, z, out=out)
    assert (c.read, c.written, c.hidden) == (2 * m * n + 4 * m + 4 * m * n, 2 * m * n, 0)
    with noise_bytes.ByteCounter() as c:  # on CPU: W0 cast to fp32, result through an fp32 temporary
        torch.addcmul(w, std, z, out=out)
    assert c.hidden == 2 * 4 * m * n + 2 * 4 * m * n
    with noise_bytes.ByteCounter() as c:
        z.normal_(generator=torch.Generator().manual_seed(0))  # written, not read
        w.t()  # a view moves nothing
        z.add_(1.0)  # read and written
    assert (c.read, c.written, c.draws) == (4 * m * n, 8 * m * n, m * n)


@pytest.mark.parametrize("path", ["torch-cuda", "triton"])
def test_flat_lora_noise_path_bytes_are_the_documented_floor(tmp_path, path):
    """bf16, the CUDA op sequence: per draw z is written (2 B), and addcmul reads W0 and z and writes
    W0+ε (6 B); the fused kernel reads W0 and writes W0+ε (4 B). Regenerate draws twice, keep once."""
    if path == "triton":
        pytest.importorskip("triton")
    m, n = 48, 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = noise_bytes.main(
            ["--m", str(m), "--n", str(n), "--tokens", "8", "--precisions", "bf16", "--paths", path,
             "--methods", "lora", "flat_lora", "flat_lora[keep]", "--out", str(tmp_path / "b.json")]
        )  # fmt: skip
    rows = {r["method"]: r for r in report["rows"]}
    per_draw = 8 * m * n + 4 * m if path == "torch-cuda" else 4 * m * n + 4 * m
    for spec, draws in (("flat_lora", 2), ("flat_lora[keep]", 1)):
        ops = rows[spec]["by_op_minus_lora"]
        noise = ops.get("normal_", 0) + ops.get("addcmul", 0) + ops.get("noisy_rows", 0)
        assert noise == draws * per_draw, (spec, ops)
        assert rows[spec]["draws_per_weight"] == draws
        assert ("noisy_rows" in ops) == (path == "triton")
    assert "| flat_lora[keep] |" in noise_bytes.markdown_table(report)
