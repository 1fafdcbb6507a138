"""Worker for tests/test_ddp.py: ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT METHOD...``.

Each rank trains every listed method on its half of the same batches through a
DistributedDataParallel-wrapped PEFT model (gloo, CPU) and saves its adapter.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flatpeft
from helpers import defaults_for, exit_worker, frozen_state, make_batch, tiny_bert, trainable_state

STEPS, BATCH = 3, 8


def shard(batch: dict, rank: int, world: int) -> dict:
    size = BATCH // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def parse(spec: str) -> tuple[str, dict]:
    """``"flat_lora:noise=per_rank"`` -> ("flat_lora", {"noise": "per_rank"}) (values: bool/int/str)."""
    name, _, opts = spec.partition(":")
    out = {}
    for item in filter(None, opts.split(",")):
        key, value = item.split("=")
        out[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    return name, out


def train_steps(method, net, optimizer, make, rank: int, world: int) -> None:
    """STEPS optimizer steps, step t on shard ``rank`` of ``make(t)`` (upper batches: ``make(50 + t)``)."""
    for step in range(STEPS):
        batch = shard(make(step, n=BATCH), rank, world)
        upper = shard(make(50 + step, n=BATCH), rank, world)
        extra = {"upper_loss_fn": lambda u=upper: net(**u).loss} if method.needs_upper_loss else {}
        method.backward(lambda b=batch: net(**b).loss, **extra)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(spec: str, model, rank: int = 0, world: int = 1, wrap=lambda m: m):
    """Train ``spec`` for STEPS steps on shard ``rank`` of the fixed batches; used by both sides."""
    name, options = parse(spec)
    method = flatpeft.attach(model, name, **defaults_for(name, total_steps=STEPS + 1, **options))
    net = wrap(model)
    method.set_wrapper(net)
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    method.bind(optimizer)
    train_steps(method, net, optimizer, make_batch, rank, world)
    method.detach()
    return model


def probe(spec: str, rank: int, world: int, wrap=lambda m: m) -> dict:
    """One ``backward`` at optimizer step 2 on a fresh model (a σ ramp is past 0 there): ``loss``, this
    rank's loss on a batch every rank shares, and ``grad``, the gradients of this rank's shard of
    ``make_batch(0)`` (reduced over ranks when ``wrap`` is DDP)."""
    name, options = parse(spec)
    model = tiny_bert()
    method = flatpeft.attach(model, name, **defaults_for(name, total_steps=STEPS + 1, **options))
    net = wrap(model)
    method.set_wrapper(net)
    method.step = 2
    same = make_batch(5, n=BATCH // world)
    loss = float(method.backward(lambda: net(**same).loss))
    model.zero_grad(set_to_none=True)
    batch = shard(make_batch(0, n=BATCH), rank, world)
    method.backward(lambda: net(**batch).loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.detach()
    return {"loss": loss, "grad": grads}


def run_trainer(name: str, out: str) -> dict:
    """FlatTrainer under torchrun: the Trainer wraps the model in DDP itself."""
    from transformers import TrainingArguments

    model = tiny_bert()
    batch = make_batch(7, n=16)
    data = [{k: v[i] for k, v in batch.items()} for i in range(16)]
    args = TrainingArguments(
        output_dir=os.path.join(out, f"trainer-{name}"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    trainer = flatpeft.FlatTrainer(model=model, args=args, train_dataset=data, method=name)
    trainer.train()
    assert trainer.flat_method.step == 2
    return trainable_state(model)


def main(out: str, names: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for spec in names:
        model = tiny_bert()
        frozen = frozen_state(model)
        run(spec, model, rank, world, wrap=DistributedDataParallel)
        untouched = all(torch.equal(frozen[k], v) for k, v in frozen_state(model).items())
        result = {"adapter": trainable_state(model), "frozen_untouched": untouched}
        if ":" not in spec:
            result["trainer"] = run_trainer(spec, out)
        if not flatpeft.get_method(parse(spec)[0]).needs_upper_loss:
            result["probe"] = probe(spec, rank, world, wrap=DistributedDataParallel)
        torch.save(result, os.path.join(out, f"{spec}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    exit_worker()
