"""Machine description and Markdown tables of the overhead benchmark's reports."""

from __future__ import annotations

import os
import platform

import peft
import torch
import transformers

import flatpeft


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "flatpeft": flatpeft.__version__,
    }
    if hasattr(os, "getloadavg"):  # other work on the machine at the end of the run (1, 5, 15 min)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(report: dict) -> str:
    s = report["settings"]
    hw = report["machine"]["cpu"] if report["device"] == "cpu" else report["machine"].get("gpu")
    ckpt = ", activation checkpointing" if s.get("gradient_checkpointing") else ""
    lines = [
        f"{report['device']} · {hw} · {s['model']} ({s.get('precision', 'fp32')}{ckpt}) · batch "
        f"{s['batch_size']} × length {s['length']} · LoRA r={s['rank']} on {s['targets']}",
        "",
    ]
    timed = s.get("rounds_run", 1) or (report["device"] == "cpu" and not s.get("no_memory"))
    if timed:
        lines += ["| method | s/step | time × lora | peak MiB | memory × lora |", "|---|---:|---:|---:|---:|"]
    for spec, row in report["results"].items() if timed else ():
        if "skipped" in row:
            lines.append(f"| {spec} | skipped: {row['skipped']} | | | |")
            continue
        mem = f"{row['peak_mb']:.0f}" if row["peak_mb"] else "–"
        ratio = f"{row['memory_ratio']:.3f}" if row["memory_ratio"] else "–"
        lines.append(
            f"| {spec} | {row['seconds_per_step']:.3f} | {row['time_ratio']:.2f} | {mem} | {ratio} |"
        )
    if "exactness" in report:
        lines += ["", exactness_table(report["exactness"])]
    for spec, prof in report.get("profile", {}).items():
        lines += ["", f"Profile of one `{spec}` step ({prof['time']}, total {prof['total_ms']:.1f}):", ""]
        lines += ["| operator | calls | ms |", "|---|---:|---:|"]
        shown = prof["top"] + [e for e in prof.get("random", []) if e not in prof["top"]]
        lines += [f"| `{e['op']}` | {e['calls']} | {e['self_ms']:.1f} |" for e in shown]
    return "\n".join(lines)


def exactness_table(exact: dict) -> str:
    lines = [
        f"Frozen weights after training ({exact['dtype']}; bit-identical: every frozen tensor; drift: the "
        "adapted layers' base weights):",
        "",
        "| method | steps | bit-identical | ‖ΔW‖/‖W‖ | max abs ΔW | entries changed |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for spec, row in exact["results"].items():
        lines.append(
            f"| {spec} | {row['steps']} | {'yes' if row['all_frozen_bit_identical'] else 'NO'} "
            f"| {row['relative']:.2e} "
            f"| {row['max_abs']:.2e} | {row['changed_fraction']:.2%} |"
        )
    return "\n".join(lines)
