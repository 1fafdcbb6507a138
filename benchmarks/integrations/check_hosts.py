"""End-to-end check of the axolotl plugin and the LLaMA-Factory launcher in the hosts' own environments.

    python benchmarks/integrations/check_hosts.py axolotl --work /tmp/hosts/axolotl \
        --out benchmarks/results/integrations-axolotl.txt
    python benchmarks/integrations/check_hosts.py llamafactory --work /tmp/hosts/llamafactory \
        --out benchmarks/results/integrations-llamafactory.txt

Run it with the host's virtual environment's Python (``make check-integrations`` builds them), where
flatpeft is installed too. It saves a tiny random LLaMA (2 layers, hidden size 32, the byte-level
tokenizer of ``flatpeft.models``) and a 32-example local JSON dataset (Alpaca format), then runs the
host's own CLI for 2 optimizer steps with ``lora`` (twice: the same seed must give the same adapter),
``flat_lora`` and ``bi_lora``:

- axolotl: ``axolotl train cfg.yaml`` with ``plugins: [flatpeft.integrations.axolotl.FlatPeftPlugin]``;
- LLaMA-Factory: ``flatpeft llamafactory cfg.yaml``.

and checks, per run: the CLI exits 0; the method's strength (``sigma``, ``rho``) is in the host's
printed logs; the frozen weights hash the same (SHA-256, by name) when training starts and when it
ends (read through ``probe/sitecustomize.py``, a test-only hook on ``Trainer.train``); the saved adapter
is stock PEFT (LoRA A/B keys of one adapter, no other adapter folder) and loads into vanilla PEFT with
no missing or unexpected key, in a process that never imports flatpeft; ``flat_lora``'s adapter differs
from ``lora``'s with the same seed, while two ``lora`` runs give the same adapter. The report ends
with ``checks: N passed, M failed`` and the exit code is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ("lora", "lora", {}),
    ("lora-again", "lora", {}),
    ("flat_lora", "flat_lora", {"sigma": 0.05}),
    ("bi_lora", "bi_lora", {"rho": 0.05}),
]
STRENGTH = {"lora": None, "flat_lora": "sigma", "bi_lora": "rho"}
STEPS = 2
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def make_fixtures(work: Path) -> None:
    """A tiny random LLaMA with its tokenizer in ``work/model`` and 32 Alpaca examples in ``work/data``."""
    import torch

    from flatpeft.models import _tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer("causal")
    model = _tiny_model("causal", 2, len(tokenizer))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    rows = []
    for i in range(32):
        a, b = words[i % 8], words[(3 * i + 1) % 8]
        rows.append({"instruction": f"Join {a} and {b}.", "input": "", "output": f"{a} {b} {i}"})
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "train.json").write_text(json.dumps(rows, indent=1))
    info = {"tiny_alpaca": {"file_name": "train.json"}}
    (work / "data" / "dataset_info.json").write_text(json.dumps(info, indent=1))


def _yaml(values: dict) -> str:
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items())


def axolotl_run(work: Path, name: str, method: str, options: dict) -> tuple[list[str], Path]:
    out = work / f"out-{name}"
    cfg = {
        "base_model": str(work / "model"),
        "datasets": [{"path": str(work / "data" / "train.json"), "type": "alpaca", "ds_type": "json"}],
        "dataset_prepared_path": str(work / f"prepared-{name}"),
        "val_set_size": 0,
        "output_dir": str(out),
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "sequence_len": 256,
        "sample_packing": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "num_epochs": 1,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 0,
        "plugins": ["flatpeft.integrations.axolotl.FlatPeftPlugin"],
        "flatpeft_method": method,
        "flatpeft_config": options,
    }
    path = work / f"{name}.yaml"
    path.write_text(_yaml(cfg))
    return [str(Path(sys.executable).parent / "axolotl"), "train", str(path)], out


def llamafactory_run(work: Path, name: str, method: str, options: dict) -> tuple[list[str], Path]:
    out = work / f"out-{name}"
    cfg = {
        "model_name_or_path": str(work / "model"),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "dataset": "tiny_alpaca",
        "dataset_dir": str(work / "data"),
        "template": "default",
        "cutoff_len": 256,
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "bf16": False,
        "seed": 0,
        "flatpeft_method": method,
        "flatpeft_config": options,
    }
    path = work / f"{name}.yaml"
    path.write_text(_yaml(cfg))
    return [str(Path(sys.executable).parent / "flatpeft"), "llamafactory", str(path)], out


HOSTS = {"axolotl": axolotl_run, "llamafactory": llamafactory_run}

# Loads an adapter with vanilla PEFT in a fresh process that never imports flatpeft; prints JSON.
VANILLA = r"""
import json, sys
import torch
from peft import PeftModel
from peft.utils import load_peft_weights
from transformers import AutoModelForCausalLM
model_dir, adapter_dir = sys.argv[1], sys.argv[2]
base = AutoModelForCausalLM.from_pretrained(model_dir)
saved = load_peft_weights(adapter_dir)
peft_model = PeftModel.from_pretrained(base, adapter_dir)
state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
missing = [k for k in state if k.replace(".default", "") not in saved]
unexpected = [k for k in saved if not any(k == s.replace(".default", "") for s in state)]
equal = all(torch.equal(saved[k.replace(".default", "")], v) for k, v in state.items() if k not in missing)
print(json.dumps({"keys": sorted(saved), "missing": missing, "unexpected": unexpected, "equal": equal,
                  "flatpeft_imported": "flatpeft" in sys.modules}))
