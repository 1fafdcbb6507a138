"""FSDP2 against one process, every method: how far the sharded update is from the unsharded one.

    python benchmarks/fsdp_equivalence.py        # 2 CPU ranks (gloo), tiny LLaMA, 3 SGD steps

Runs ``tests/fsdp_worker.py`` under ``torchrun --nproc_per_node 2`` (``fully_shard`` on each decoder
layer, then the model; each rank trains on its half of every batch), trains the same specs in this
process on the whole batches, and writes, per spec, the largest relative difference over the adapter's
tensors of their update ‖Δ_fsdp − Δ_1‖ / ‖Δ_1‖ and of the trained weights, to
``benchmarks/results/fsdp-vs-one-process-cpu.json``; prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")
sys.path.insert(0, TESTS)

import flatpeft  # noqa: E402
from fsdp_worker import run, whole  # noqa: E402
from helpers import tiny_llama, torchrun  # noqa: E402
from test_fsdp import VARIANTS  # noqa: E402

SPECS = [*flatpeft.list_methods(), *VARIANTS]


def main() -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        torchrun(os.path.join(TESTS, "fsdp_worker.py"), out, *SPECS)
        rows = {}
        for spec in SPECS:
            sharded = torch.load(os.path.join(out, f"{spec}-rank0.pt"), weights_only=False)
            model = tiny_llama()
            method = run(spec, model)
            single = whole(model, trainable=True)
            diff = {k: (sharded["adapter"][k] - single[k]).norm() for k in single}
            rows[spec] = {
                "max_relative_update_difference": max(
                    float(diff[k] / (single[k] - method.initial[k]).norm()) for k in single
                ),
                "max_relative_weight_difference": max(float(diff[k] / single[k].norm()) for k in single),
                "frozen_untouched": sharded["frozen_untouched"],
            }
    result = {
        "what": "max over adapter tensors of |W_fsdp - W_1proc| / |update_1proc| and / |W_1proc|, 3 SGD",
        "model": "tiny LLaMA (2 layers, hidden 32), LoRA r=4 on all linear layers",
        "ranks": 2,
        "backend": "gloo (CPU)",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    path = os.path.join(HERE, "results", "fsdp-vs-one-process-cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print("| method | max ‖Δ_fsdp − Δ_1‖/‖Δ_1‖ (update) | max ‖W_fsdp − W_1‖/‖W_1‖ (adapter) |")
    print("|---|---|---|")
    for spec, row in rows.items():
        update, weight = row["max_relative_update_difference"], row["max_relative_weight_difference"]
        print(f"| `{spec}` | {update:.1e} | {weight:.1e} |")
    return result


if __name__ == "__main__":
    main()
