"""The benchmarks run end to end on tiny models (their timings are not checked: timing is the
benchmark's job, not a test's), and what they compute besides timings is checked: the in-place
Flat-LoRA control trains on flatpeft's own noise, the exactness check catches a weight that moved,
the LLaMA shapes are the published models', and the time plan skips what does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
import overhead  # noqa: E402
import shapes  # noqa: E402
from inplace_flat_lora import InPlaceFlatLoRA, drift  # noqa: E402

import flatpeft  # noqa: E402
from flatpeft.registry import make_config  # noqa: E402


def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    specs = ["bi_lora", "lora[2 passes]", "flat_lora[keep]", "flat_lora[in-place]"]
    argv = ["--model", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1", "--batch-size", "2"]
    report = overhead.main([*argv, "--length", "8", "--no-memory", "--methods", *specs, "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"lora", *specs}
    rows = report["results"]
    assert rows["lora"]["round_ratios"] == [1.0, 1.0]
    for spec in specs:
        assert len(rows[spec]["round_means"]) == 2 and all(t > 0 for t in rows[spec]["round_means"])
        assert rows[spec]["time_ratio"] > 0 and rows[spec]["memory_ratio"] is None


def test_gpu_sh_smoke(tmp_path):
    """benchmarks/gpu.sh --smoke: the GPU suite's code on CPU (exactness, both tables, the profile)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = ["exactness", "llama-tiny-b2x16", "llama-tiny-b2x16-ckpt"]
    assert list(summary["reports"]) == names and summary["errors"] == {}
    assert all((tmp_path / f"{name}.json").exists() for name in names)
    every = {*flatpeft.list_methods(), *overhead.VARIANTS}
    exact = summary["reports"]["exactness"]["exactness"]["results"]
    assert set(exact) == every
    for spec, row in exact.items():  # flatpeft never writes a frozen weight; the reference algorithm does
        moved = spec == "flat_lora[in-place]"
        assert row["all_frozen_bit_identical"] is not moved and row["bit_identical"] is not moved, spec
        assert (row["relative"] > 0) is moved and row["steps"] == 3
    for name in names[1:]:
        report = summary["reports"][name]
        assert report["settings"]["gradient_checkpointing"] is name.endswith("-ckpt")
        assert set(report["results"]) == every
        assert all(row["seconds_per_step"] > 0 for row in report["results"].values())
        assert set(summary["targets"][name]) == set(gpu_suite.TARGETS)
    profile = summary["reports"][names[1]]["profile"]
    assert set(profile) == set(gpu_suite.PROFILED) and all(p["top"] for p in profile.values())
    table = (tmp_path / "summary.md").read_text()
    assert "| flat_lora[in-place] |" in table and "Targets (SPEC §5, GPU)" in table


