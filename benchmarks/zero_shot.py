"""The untuned model's scores on a compare config's held-out split: the "zero-shot" row of a table.

Builds the run exactly as ``flatpeft train`` would for the config's first method (same split, chat
template, generation settings) and evaluates it before any step. LoRA's B starts at zero, so the
adapted model computes exactly the base model.

    python benchmarks/zero_shot.py --config benchmarks/compare_smollm2.yaml \
        --out benchmarks/results/compare_smollm2-zero-shot.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flatpeft import train as train_lib
from flatpeft._train_config import TrainConfig
from flatpeft.cli import load_config_file

RUN_KEYS = set(TrainConfig.__dataclass_fields__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a compare or train config file (YAML/JSON)")
    parser.add_argument("--out", help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    given = load_config_file(args.config)
    options = {k: v for k, v in given.items() if k in RUN_KEYS}
    methods = given.get("methods") or ["lora"]
    options |= {"method": "lora", "seed": 0, "out": None, "progress": False}
    cfg = TrainConfig.from_dict(options)
    run = train_lib.prepare(cfg)
    if any(p.detach().abs().max() > 0 for n, p in run.model.named_parameters() if "lora_B" in n):
        raise RuntimeError("LoRA B is not zero at initialisation: this would not be the base model")
    samples: list = []
    metrics = {
        "config": args.config,
        "model": cfg.model,
        "data": cfg.data,
        "methods_compared": methods,
        "test": train_lib.evaluate(run, run.splits.test, generate=True, samples=samples),
        "samples": samples[:10],
        "fingerprint": run.splits.fingerprint,
    }
    print(json.dumps({k: metrics[k] for k in ("model", "data", "test")}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
