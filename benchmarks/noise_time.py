"""Seconds Flat-LoRA's noise path takes per optimizer step on CPU: the path before the memory-floor
change against the current one, interleaved in one process (this machine's load hits both alike).

For every adapted layer shape of a model (SmolLM2-135M: 30 blocks × q, k, v, o, gate, up, down;
MiniLM: 6 blocks × query, key, value, attention output, intermediate, output), one draw of W0 + ε is
timed with each path, in rounds that alternate the order; a regenerating step draws twice per layer.

- ``before``: the code this change replaced (``git show 4296ad5:src/flatpeft/perturb.py``): one
  ``torch.randn`` in fp32 from one generator per layer, ``mul_`` by the row std, ``add_`` of W0 (in
  fp32), a cast to the compute dtype, a fresh tensor every time;
- ``after``: ``flatpeft._noise.noisy_rows`` with the method's reused workspace: chunked draws on
  ``torch.get_num_threads()`` threads, one ``addcmul``.

    PYTHONPATH=src python benchmarks/noise_time.py --model smollm2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from flatpeft import _noise

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # (m, n): layers of that shape
    "smollm2": {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30},
    "minilm": {(384, 384): 24, (1536, 384): 6, (384, 1536): 6},
}


def before(w: torch.Tensor, std: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The replaced implementation (perturb._make_rows and filter_noise at 4296ad5)."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    noise = noise.mul_(std.unsqueeze(1))
    return noise.to(torch.promote_types(noise.dtype, w.dtype)).add_(w).to(dtype)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    layers = {
        s: (torch.randn(s, generator=gen).to(dtype), torch.rand(s[0], generator=gen))
        for s in SHAPES[args.model]
    }
    workspace = _noise.NoiseWorkspace()

    def after(w, std, seed, dt):
        return _noise.noisy_rows(w, std, w.shape[1], seed, dt, workspace, reuse_out=True)

    paths = {"before": before, "after": after}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds + 1):  # round 0 warms up (allocations, the thread pool)
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            start = time.perf_counter()
            for (m, n), (w, std) in layers.items():
                for i in range(2 * SHAPES[args.model][m, n]):  # two draws per layer: regenerate
                    paths[name](w, std, i, dtype)
            if r:
                times[name].append(time.perf_counter() - start)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "precision": args.precision,
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
        "round_seconds": times,
        "after_over_before_per_round": [a / b for a, b in zip(times["after"], times["before"], strict=True)],
    }
    try:
        import os

        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    out = args.out or RESULTS / f"noise-time-cpu-{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_step", "after_over_before_per_round")}, indent=1))
    return result


if __name__ == "__main__":
    main()
