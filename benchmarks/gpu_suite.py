"""The GPU overhead benchmark in one command (``benchmarks/gpu.sh``): LLaMA shapes, bf16, one GPU.

Runs, in this order, each as one ``overhead.py`` measurement in this process:

1. exactness: every method (and the controls) trains ``--exactness-steps`` steps on llama-1b shapes;
   the frozen bf16 weights are compared bit for bit, and the in-place control's drift is reported;
2. the overhead table for llama-8b shapes (batch 4 × 1024), activation checkpointing off and on;
3. the overhead table for llama-1b shapes (batch 8 × 1024), checkpointing off (on: only llama-8b);
   plus a ``torch.profiler`` table of one step of the Flat-LoRA rows on the first llama-8b run;
4. the overhead table for Stable Diffusion 1.5 UNet shapes (batch 4, 64×64 latents, LoRA on the
   attention projections through diffusers' ``add_adapter``; needs diffusers);
5. the bytes table (``noise_bytes.py``): bytes read + written per adapted weight per step beyond
   ``lora``, counted over the ops a 4096 × 4096 layer's training step dispatches on the GPU, for the
   fused Triton kernel and the plain PyTorch noise path (seconds).

The Flat-LoRA rows compare the noise paths side by side: ``flat_lora`` and ``flat_lora[keep]`` take
the fused Triton kernel on CUDA (when Triton imports), ``flat_lora[torch]`` the plain PyTorch path
(its ``keep`` counterpart is in the bytes table), ``flat_lora[in-place]`` is the reference algorithm.

Time budget (``--budget-s``, default 420 s so that gpu.sh, with interpreter start, CUDA initialisation
and model builds around it, stays under 8 minutes on one H100/H200). Before running, each
measurement's time is estimated from FLOPs (``shapes.llama_cost``: 2·N·T per forward and per backward,
one more forward with checkpointing, N = the weights a token meets, T = tokens per step) at an assumed
``--tflops`` (400 TFLOP/s: ~40 % of an H100/H200's dense bf16 peak, what eager Hugging Face LLaMA
training reaches), times each method's passes per step (``PASS_COST``), times (rounds × steps +
warm-up) steps, plus ``BUILD_S`` seconds per measurement for the random initialisation and the PEFT
wrapping. At the 400 TFLOP/s assumption one LoRA step is 0.31 s (llama-8b, 4 × 1024, no checkpointing)
and 0.47 s (with), 0.10 s for llama-1b (8 × 1024), and the whole suite about 370 s with the UNet row
(less where sam_full is skipped). The budget is shared among the measurements in proportion to these
estimates; each measurement then re-plans from its own warm-up step times (``overhead.py --budget-s``:
fewer rounds, and the costliest methods skipped and listed if two rounds do not fit), so a slower GPU
gives a shorter table, not an overrun. ``sam_full`` is skipped on llama-8b up front when its
full-weight tensors (16 bytes per adapted weight: 112 GB) and the weights exceed 80 % of the GPU's
memory: it is the small-model reference. Every result is written as soon as it is measured.

``--smoke`` runs the same code on CPU on ``llama-tiny`` shapes in seconds (what CI tests).

    PYTHONPATH=src python benchmarks/gpu_suite.py --out-dir gpu-results
    PYTHONPATH=src python benchmarks/gpu_suite.py --smoke --out-dir /tmp/smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import noise_bytes
import overhead
import shapes
import torch

import flatpeft

# Forward/backward-pass equivalents of one optimizer step, for the time plan only (the measurement
# re-plans from real step times): two-pass methods 2, sam_full 2.5 (its first pass also computes
# full-weight gradients, 2·N·T more), bilevel_lora[darts] 1.6 (one unrolled upper step in five).
PASS_COST = {
    "lora_sam": 2.0,
    "fm_lora": 2.05,
    "lora[2 passes]": 2.0,
    "sam_full": 2.5,
    "bilevel_lora[darts]": 1.6,
    "flat_lora": 1.1,
    "flat_lora[in-place]": 1.1,
    "flat_lora[torch]": 1.1,
    "eflat_lora": 1.1,
}
BUILD_S = 15.0
UNET_PLAN_S = 30.0  # the SD 1.5 UNet measurement's share of the plan (overhead.py re-plans from its steps)
TARGETS = {  # SPEC §5, GPU, llama-8b shapes: (time × lora, memory × lora or None)
    "flat_lora": (1.03, 1.02),
    "bi_lora": (1.05, None),
    "eflat_lora": (1.10, None),
    "lora_sam": (2.05, None),
    "fm_lora": (2.05, None),
}
PROFILED = ["lora", "flat_lora", "flat_lora[keep]", "flat_lora[torch]", "flat_lora[in-place]"]


def measurements(smoke: bool, exactness_steps: int) -> list[dict]:
    """The suite: name, model, batch, length, checkpointing, rounds, steps and extra flags."""
    big, small = ("llama-tiny", "llama-tiny") if smoke else ("llama-8b", "llama-1b")
    r, s = (1, 1) if smoke else (3, 5)
    b8, b4, n = (2, 2, 16) if smoke else (8, 4, 1024)
    exact = dict(name="exactness", model=small, batch=2, length=n // 4, ckpt=False, rounds=1, steps=1)
    exact["flags"] = ["--no-time", "--exactness-steps", str(exactness_steps)]
    runs = [
        exact,
        dict(name=f"{big}-b{b4}x{n}", model=big, batch=b4, length=n, ckpt=False, rounds=r, steps=s,
             flags=["--profile", *PROFILED], targets=True),
        dict(name=f"{big}-b{b4}x{n}-ckpt", model=big, batch=b4, length=n, ckpt=True, rounds=r, steps=s,
             targets=True),
        dict(name=f"{small}-b{b8}x{n}", model=small, batch=b8, length=n, ckpt=False, rounds=r, steps=s),
    ]  # fmt: skip
    if smoke:
        return runs[:3]  # the smoke's two shapes are one
    # (llama-1b with checkpointing is left out: with the UNet row it would overrun the 420 s budget,
    # and checkpointing's effect on the ratios is measured on llama-8b.)
    # Stable Diffusion 1.5 UNet shapes, LoRA (diffusers' add_adapter) on the attention projections,
    # 64×64 latents (``--length`` is the latent side). No FLOP model: a fixed plan share (UNET_PLAN_S).
    unet = dict(name="sd15-unet-b4", model="sd15-unet", batch=4, length=64, ckpt=False, rounds=r, steps=s)
    return [*runs, unet | {"plan_s": UNET_PLAN_S}]


def estimate_s(m: dict, specs: list[str], tflops: float, exactness_steps: int) -> float:
    """Seconds a measurement is expected to take at ``tflops`` (see the module docstring)."""
    if "plan_s" in m:
        return m["plan_s"]
    cost = shapes.llama_cost(m["model"], m["batch"], m["length"], m["ckpt"])
    step = cost.flops / (tflops * 1e12)
    steps = 1 + (exactness_steps if "--no-time" in m.get("flags", []) else m["rounds"] * m["steps"] + 1)
    return BUILD_S + step * steps * sum(PASS_COST.get(spec, 1.0) for spec in specs)


def check_targets(report: dict) -> dict[str, str]:
    """Each GPU target of SPEC §5 against one llama-8b table: 'met', 'missed (...)' or 'not run'."""
    out = {}
    for spec, (t_max, m_max) in TARGETS.items():
        row = report["results"].get(spec)
        if row is None or "skipped" in row:
            out[spec] = "not run"
            continue
        t, m = row["time_ratio"], row["memory_ratio"]
        ok = t <= t_max and (m_max is None or m is None or m <= m_max)
        mem = f", memory {m:.3f}× (≤ {m_max}×)" if m_max and m else ""
        out[spec] = f"{'met' if ok else 'missed'}: time {t:.3f}× (≤ {t_max}×){mem}"
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, llama-tiny shapes, seconds")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--tflops", type=float, default=400.0, help="assumed bf16 throughput for the plan")
    parser.add_argument("--exactness-steps", type=int, default=None, help="default 8 (--smoke: 3)")
    parser.add_argument("--only", nargs="*", help="run only these measurements (by name)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    device = "cpu" if args.smoke else "cuda"
    if args.exactness_steps is None:
        args.exactness_steps = 3 if args.smoke else 8
    started = time.monotonic()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    specs = [*flatpeft.list_methods(), *overhead.VARIANTS]
    plan = [
        m for m in measurements(args.smoke, args.exactness_steps) if not args.only or m["name"] in args.only
    ]
    unknown = set(args.only or []) - {m["name"] for m in plan}
    if unknown:
        parser.error(f"unknown measurements {sorted(unknown)}")
    estimates = [estimate_s(m, specs, args.tflops, args.exactness_steps) for m in plan]
    summary = {
        "plan": [{"name": m["name"], "estimate_s": round(e, 1)} for m, e in zip(plan, estimates, strict=True)]
    }
    summary |= {"budget_s": args.budget_s, "tflops_assumed": args.tflops}
    summary |= {"reports": {}, "targets": {}, "errors": {}}
    sections = []
    for i, m in enumerate(plan):
        left = args.budget_s - (time.monotonic() - started)
        share = left * estimates[i] / sum(estimates[i:])
        argv_m = [
            "--model", m["model"], "--precision", "bf16", "--device", device,
            "--batch-size", str(m["batch"]), "--length", str(m["length"]), "--rank", "16",
            "--rounds", str(m["rounds"]), "--steps", str(m["steps"]), "--warmup", "1" if args.smoke else "2",
            "--no-memory", "--out", str(args.out_dir / f"{m['name']}.json"),
            *(["--gradient-checkpointing"] if m["ckpt"] else []),
            *([] if args.smoke else ["--budget-s", f"{max(share, 1.0):.0f}"]),
            *m.get("flags", []),
        ]  # fmt: skip
        print(f"== {m['name']}: estimated {estimates[i]:.0f} s, budget {share:.0f} s", flush=True)
        try:
            report = overhead.main(argv_m)
        except Exception as err:  # one failed measurement must not lose the others
            traceback.print_exc()
            summary["errors"][m["name"]] = repr(err)
            sections.append(f"\n## {m['name']}\n\nfailed: `{err!r}`")
        else:
            summary["reports"][m["name"]] = report
            sections.append(f"\n## {m['name']}\n\n{overhead.markdown_table(report)}")
            if m.get("targets"):
                summary["targets"][m["name"]] = check_targets(report)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        summary["wall_s"] = round(time.monotonic() - started, 1)
        write(args.out_dir, summary, sections)
    bytes_argv = ["--device", device, "--label", "gpu" if device == "cuda" else "smoke"]
    bytes_argv += ["--m", "4096", "--n", "4096", "--tokens", "4096"] if device == "cuda" else []
    bytes_argv += ["--m", "64", "--n", "64", "--tokens", "16"] if device == "cpu" else []
    bytes_argv += ["--paths", "torch-cuda", *(["triton"] if device == "cuda" else ["torch-cpu"])]
    bytes_argv += ["--methods", "lora", "flat_lora", "flat_lora[keep]", "flat_lora[in-place]"]
    try:
        counted = noise_bytes.main([*bytes_argv, "--out", str(args.out_dir / "noise-bytes.json")])
    except Exception as err:  # the timing tables above are kept whatever happens here
        traceback.print_exc()
        summary["errors"]["noise-bytes"] = repr(err)
    else:
        summary["noise_bytes"] = counted["rows"]
        sections.append(f"\n## noise bytes\n\n{noise_bytes.markdown_table(counted)}")
    summary["wall_s"] = round(time.monotonic() - started, 1)
    write(args.out_dir, summary, sections)
    return summary


def write(out_dir: Path, summary: dict, sections: list[str]) -> None:
    """summary.json (every report) and summary.md (every table and the target checks)."""
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# flatpeft overhead, LLaMA shapes, bf16 ({summary['wall_s']:.0f} s)", "", *sections]
    for name, checks in summary["targets"].items():
        lines += ["", f"Targets (SPEC §5, GPU), {name}:", ""]
        lines += [f"- `{spec}`: {verdict}" for spec, verdict in checks.items()]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
