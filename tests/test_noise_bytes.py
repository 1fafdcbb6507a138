"""benchmarks/noise_bytes.py: the counting rule on hand-made ops, and the noise path's counted bytes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import noise_bytes

from flatpeft import _noise


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
    W0+ε (6 B); the row norms read W0 once more in the W0·Aᵀ product. The fused kernel reads W0 and
    writes W0+ε (4 B); its first draw of the step also reads A, B and ‖W0_i‖² and writes the row stds,
    so the norms cost no second read of W0. Regenerate draws twice, keep once."""
    if path == "triton":
        pytest.importorskip("triton")
    m, n, r = 48, 64, 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = noise_bytes.main(
            ["--m", str(m), "--n", str(n), "--tokens", "8", "--precisions", "bf16", "--paths", path,
             "--methods", "lora", "flat_lora", "flat_lora[keep]", "--out", str(tmp_path / "b.json")]
        )  # fmt: skip
    rows = {r["method"]: r for r in report["rows"]}
    for spec, draws in (("flat_lora", 2), ("flat_lora[keep]", 1)):
        ops = rows[spec]["by_op_minus_lora"]
        assert rows[spec]["draws_per_weight"] == draws
        if path == "torch-cuda":
            assert ops.get("normal_", 0) + ops.get("addcmul", 0) == draws * (8 * m * n + 4 * m), (spec, ops)
            assert "noisy_rows" not in ops and "noisy_rows_normed" not in ops
            assert ops["mm"] >= 2 * m * n  # the norms' W0·Aᵀ reads W0
        else:
            normed = 4 * m * n + 4 * r * n + 4 * m * r + 2 * 4 * m  # W0, A, B, ‖W0_i‖² in; W0+ε, stds out
            assert ops["noisy_rows_normed"] == normed, ops
            assert ops.get("noisy_rows", 0) == (draws - 1) * (4 * m * n + 4 * m), ops
            assert "normal_" not in ops and "addcmul" not in ops
            assert ops.get("mm", 0) < m * n  # no W0·Aᵀ product: the kernel read W0 for the norms
    assert "| flat_lora[keep] |" in noise_bytes.markdown_table(report)


def test_every_chunk_of_a_parallel_cpu_draw_is_counted(tmp_path):
    """The counter sees its own thread only; the script counts on one, then gives the threads back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = noise_bytes.main(
                ["--m", "256", "--n", "512", "--tokens", "4", "--precisions", "fp32", "--paths", "torch-cuda",
                 "--methods", "lora", "flat_lora", "--out", str(tmp_path / "b.json")]
            )  # fmt: skip
        assert _noise.CHUNK < 256 * 512  # several CPU chunks
        (row,) = [r for r in report["rows"] if r["method"] == "flat_lora"]
        assert row["draws_per_weight"] == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
