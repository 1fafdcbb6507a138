"""``FlatTrainer`` equals the plain loop: for every method, N optimizer steps through the Trainer leave
the adapter that a plain loop leaves with the same seed, the same micro-batches in the same order, the
same optimizer, LR schedule and gradient clipping, in fp32, under bf16 autocast, and under fp16
autocast with a gradient scaler.

The Trainer's micro-batches are recorded as ``training_step`` receives them and replayed by the plain
loop, which routes each to ``loss_fn`` or ``upper_loss_fn`` by ``Method.data_used`` (the declared data
flow). Accelerate runs fp16 only on accelerators: on CPU the fp16 case gives the Trainer's accelerator
what it builds on a GPU (fp16 autocast around the model's forward and a ``GradScaler``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import TrainingArguments, get_linear_schedule_with_warmup

import flatpeft
from flatpeft.method import unread_loss
from helpers import make_batch, tiny_bert, trainable_state

STEPS, BATCH, ACCUM, LR = 5, 4, 2, 1e-2  # 5 steps: BiLoRA's first upper step is step 4
CLIP = 0.02  # below every step's gradient norm: each step clips clip_parameters()
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Recording(flatpeft.FlatTrainer):
    """Records every micro-batch the Trainer hands to ``training_step``, in order."""

    def __init__(self, *args, precision: str = "fp32", **kwargs) -> None:
        self.micro_batches: list[dict[str, torch.Tensor]] = []
        self._precision = precision
        super().__init__(*args, **kwargs)
        # BERT's classification loss is a mean that ignores num_items_in_batch, which the Trainer would
        # then not divide by the accumulation steps: divide, like the stock Trainer on such models.
        self.model_accepts_loss_kwargs = False

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self._precision == "fp16" and self.accelerator.scaler is None:  # CPU: what a GPU run gets
            self.accelerator.native_amp = True
            self.accelerator.scaler = torch.amp.GradScaler(self.args.device.type)

    def training_step(self, model, inputs, *args, **kwargs):
        self.micro_batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


def _dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    batch = make_batch(3, n=n)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def trainer_run(name: str, options: dict, precision: str, out) -> Recording:
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=CLIP,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    trainer = Recording(
        model=tiny_bert().to(args.device),
        args=args,
        train_dataset=_dataset(),
        method=name,
        method_config=options,
        precision=precision,
    )
    trainer.train()
    return trainer


def plain_run(name: str, options: dict, precision: str, micro_batches: list[dict], device) -> dict:
    """The plain loop of the README, with the Trainer's choices written out: AdamW, linear decay, loss
    divided by the accumulation steps, clipping of ``clip_parameters()``, the scaler's usual calls."""
    model = tiny_bert().to(device)
    method = flatpeft.attach(model, name, total_steps=STEPS, **options)  # seed 0, the Trainer's seed
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=LR)
    method.bind(optimizer)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    backward = (lambda loss: scaler.scale(loss).backward()) if scaler else None

    def closure(batch):
        def loss_fn():
            context = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with context:
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            return loss.float() / ACCUM

        return loss_fn

    batches = iter(micro_batches)
    for step in range(STEPS):
        reads, reads_upper = method.data_used(method.config, step)
        for _ in range(ACCUM):
            loss_fn = closure(next(batches))
            upper = (
                {"upper_loss_fn": loss_fn if reads_upper else unread_loss} if method.needs_upper_loss else {}
            )
            method.backward(
                loss_fn if reads else unread_loss,
                backward_fn=backward,
                **(upper if method.needs_upper_loss else {}),
            )
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(method.clip_parameters(), CLIP)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    assert next(batches, None) is None  # every recorded micro-batch was used
    method.detach()
    return trainable_state(model)


# Options that change the data flow: two upper steps in a row (L L U U L) read λ's gradient twice.
VARIANTS = {"bilevel_lora:upper_steps=2": ("bilevel_lora", {"lower_steps": 2, "upper_steps": 2})}


@pytest.fixture(params=[*flatpeft.list_methods(), *VARIANTS])
def method_spec(request) -> tuple[str, dict]:
    """``(name, options)``: every registered method with its defaults, and the variants above."""
    return VARIANTS.get(request.param, (request.param, {}))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_flat_trainer_equals_the_plain_loop(method_spec, precision, tmp_path):
    method_name, options = method_spec
    trainer = trainer_run(method_name, options, precision, tmp_path)
    assert trainer.flat_method.step == STEPS and len(trainer.micro_batches) == STEPS * ACCUM
    trainer.flat_method.detach()
    got = trainable_state(trainer.model)
    want = plain_run(method_name, options, precision, trainer.micro_batches, trainer.args.device)
    assert got.keys() == want.keys()
    start = trainable_state(tiny_bert())
    for k in want:
        moved = (want[k] - start[k].to(want[k].device)).abs().max()
        assert moved > 0, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6 * float(moved), msg=k)
