"""A flatpeft method under DistributedDataParallel in a plain loop.

    torchrun --nproc_per_node 2 examples/ddp.py [--method flat_lora] [--steps 30]

Attach before wrapping (a method may add parameters, e.g. Bi-LoRA's auxiliary branch), wrap, then
``method.set_wrapper(ddp_model)`` so two-pass methods can skip the first-pass all-reduce when
``sync_first_pass=False``. Every rank ends with the same adapter; rank 0 saves it.
"""

import argparse
import os

import peft
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

import flatpeft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="flat_lora", choices=flatpeft.list_methods())
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/ddp_adapter")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")

    torch.manual_seed(0)  # identical initial weights on every rank
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=3)  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS")
    model = peft.get_peft_model(BertForSequenceClassification(config), lora).to(device)
    method = flatpeft.attach(model, args.method, total_steps=args.steps)  # 1. attach
    ddp = DistributedDataParallel(model, find_unused_parameters=method.needs_upper_loss)  # 2. wrap
    method.set_wrapper(ddp)
    optimizer = torch.optim.AdamW(method.param_groups(0.01), lr=3e-3)
    method.bind(optimizer)

    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        ids = torch.randint(1, 100, (2 * 16, 16), generator=gen)  # the global batch ...
        mine = ids[rank::world].to(device)  # ... and this rank's shard
        batch = {"input_ids": mine, "labels": mine[:, 0] % 3}
        upper = {"input_ids": mine.flip(0), "labels": mine.flip(0)[:, 0] % 3}
        extra = {"upper_loss_fn": lambda u=upper: ddp(**u).loss} if method.needs_upper_loss else {}
        loss = method.backward(lambda b=batch: ddp(**b).loss, **extra)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    method.detach()  # back to a vanilla PeftModel; the method lets go of the DDP wrapper
    if rank == 0:
        model.save_pretrained(args.out)
    ddp = None  # free DDP while the process group is up (freed after it is destroyed, gloo can hang)
    dist.barrier()  # no rank tears the process group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
