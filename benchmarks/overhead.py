"""Per-step time and peak memory of every registered method relative to ``lora`` (SPEC §5).

Time: one process, the same frozen weights (held once, shared by every method's module tree), batch
and seed for every method; after warm-up, rounds of ``--steps`` optimizer steps per method are
interleaved (lora, m1, m2, ..., lora, m1, ...) so drift in machine speed hits every method alike; the
figure is the median over rounds of each round's mean seconds per step (a round covers whole cycles
of methods that alternate step kinds). With ``--budget-s`` the rounds are cut to what the warm-up
step times say fits, and the costliest methods are skipped (and listed) if even two rounds do not.

Memory: on CUDA, the peak allocated memory of one method alone: the frozen weights, plus the tensors
the method's run keeps between steps (adapters, optimizer state, method buffers; measured as the
allocation its build and warm-up added), plus the rise above that during its steps. On CPU the
process-wide peak RSS cannot be reset, so each method's peak RSS is measured in a fresh child
process that loads the same model and runs the same steps.

    python benchmarks/overhead.py                      # MiniLM if installed, else a tiny BERT
    python benchmarks/overhead.py --model tiny --rounds 2 --methods lora flat_lora
    python benchmarks/overhead.py --model sd15-unet --batch-size 1 --length 64  # 64×64 latents, add_adapter
    python benchmarks/overhead.py --model tiny-vlm --batch-size 8             # LLaVA-style, FlatTrainer-free
    python benchmarks/overhead.py --model llama-8b --precision bf16 --batch-size 4 --length 1024 \\
        --rank 16 --gradient-checkpointing                # on a GPU; see benchmarks/gpu.sh

Controls: ``lora[2 passes]`` (the floor of every two-pass method) and ``flat_lora[in-place]``
(the reference Flat-LoRA algorithm, ``inplace_flat_lora.py``). ``--exactness-steps N`` trains every
method N more steps and reports whether the frozen weights stayed bit-identical (and the in-place
control's drift). Writes ``benchmarks/results/overhead-<device>-<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import peft
import shapes  # benchmarks/ (the script's folder)
import torch
from inplace_flat_lora import InPlaceFlatLoRA, TorchNoiseFlatLoRA, exactness
from report import machine, markdown_table

import flatpeft
from flatpeft.models import ModelError, minilm_path
from flatpeft.registry import make_config

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "flat_lora[keep]": ("flat_lora", {"noise_memory": "keep"}),
    "flat_lora[in-place]": ("flat_lora", {}),
    "flat_lora[torch]": ("flat_lora", {}),
    "bilevel_lora[darts]": ("bilevel_lora", {"hypergradient": "darts"}),
    "lora[2 passes]": ("lora", {}),
}
# Control rows: plain LoRA with two forward/backward passes per optimizer step (the gradients of the
# same batch accumulated) is the floor of every two-pass method on this machine; the in-place row is
# the reference Flat-LoRA algorithm (noise added to the stored weights and subtracted afterwards).
PASSES = {"lora[2 passes]": 2}
# flat_lora[torch]: the plain PyTorch noise path forced, beside flat_lora's automatic choice (the
# fused Triton kernel on CUDA; the same PyTorch path on CPU).
CLASSES = {"flat_lora[in-place]": InPlaceFlatLoRA, "flat_lora[torch]": TorchNoiseFlatLoRA}
# sam_full holds four fp32 tensors the size of every adapted weight during a step (zero probes,
# their gradients, the copy first_pass_gradients reads, ε): 16 bytes per adapted weight.
SAM_FULL_BYTES_PER_WEIGHT = 16


def build(args, spec: str, base, device: torch.device):
    """A fresh PEFT model over ``base``'s frozen weights (shared, not copied) with ``spec`` attached."""
    name, overrides = VARIANTS.get(spec, (spec, {}))
    torch.manual_seed(args.seed)  # the same LoRA initialisation for every method
    model = shapes.shared_copy(base)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    task = "CAUSAL_LM" if shapes.is_causal(args.model) else "SEQ_CLS"
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    if args.targets == shapes.target_label(args.model):
        targets = shapes.default_targets(args.model)  # a regex for the VLM
    if args.model in shapes.DIFFUSERS:  # LoRA as diffusers' training scripts add it: no PeftModel
        model.add_adapter(peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
        model.to(device)
    else:
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type=task)
        model = peft.get_peft_model(model, lora).to(device)
    model.train()
    fields = {f for f, *_ in flatpeft.get_method(name).config_class.describe()}
    if "total_steps" in fields:
        overrides = {"total_steps": 2, **overrides}  # from step 2 on the perturbation is at full strength
    config = make_config(name, seed=args.seed, **overrides)
    method = CLASSES.get(spec, flatpeft.get_method(name))(model, config)
    method.step = 1
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-5)
    method.bind(optimizer)
    return model, method, optimizer


