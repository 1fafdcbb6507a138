"""Worker for tests/test_fsdp.py: ``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT SPEC...``.

Each rank trains every listed method spec on its half of the same batches through a tiny LLaMA
sharded with FSDP2 (``fully_shard`` per decoder layer, then the model; gloo, CPU) and saves the
whole adapter, the method's state, whether the frozen weights stayed bit-identical (fp32, and a bf16
model trained the same way), and whether a method attached to a fresh sharded model and loaded with
that state gives the state back.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flatpeft
from ddp_worker import STEPS, parse, train_steps
from flatpeft._sharded import full, is_sharded
from flatpeft.integrations.fsdp import shard_model
from helpers import defaults_for, exit_worker, lm_batch, tiny_llama


def run(spec: str, model, rank: int = 0, world: int = 1, sharded: bool = False):
    """Train ``spec`` for STEPS SGD steps on shard ``rank`` of the fixed batches; return the method.

    Plain SGD: the update is the gradient itself, so comparing updates compares gradients (an adaptive
    optimizer would magnify float noise in entries whose gradient is near zero).
    """
    name, options = parse(spec)
    method = flatpeft.attach(model, name, **defaults_for(name, total_steps=STEPS + 1, **options))
    method.initial = whole(model, trainable=True)
    if sharded:
        shard_model(model)
    optimizer = torch.optim.SGD(method.param_groups(0.0), lr=0.5)
    method.bind(optimizer)
    train_steps(method, model, optimizer, lm_batch, rank, world)
    return method


def whole(model, trainable: bool) -> dict[str, torch.Tensor]:
    """Every (trainable or frozen) parameter as a whole tensor (gathered when sharded)."""
    return {n: full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for item in obj for t in tensors(item)] if isinstance(obj, (list, tuple)) else []


def frozen_untouched(spec: str, rank: int, world: int, dtype: torch.dtype) -> bool:
    model = tiny_llama(dtype=dtype)
    frozen = whole(model, trainable=False)
    run(spec, model, rank, world, sharded=True)
    return all(torch.equal(frozen[k], v) for k, v in whole(model, trainable=False).items())


def reloaded_state_matches(spec: str, state: dict) -> bool:
    """Attach to a fresh model, shard it, load ``state``: the method's state must come back exactly."""
    name, options = parse(spec)
    model = tiny_llama(seed=1)
    method = flatpeft.attach(model, name, **defaults_for(name, total_steps=STEPS + 1, **options))
    shard_model(model)
    method.load_state_dict(state)
    again = tensors(method.state_dict())
    return len(again) == len(tensors(state)) and all(
        torch.equal(a, b) for a, b in zip(again, tensors(state), strict=True)
    )


def main(out: str, specs: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for spec in specs:
        model = tiny_llama()
        frozen = whole(model, trainable=False)
        try:
            method = run(spec, model, rank, world, sharded=True)
        except (ValueError, TypeError) as e:  # a method that refuses sharding must say so clearly
            torch.save({"error": str(e)}, os.path.join(out, f"{spec}-rank{rank}.pt"))
            continue
        untouched = all(torch.equal(frozen[k], v) for k, v in whole(model, trainable=False).items())
        state = method.state_dict()
        adapter = whole(model, trainable=True)
        method.detach()
        result = {
            "initial": method.initial,
            "adapter": adapter,
            "frozen_untouched": untouched,
            "bf16_frozen_untouched": frozen_untouched(spec, rank, world, torch.bfloat16),
            "state": state,
            "state_sharded": any(is_sharded(t) for t in tensors(state)),
            "state_reloads": reloaded_state_matches(spec, state),
        }
        torch.save(result, os.path.join(out, f"{spec}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    exit_worker()
