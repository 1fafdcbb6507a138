"""Every registered method under FSDP2 (``fully_shard``; DTensor parameters and gradients): 2 CPU
ranks (gloo) launched by torchrun compute what one unsharded process computes on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch

import flatpeft
from fsdp_worker import run, tensors, whole
from helpers import tiny_llama, torchrun

HERE = os.path.dirname(os.path.abspath(__file__))

# Non-default options whose sharded path differs from the default's.
VARIANTS = ["flat_lora:noise_memory=keep", "flat_lora:scope=all", "bi_lora:clip=layer", "fm_lora:norm=global"]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(os.path.join(HERE, "fsdp_worker.py"), str(out), *flatpeft.list_methods(), *VARIANTS, *REFUSED)
    return str(out)


# Options that cannot hold under FSDP2: the method must refuse them with a message naming the fix.
REFUSED = {
    "lora_sam:sync_first_pass=false": "sync_first_pass=True",
    "bilevel_lora:hypergradient=darts,lower_steps=1": "hypergradient='first_order'",
}


def _load(out: str, spec: str, rank: int) -> dict:
    return torch.load(os.path.join(out, f"{spec}-rank{rank}.pt"), weights_only=False)


@pytest.mark.parametrize("spec", [*flatpeft.list_methods(), *VARIANTS])
def test_two_sharded_ranks_equal_one_process(fsdp_results, spec):
    r0, r1 = _load(fsdp_results, spec, 0), _load(fsdp_results, spec, 1)
    assert "error" not in r0, r0.get("error")
    assert r0["frozen_untouched"] and r1["frozen_untouched"]
    assert r0["bf16_frozen_untouched"] and r1["bf16_frozen_untouched"]
    model = tiny_llama()
    method = run(spec, model)
    single = whole(model, trainable=True)  # auxiliary adapters included, as in the worker
    assert r0["adapter"].keys() == single.keys()
    for k in single:  # the update of every tensor, relative to its size (plus float32 rounding)
        update = single[k] - method.initial[k]
        assert float(update.norm()) > 0, k
        assert torch.equal(r0["initial"][k], method.initial[k]), k
        bound = 1e-4 * float(update.norm()) + 1e-6 * float(single[k].norm())
        assert float((r0["adapter"][k] - single[k]).norm()) <= bound, k
        assert torch.equal(r1["adapter"][k], r0["adapter"][k]), k
    # The method's state is gathered to whole tensors, equals one process's, and loads back sharded.
    assert not r0["state_sharded"] and r0["state_reloads"] and r1["state_reloads"]
    ours, theirs = tensors(method.state_dict()), tensors(r0["state"])
    assert len(ours) == len(theirs) and method.state_dict()["step"] == r0["state"]["step"] == 3
    for a, b in zip(ours, theirs, strict=True):
        assert float((b.float() - a.float()).norm()) <= 1e-4 * float(a.float().norm())


@pytest.mark.parametrize("spec", list(REFUSED))
def test_options_that_cannot_hold_under_sharding_are_refused(fsdp_results, spec):
    for rank in (0, 1):
        assert REFUSED[spec] in _load(fsdp_results, spec, rank).get("error", "")