def _tiny_llama(dtype: torch.dtype):
    torch.manual_seed(0)
    base = shapes.load_base("llama-tiny", dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # B = 0 at PEFT's init: give the effective weight a LoRA part
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    batch = shapes.make_batches("llama-tiny", 256, 2, 8, 0, "cpu")[0]
    return model, batch


@pytest.mark.parametrize("keep", [False, True])
def test_inplace_control_trains_on_flatpeft_noise(keep):
    """In float64 the reference algorithm and flat_lora see the same ε, so their gradients agree."""
    grads = {}
    for cls in (InPlaceFlatLoRA, flatpeft.get_method("flat_lora")):
        model, batch = _tiny_llama(torch.float64)
        cfg = make_config("flat_lora", sigma=0.1, schedule="constant", seed=3)
        method = cls(model, cfg.replace(noise_memory="keep") if keep and cls is not InPlaceFlatLoRA else cfg)
        method.step = 5
        method.after_step = lambda: None
        method._warned_unbound = True
        method.backward(lambda m=model, b=batch: m(**b).loss)
        grads[cls] = [p.grad.clone() for p in method.parameters()]
    plain, _ = _tiny_llama(torch.float64)
    plain(**batch).loss.backward()
    clean = [p.grad for p in plain.parameters() if p.requires_grad]
    ours, theirs = grads.values()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert max(float((a - c).abs().max()) for a, c in zip(ours, clean, strict=True)) > 1e-6  # noise acted


def test_inplace_control_drifts_in_bf16():
    for dtype, moved in ((torch.bfloat16, True), (torch.float64, False)):
        model, batch = _tiny_llama(dtype)
        method = InPlaceFlatLoRA(model, make_config("flat_lora", sigma=0.05, schedule="constant"))
        method.bind(torch.optim.SGD(method.parameters(), lr=0.0))
        weights = [flatpeft._peft.dense_weight(layer) for _, layer in method.layers]
        before = [w.clone() for w in weights]
        for _ in range(3):
            method.backward(lambda m=model, b=batch: m(**b).loss)
            method.after_step()
        result = drift(weights, before)  # float64 rounds too, 2⁴⁵ times finer
        assert (1e-5 < result["relative"] < 1e-2) if moved else result["relative"] < 1e-14


def test_drift_reports_a_moved_weight():
    w = [torch.ones(4, 4), torch.ones(2)]
    moved = [w[0].clone(), w[1] + torch.tensor([0.0, 0.5])]
    result = drift(moved, w)
    assert result["bit_identical"] is False and result["max_abs"] == 0.5
    assert result["changed_fraction"] == pytest.approx(1 / 18)
    assert result["relative"] == pytest.approx(0.5 / 18**0.5)
    assert drift(w, [t.clone() for t in w])["bit_identical"] is True


@pytest.mark.parametrize(("name", "total"), [("llama-1b", 1_235_814_400), ("llama-8b", 8_030_261_248)])
def test_llama_shapes_match_the_published_models(name, total):
    """Parameter counts of LLaMA-3.2-1B and LLaMA-3-8B; the cost model counts the same weights."""
    with torch.device("meta"):
        model = shapes.load_base(name, torch.bfloat16, "meta")
    assert sum(p.numel() for p in model.parameters()) == total
    cost = shapes.llama_cost(name, 1, 1, False)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert cost.matmul_params == linear and cost.adapted_params == linear - model.lm_head.weight.numel()
    assert cost.bytes_bf16 == 2 * total


def test_sam_full_is_skipped_where_its_full_weight_tensors_do_not_fit():
    h100, h200 = 80 * 2**30, 141 * 10**9
    assert overhead.sam_full_skip("llama-8b", h200) is not None
    assert overhead.sam_full_skip("llama-1b", h100) is None


def test_time_plan_cuts_rounds_then_skips_the_costliest(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(overhead.time, "monotonic", lambda: clock[0])
    args = overhead.parse_args(["--model", "tiny", "--rounds", "4", "--steps", "5"])
    warm = {"lora": 1.0, "flat_lora": 1.1, "sam_full": 2.5, "lora_sam": 2.0}
    runs = dict.fromkeys(warm)
    args.deadline = 100.0 + 5 * 6.6 * 3.5  # 3.5 rounds of all four
    skipped = {}
    assert overhead.plan_rounds(args, dict(runs), warm, skipped) == 3 and not skipped
    args.deadline = 100.0 + 5 * 2.1 * 2.2  # two rounds only without sam_full and lora_sam
    kept = dict(runs)
    assert overhead.plan_rounds(args, kept, warm, skipped) == 2
    assert list(kept) == ["lora", "flat_lora"] and set(skipped) == {"sam_full", "lora_sam"}
    assert all(why.startswith("time budget") for why in skipped.values())


def test_gpu_plan_fits_the_budget_at_the_assumed_throughput():
    specs = [*flatpeft.list_methods(), *overhead.VARIANTS]
    plan = gpu_suite.measurements(smoke=False, exactness_steps=8)
    total = sum(gpu_suite.estimate_s(m, specs, 400.0, 8) for m in plan)
    assert [m["model"] for m in plan] == [
        "llama-1b",
        "llama-8b",
        "llama-8b",
        "llama-1b",
        "sd15-unet",
    ]
    assert total < 420.0


def test_bi_lora_layer_benchmark_smoke(tmp_path):
    import bi_lora_layer

    out = tmp_path / "layer.json"
    argv = ["--in-features", "8", "--out", "16", "--tokens", "4", "--rank", "2", "--rounds", "1"]
    result = bi_lora_layer.main([*argv, "--passes", "1", "--json", str(out)])
    assert result.keys() == {"lora", "two adapters", "fused"} and all(ms > 0 for ms in result.values())
    written = json.loads(out.read_text())
    assert written["ms_per_pass"] == result and written["settings"]["tokens"] == 4
