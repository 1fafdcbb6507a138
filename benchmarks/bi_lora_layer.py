"""One LoRA layer, forward + backward: plain LoRA vs Bi-LoRA's primary + auxiliary adapters, run as
two PEFT adapters and as the fused rank-(r1 + r2) branch ``bi_lora`` uses (``_peft.fused_adapters``).

    python benchmarks/bi_lora_layer.py                 # 384 → 1536, 2048 tokens, r = 8 + 8
    python benchmarks/bi_lora_layer.py --out 1536 --tokens 4096

Interleaved rounds; prints the median milliseconds per pass of each variant and its ratio to LoRA,
and writes them with the settings and the machine to ``--json``
(default ``benchmarks/results/bi-lora-layer-<device>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import peft
import torch
from report import machine
from torch import nn

from flatpeft import _peft


class _Layer(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--in-features", type=int, default=384)
    parser.add_argument("--out", type=int, default=1536, help="out features")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None, help="where to write the result")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["lin"])
    model = peft.get_peft_model(_Layer(args.in_features, args.out), config)
    layers = _peft.add_aux_adapter(model, "default", "aux", args.rank)
    x = torch.randn(args.tokens, args.in_features)
    variants = {
        "lora": contextlib.nullcontext,
        "two adapters": lambda: _peft.adapters_active(layers, ["default", "aux"]),
        "fused": lambda: _peft.fused_adapters(layers, "default", "aux"),
    }

    def one_pass(context) -> None:
        with context():
            model(x).sum().backward()

    times: dict[str, list[float]] = {name: [] for name in variants}
    for context in variants.values():  # warm-up
        for _ in range(3):
            one_pass(context)
    for _ in range(args.rounds):
        for name, context in variants.items():
            start = time.perf_counter()
            for _ in range(args.passes):
                one_pass(context)
            times[name].append((time.perf_counter() - start) / args.passes * 1e3)
    result = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in result.items():
        print(f"{name:13s} {ms:7.2f} ms/pass  {ms / result['lora']:.2f}× lora")
    out = args.json or Path(__file__).resolve().parent / "results" / "bi-lora-layer-cpu.json"
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "ms_per_pass": result,
        "ratio_to_lora": {name: ms / result["lora"] for name, ms in result.items()},
        "round_ms": times,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
