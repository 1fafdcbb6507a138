"""FlatTrainer with BiLoRA (``bilevel_lora``): the Trainer's own dataloader yields the split each
optimizer step reads, so every D1 example reaches the lower level once per pass and no D1 batch is
drawn on a first-order upper step; exact resume; two gloo ranks agree.

Each example carries its index as ``uid``; a FlatTrainer subclass records, at every forward, the
optimizer step, its level and the uids of the batch, and the dataset records every example drawn.
Run as a script under torchrun, this file is the 2-rank worker of ``test_two_ranks_*``.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flatpeft
from flatpeft.methods.bilevel_lora import split_indices
from helpers import assert_bit_identical, exit_worker, make_batch, tiny_bert, torchrun, trainable_state

N = 30  # D1 = 24 examples, D2 = 6 (split 0.8)


class Drawn(torch.utils.data.Dataset):
    """``N`` classification examples, each with its index as ``uid``; records every index drawn."""

    def __init__(self, n: int = N) -> None:
        batch = make_batch(0, n=n)
        self.rows = [{**{k: v[i] for k, v in batch.items()}, "uid": torch.tensor(i)} for i in range(n)]
        self.drawn: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.drawn.append(int(i))
        return self.rows[i]


class Recording(flatpeft.FlatTrainer):
    """Records ``(step, upper level, uids)`` for every forward pass the method runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, bool, tuple[int, ...]]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        uids = tuple(inputs.pop("uid").tolist())
        method = self.flat_method
        self.seen.append((method.step, method.upper_level(), uids))
        return super().compute_loss(model, inputs, *args, **kwargs)