def _autocast(args, device: torch.device):
    if args.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_fn(args, device: torch.device, passes: int = 1):
    """One optimizer step of a run on ``batches`` (forward under the run's autocast)."""

    def one_step(model, method, optimizer, batches) -> None:
        def loss_of(batch):
            def loss_fn():
                with _autocast(args, device):
                    return shapes.loss(args.model, model, batch)

            return loss_fn

        extra = {"upper_loss_fn": loss_of(batches[1])} if method.needs_upper_loss else {}
        for _ in range(passes):
            method.backward(loss_of(batches[0]), **extra)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated_mb(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else 0.0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sam_full_skip(model: str, total_memory: int) -> str | None:
    """Why ``sam_full`` cannot run on LLaMA shapes ``model`` on a GPU with ``total_memory`` bytes, or
    ``None``: its full-weight tensors and the frozen weights must fit in 80 % of the memory."""
    cost = shapes.llama_cost(model, 1, 1, False)
    need = cost.bytes_bf16 + SAM_FULL_BYTES_PER_WEIGHT * cost.adapted_params
    if need <= 0.8 * total_memory:
        return None
    return (
        f"needs > {need / 2**30:.0f} GiB before activations (frozen weights + 16 bytes per adapted "
        f"weight) of {total_memory / 2**30:.0f} GiB: full-weight SAM is a small-model reference"
    )


def planned_skips(args, specs: list[str], device: torch.device) -> dict[str, str]:
    """Methods that cannot run at this scale, decided before building anything (LLaMA on CUDA)."""
    if device.type != "cuda" or args.model not in shapes.LLAMA or "sam_full" not in specs:
        return {}
    why = sam_full_skip(args.model, torch.cuda.get_device_properties(device).total_memory)
    return {"sam_full": why} if why else {}


def build_runs(args, specs, base, device, skipped: dict[str, str]):
    """Build and warm up every run; returns the runs, each run's resident MiB and last warm-up step time."""
    runs, resident, warm = {}, {}, {}
    for spec in specs:
        if spec in skipped:
            continue
        before = _allocated_mb(device)
        try:
            run = build(args, spec, base, device)
            one_step = step_fn(args, device, PASSES.get(spec, 1))
            for _ in range(args.warmup):
                _sync(device)
                start = time.perf_counter()
                one_step(*run, batches=args._batches)
                _sync(device)
                warm[spec] = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:
            run = None
            skipped[spec] = "out of memory"
            _free(device)
            continue
        runs[spec] = run
        resident[spec] = _allocated_mb(device) - before
    return runs, resident, warm


def plan_rounds(args, runs: dict, warm: dict, skipped: dict[str, str]) -> int:
    """Rounds that fit before ``args.deadline`` from the warm-up step times; skips the costliest methods
    (never ``lora``) until at least ``min(2, --rounds)`` rounds fit."""
    if args.deadline is None or not warm:
        return args.rounds
    want = min(2, args.rounds)
    while True:
        left = args.deadline - time.monotonic()
        per_round = sum(warm[s] for s in runs) * args.steps
        fit = int(left // per_round) if per_round > 0 else args.rounds
        if fit >= want or len(runs) == 1:
            return max(1, min(args.rounds, fit))
        costliest = max((s for s in runs if s != "lora"), key=lambda s: warm[s])
        skipped[costliest] = (
            f"time budget: {warm[costliest]:.2f} s/step would not leave {want} rounds in {left:.0f} s"
        )
        del runs[costliest]


def time_methods(args, runs: dict, resident: dict, base_mb: float, rounds: int, device, skipped) -> dict:
    specs = list(runs)
    times: dict[str, list[float]] = {spec: [] for spec in specs}  # mean seconds/step of each round
    peaks: dict[str, float] = {}
    for r in range(rounds):
        order = list(specs) if r % 2 == 0 else [specs[0], *reversed(specs[1:])]
        for spec in order:
            one_step = step_fn(args, device, PASSES.get(spec, 1))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start_mb = _allocated_mb(device)
            start = time.perf_counter()
            try:
                for _ in range(args.steps):
                    one_step(*runs[spec], batches=args._batches)
                _sync(device)
            except torch.cuda.OutOfMemoryError:
                if spec == "lora":
                    raise
                skipped[spec] = f"out of memory in round {r + 1}"
                del runs[spec], times[spec]
                specs.remove(spec)
                _free(device)
                continue
            times[spec].append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                rise = torch.cuda.max_memory_allocated() / 2**20 - start_mb
                peaks[spec] = max(peaks.get(spec, 0.0), base_mb + resident[spec] + rise)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return {
        spec: {
            "seconds_per_step": statistics.median(times[spec]),
            "round_means": times[spec],
            "peak_mb": peaks.get(spec),
            "resident_mb": resident[spec] if device.type == "cuda" else None,
        }
        for spec in specs
    }


def profile_step(args, run, passes: int, device: torch.device, top: int = 16) -> dict:
    """The operators of one optimizer step by self time (device time on CUDA, CPU time on CPU): the
    ``top`` costliest, and the random-number operators (Flat-LoRA's draws) wherever they rank."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    one_step = step_fn(args, device, passes)
    _sync(device)
    with profile(activities=activities) as prof:
        one_step(*run, batches=args._batches)
        _sync(device)
    kind = "device" if device.type == "cuda" else "cpu"
    events = [(e.key, e.count, getattr(e, f"self_{kind}_time_total", 0.0) / 1e3) for e in prof.key_averages()]
    events.sort(key=lambda e: -e[2])
    return {
        "time": f"self {kind} time, ms",
        "total_ms": sum(e[2] for e in events),
        "top": [{"op": k, "calls": n, "self_ms": ms} for k, n, ms in events[:top]],
        "random": [{"op": k, "calls": n, "self_ms": ms} for k, n, ms in events if _RANDOM in k],
    }


_RANDOM = "normal"  # aten::normal_ (randn) and the CUDA normal kernels


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def _child_peak_rss(args, spec: str, queue) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    base = shapes.load_base(args.model, shapes.DTYPES[args.precision])
    run = build(args, spec, base, device)
    args._batches = make_batches(args, base, device)
    one_step = step_fn(args, device, PASSES.get(spec, 1))
    for _ in range(args.warmup):
        one_step(*run, batches=args._batches)
    # Loading the model has its own RSS spike; reset the high-water mark (Linux: clear_refs 5) so
    # the peak is that of the training steps alone (still including the loaded model).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    for _ in range(args.steps):
        one_step(*run, batches=args._batches)
    peak = _vm_hwm_mib()
    queue.put(peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cpu_peak_rss(args, spec: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
    proc = ctx.Process(target=_child_peak_rss, args=(child_args, spec, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def make_batches(args, base, device):
    vocab = getattr(base.config, "vocab_size", None) or getattr(
        getattr(base.config, "text_config", None), "vocab_size", 0
    )
    return shapes.make_batches(args.model, vocab, args.batch_size, args.length, args.seed, device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["auto", *shapes.MODELS], default="auto")
    parser.add_argument(
        "--methods",
        nargs="*",
        help="default: every registered method plus the variants and controls " + ", ".join(VARIANTS),
    )
    parser.add_argument(
        "--precision",
        choices=list(shapes.DTYPES),
        default="fp32",
        help="bf16: frozen weights in bf16, forward under bf16 autocast (adapters fp32)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens; for sd15-unet the latent side")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--targets",
        default=None,
        help="'all-linear' or comma-separated module names (default: all-linear; the UNet's attention "
        "projections; the VLM's language model)",
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=5, help="steps per method per round (5 = one bilevel_lora 4:1 cycle)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget for this run")
    parser.add_argument(
        "--exactness-steps",
        type=int,
        default=0,
        help="then train N more steps per method and compare the frozen weights bit for bit",
    )
    parser.add_argument(
        "--profile", nargs="*", default=[], help="then profile one step of these methods (torch.profiler)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-method peak RSS children (CPU)"
    )
    parser.add_argument("--no-time", action="store_true", help="no timing rounds (memory or exactness only)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for flag in ("batch_size", "length", "rank", "rounds", "steps", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first steps allocate optimizer state)")
    if args.model == "auto":
        try:
            minilm_path()
            args.model = "minilm"
        except ModelError:
            args.model = "tiny"
    args.targets = args.targets or shapes.target_label(args.model)
    known = {*flatpeft.list_methods(), *VARIANTS}
    unknown = sorted(set(args.methods or []) - known)
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(sorted(known))}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    args.deadline = started + args.budget_s if args.budget_s else None
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    specs = args.methods or [*flatpeft.list_methods(), *VARIANTS]
    specs = ["lora", *dict.fromkeys(s for s in specs if s != "lora")]

    torch.manual_seed(args.seed)
    base = shapes.load_base(args.model, shapes.DTYPES[args.precision], device)
    for p in base.parameters():
        p.requires_grad_(False)
    args._batches = make_batches(args, base, device)
    if device.type == "cuda":  # cuBLAS allocates its workspace on the first matmul: before any method
        x = torch.ones(64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        (x @ x).sum().backward()
        _sync(device)
    base_mb = _allocated_mb(device)
    skipped = planned_skips(args, specs, device)
    if args.no_time and not (args.exactness_steps or args.profile):  # CPU memory only: children build
        runs, resident, warm = dict.fromkeys(s for s in specs if s not in skipped), {}, {}
    else:
        runs, resident, warm = build_runs(args, specs, base, device, skipped)
    rounds = 0 if args.no_time else plan_rounds(args, runs, warm, skipped)
    if rounds:
        results = time_methods(args, runs, resident, base_mb, rounds, device, skipped)
    else:
        results = {s: {"seconds_per_step": math.nan, "round_means": [], "peak_mb": None} for s in runs}
    checks = None
    if args.exactness_steps:
        steppers = {s: step_fn(args, device, PASSES.get(s, 1)) for s in results}
        checks = exactness({s: runs[s] for s in results}, args._batches, args.exactness_steps, steppers)
    profiles = {s: profile_step(args, runs[s], PASSES.get(s, 1), device) for s in args.profile if s in runs}
    del runs
    _free(device)
    if device.type == "cpu" and not args.no_memory:
        for spec in results:
            results[spec]["peak_mb"] = cpu_peak_rss(args, spec)
    base_t, base_m = results["lora"]["seconds_per_step"], results["lora"]["peak_mb"]
    for row in results.values():
        row["time_ratio"] = row["seconds_per_step"] / base_t
        row["round_ratios"] = [
            t / b for t, b in zip(row["round_means"], results["lora"]["round_means"], strict=True)
        ]
        row["memory_ratio"] = row["peak_mb"] / base_m if row["peak_mb"] and base_m else None
    results.update({spec: {"skipped": why} for spec, why in skipped.items()})

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(device),
        "memory": "CUDA peak allocated of the method alone (frozen weights + its resident tensors + "
        "the rise during its steps)"
        if device.type == "cuda"
        else "peak RSS of a child process per method",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "deadline") and k[0] != "_"}
        | {"rounds_run": rounds, "wall_s": round(time.monotonic() - started, 1)},
        "results": results,
    }
    if args.model in shapes.LLAMA:
        cost = shapes.llama_cost(args.model, args.batch_size, args.length, args.gradient_checkpointing)
        report["estimate"] = {"lora_step_tflop": cost.flops / 1e12, "adapted_weights": cost.adapted_params}
    if checks is not None:
        report["exactness"] = {"dtype": args.precision, "results": checks}
    if profiles:
        report["profile"] = profiles
    out = args.out or RESULTS / f"overhead-{device.type}-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown_table(report))
    print(f"\nwritten to {out}")
    return report


if __name__ == "__main__":
    main()