"""


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.passed = self.failed = 0

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def check(self, ok: bool, text: str) -> bool:
        self.passed += bool(ok)
        self.failed += not ok
        self.say(f"  [{'ok' if ok else 'FAIL'}] {text}")
        return ok


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ["axolotl", "llamafactory", "torch", "transformers", "peft", "trl", "accelerate"]
    found = []
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return ", ".join(found)


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host", choices=sorted(HOSTS))
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--out", type=Path, help="write the report here too")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per host run")
    args = parser.parse_args()
    import shutil

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    work = args.work.resolve()
    report = Report()
    report.say(f"flatpeft integration check: {args.host}, {STEPS} optimizer steps per run, CPU")
    report.say(f"python {platform.python_version()}; {_versions()}")
    report.say(
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()} CPUs, shared"
    )
    make_fixtures(work)
    report.say(
        "fixtures: tiny random LLaMA (2 layers, hidden 32, vocab 260) and 32 Alpaca examples (local JSON)"
    )
    adapters: dict[str, dict] = {}
    for name, method, options in RUNS:
        command, out = HOSTS[args.host](work, name, method, options)
        probe = work / f"probe-{name}.json"
        env = dict(os.environ, FLATPEFT_PROBE=str(probe), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "probe"), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1")  # no telemetry (no network here)
        # as in an activated venv: axolotl starts `accelerate launch` from PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        report.say()
        report.say(f"== {name}: flatpeft_method {method}, flatpeft_config {json.dumps(options)}")
        report.say(f"   $ {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}")
        start = time.time()
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=work
            )
        except subprocess.TimeoutExpired as e:
            out_text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            done = subprocess.CompletedProcess(command, 124, out_text, f"timed out after {args.timeout} s")
        log = done.stdout + done.stderr
        (work / f"{name}.log").write_text(log)
        report.say(f"   exit {done.returncode} after {time.time() - start:.0f} s (log: {name}.log)")
        if not report.check(done.returncode == 0, "the host's CLI finished"):
            report.say("   last lines of its output:")
            for line in log.strip().splitlines()[-15:]:
                report.say(f"   | {line}")
            continue
        record = json.loads(probe.read_text()) if probe.is_file() else {}
        config = record.get("flat_config") or {}
        report.check(
            record.get("trainer", "").startswith("Flat") and config.get("method") == method,
            f"trainer {record.get('trainer')} ran flatpeft method {config.get('method')!r}",
        )
        key = STRENGTH[method]
        if key is not None:
            printed = re.findall(rf"'{key}': '?([0-9.eE+-]+)", log)  # axolotl prints values as strings
            report.check(
                len(printed) >= STEPS, f"strength {key} in the host's printed logs, per step: {printed}"
            )
        if args.host == "axolotl":  # axolotl prints its validated config: the fused kernels stay off
            kernels = {k: re.findall(rf'"{k}": (true|false)', log) for k in KERNEL_KEYS}
            report.check(
                all(v and set(v) == {"false"} for v in kernels.values()),
                f"axolotl's validated config has the fused LoRA kernels off: {kernels}",
            )
        losses = [entry["loss"] for entry in record.get("logs", []) if "loss" in entry]
        report.say(f"   logged losses: {losses}")
        before, after = record.get("frozen_before", {}), record.get("frozen_after", {})
        report.check(
            bool(before) and before == after,
            f"frozen weights bit-identical after training ({before.get('tensors')} tensors, "
            f"sha256 {str(before.get('sha256'))[:16]} -> {str(after.get('sha256'))[:16]})",
        )
        extra = sorted(p.parent.name for p in out.glob("*/adapter_config.json"))
        report.check(not extra, f"no auxiliary adapter folder saved (found: {extra or 'none'})")
        clean_env = {k: v for k, v in env.items() if k not in ("FLATPEFT_PROBE", "PYTHONPATH")}
        loaded = subprocess.run(
            [sys.executable, "-c", VANILLA, str(work / "model"), str(out)],
            env=clean_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        info = json.loads(loaded.stdout.strip().splitlines()[-1]) if loaded.returncode == 0 else {}
        stock = bool(info) and all(re.search(r"\.lora_[AB]\.weight$", k) for k in info["keys"])
        report.check(
            bool(info)
            and stock
            and not info["missing"]
            and not info["unexpected"]
            and info["equal"]
            and not info["flatpeft_imported"],
            f"adapter loads in vanilla PEFT without flatpeft: {len(info.get('keys', []))} LoRA A/B tensors, "
            f"missing {info.get('missing')}, unexpected {info.get('unexpected')}"
            + ("" if loaded.returncode == 0 else f" (load failed: {loaded.stderr.strip()[-300:]})"),
        )
        adapters[name] = _adapter(out)
    report.say()
    report.say("== adapters compared (same seed 0, same data)")
    for name, expect_equal in (("lora-again", True), ("flat_lora", False), ("bi_lora", False)):
        if "lora" not in adapters or name not in adapters:
            report.check(False, f"{name} vs lora: a run is missing")
            continue
        a, b = adapters["lora"], adapters[name]
        same_keys = a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a) if same_keys else float("nan")
        changed = sum(int((a[k] != b[k]).sum()) for k in a) if same_keys else -1
        total = sum(a[k].numel() for k in a)
        verdict = "identical" if diff == 0 else f"max |diff| {diff:.3e}, {changed} of {total} entries differ"
        want = "identical" if expect_equal else "different"
        report.check((diff == 0) == expect_equal, f"{name} vs lora: {verdict} (expected {want})")
    report.say()
    report.say(f"checks: {report.passed} passed, {report.failed} failed")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report.lines) + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