def _trainer(out, data=None, accum=1, batch=4, method_config=None, **args) -> Recording:
    options = {
        "output_dir": str(out),
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": 1,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "remove_unused_columns": False,  # keep uid (popped in compute_loss)
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(args)
    config = {"lower_steps": 2, "upper_steps": 1, "upper_lr": 0.05, **(method_config or {})}
    return Recording(
        model=tiny_bert(),
        args=TrainingArguments(**options),
        train_dataset=data if data is not None else Drawn(),
        method="bilevel_lora",
        method_config=config,
    )


def _uids(seen, upper: bool, part: list[int] | None = None) -> list[int]:
    keep = set(part) if part is not None else None
    return [u for _, level, uids in seen if level == upper for u in uids if keep is None or u in keep]


D1, D2 = split_indices(N, 0.8, seed=0)


@pytest.mark.parametrize(("accum", "steps"), [(1, 8), (2, 4)])
def test_first_order_reads_d1_once_on_lower_steps_and_d2_on_upper_steps(tmp_path, one_thread, accum, steps):
    data = Drawn()
    trainer = _trainer(tmp_path, data, accum=accum)
    trainer.train()
    # One epoch = the steps in which the lower level sees D1 once: 24 / (4 x accum) lower steps, plus
    # the upper steps among them (T1 = 2, T2 = 1: L L U L L U L L for accum 1, L L U L for accum 2).
    assert trainer.state.global_step == steps and trainer.flat_method.step == steps
    seen = trainer.seen
    assert [s for s, _, _ in seen] == [s for s in range(steps) for _ in range(accum)]  # one forward each
    assert [upper for _, upper, _ in seen] == [s % 3 == 2 for s in range(steps) for _ in range(accum)]
    assert all(len(uids) == 4 for _, _, uids in seen)
    lower, upper = _uids(seen, False), _uids(seen, True)
    assert sorted(lower) == D1  # every D1 example exactly once, on the lower level only
    assert len(upper) == 8 and set(upper) == set(D2)  # two upper micro-batches (x accum) of 4 from D2
    assert sorted(upper[:6]) == D2  # the first pass of D2 is a permutation of it
    # Nothing is drawn that no pass reads: no D1 batch on the upper steps, no extra D2 loader.
    assert collections.Counter(data.drawn) == collections.Counter(lower + upper)
    assert any(not torch.equal(lam, torch.zeros_like(lam)) for lam in trainer.flat_method.lambdas)


def test_darts_upper_steps_read_d1_as_well_and_the_lower_level_still_reads_d1_once(tmp_path, one_thread):
    data = Drawn()
    trainer = _trainer(tmp_path, data, method_config={"hypergradient": "darts", "unroll_lr": 0.01})
    trainer.train()
    assert trainer.state.global_step == 8
    seen = trainer.seen
    assert sorted(_uids(seen, False)) == D1
    for step in (2, 5):  # the upper steps: one D2 batch (upper loss), one D1 batch run 3 times (darts)
        batches = [uids for s, upper, uids in seen if s == step and upper]
        d2 = [b for b in batches if set(b) <= set(D2)]
        d1 = [b for b in batches if set(b) <= set(D1)]
        assert len(d2) == 1 and len(d1) == 3 and len(set(d1)) == 1 and len(batches) == 4
    side = [uids for s, upper, uids in seen if upper and set(uids) <= set(D1)][::3]
    side = [u for uids in side for u in uids]
    assert len(set(side)) == 8  # its own pass over D1: no example twice
    upper_d2 = _uids(seen, True, D2)
    assert collections.Counter(data.drawn) == collections.Counter(_uids(seen, False) + upper_d2 + side)


@pytest.mark.parametrize("hypergradient", ["first_order", "darts"])
def test_resume_continues_the_same_sequence_bit_for_bit(tmp_path, one_thread, hypergradient):
    def make(out):
        config = {"hypergradient": hypergradient, "unroll_lr": 0.01}
        return _trainer(
            out,
            accum=2,
            batch=2,
            method_config=config,
            num_train_epochs=2,
            save_strategy="steps",
            save_steps=3,
        )

    # An epoch is 24 / (2 x 2) = 6 lower steps and the 2 upper ones among them (L L U L L U L L); the
    # second epoch (steps 8-15: U L L U L L U L) has one lower step less: the D1 passes run on.
    ref = make(tmp_path / "ref")
    ref.train()
    assert ref.state.global_step == 16
    lower = _uids(ref.seen, False)
    assert len(lower) == 11 * 2 * 2
    assert sorted(lower[:24]) == D1 and len(set(lower[24:])) == 20  # pass 1, then 20 of pass 2
    for checkpoint in (6, 12):  # in the first epoch, and in the second
        resumed = make(tmp_path / f"resumed-{checkpoint}")
        resumed.train(resume_from_checkpoint=str(tmp_path / "ref" / f"checkpoint-{checkpoint}"))
        assert resumed.flat_method.step == 16
        assert resumed.seen == [r for r in ref.seen if r[0] >= checkpoint]
        assert_bit_identical(trainable_state(ref.model), trainable_state(resumed.model))
        for a, b in zip(ref.flat_method.lambdas, resumed.flat_method.lambdas, strict=True):
            assert torch.equal(a, b)


def test_the_stream_depends_on_the_seed_and_other_methods_keep_the_trainer_loader(tmp_path, one_thread):
    a, b = _trainer(tmp_path, seed=0), _trainer(tmp_path, seed=0)
    c = _trainer(tmp_path, seed=1)
    orders = [list(t.get_train_dataloader().batch_sampler) for t in (a, b, c)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    # A run whose steps all read D1 (T1 = 4 > max_steps) keeps the Trainer's loader over D1 alone.
    plain = _trainer(tmp_path, method_config={"lower_steps": 4}, max_steps=4)
    assert len(plain.get_train_dataloader().dataset) == len(D1)
    lora = flatpeft.FlatTrainer(
        model=tiny_bert(),
        args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        train_dataset=Drawn(),
        method="lora",
    )
    assert len(lora.get_train_dataloader().dataset) == N


def test_user_given_upper_dataset(tmp_path, one_thread):
    data = Drawn()
    upper = torch.utils.data.Subset(data, list(range(24, 30)))
    train = torch.utils.data.Subset(data, list(range(24)))
    trainer = Recording(
        model=tiny_bert(),
        args=_trainer(tmp_path).args,
        train_dataset=train,
        upper_dataset=upper,
        method="bilevel_lora",
        method_config={"lower_steps": 2, "upper_steps": 1},
    )
    trainer.train()
    assert sorted(_uids(trainer.seen, False)) == list(range(24))
    assert set(_uids(trainer.seen, True)) == set(range(24, 30))


# -- two gloo ranks ---------------------------------------------------------------------------------


def _ddp_run(out: str, hypergradient: str, batch: int, **args) -> dict:
    # average_tokens_across_devices=False: otherwise the Trainer multiplies the loss by the number of
    # processes for a model whose forward takes **kwargs (PEFT's), though this one averages its loss.
    config = {"hypergradient": hypergradient, "unroll_lr": 0.01}
    trainer = _trainer(
        os.path.join(out, hypergradient),
        batch=batch,
        method_config=config,
        average_tokens_across_devices=False,
        **args,
    )
    trainer.train()
    return {
        "adapter": trainable_state(trainer.model),
        "lambda": [lam.detach().clone() for lam in trainer.flat_method.lambdas],
        "seen": trainer.seen,
        "steps": trainer.state.global_step,
    }


def _worker(out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    for hypergradient in ("first_order", "darts"):
        result = _ddp_run(
            out, hypergradient, batch=2, ddp_backend="gloo"
        )  # 2 ranks x 2 = the 4 of one process
        torch.save(result, os.path.join(out, f"{hypergradient}-rank{dist.get_rank()}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(os.path.abspath(__file__), str(out))
    return str(out)


@pytest.mark.parametrize("hypergradient", ["first_order", "darts"])
def test_two_ranks_agree_and_share_the_stream(two_ranks, tmp_path, one_thread, hypergradient):
    r0, r1 = (
        torch.load(os.path.join(two_ranks, f"{hypergradient}-rank{r}.pt"), weights_only=False) for r in (0, 1)
    )
    assert r0["steps"] == r1["steps"] == 8
    assert_bit_identical(r0["adapter"], r1["adapter"])
    for a, b in zip(r0["lambda"], r1["lambda"], strict=True):
        assert torch.equal(a, b)
    # Between them the ranks read every D1 example once on the lower level, each half a micro-batch.
    lower = _uids(r0["seen"], False) + _uids(r1["seen"], False)
    assert sorted(lower) == D1 and not set(_uids(r0["seen"], False)) & set(_uids(r1["seen"], False))
    # The same global micro-batches as one process with the whole batch of 4 (first order: the same
    # update up to the order of summation).
    single = _ddp_run(str(tmp_path), hypergradient, batch=4)
    merged = [
        (s, up, tuple(sorted(a + b))) for (s, up, a), (_, _, b) in zip(r0["seen"], r1["seen"], strict=True)
    ]
    assert merged == [(s, up, tuple(sorted(u))) for s, up, u in single["seen"]]
    if hypergradient == "first_order":
        for k, v in single["adapter"].items():
            torch.testing.assert_close(r0["adapter"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        for a, b in zip(r0["lambda"], single["lambda"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":  # the torchrun worker
    import torch.distributed as dist

    dist.init_process_group("gloo")
    _worker(sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
    exit_worker()
