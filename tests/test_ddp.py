"""Every registered method under DistributedDataParallel: 2 CPU ranks (gloo) launched by torchrun."""

from __future__ import annotations

import os

import pytest
import torch

import flatpeft
from ddp_worker import run
from helpers import tiny_bert, torchrun, trainable_state

HERE = os.path.dirname(os.path.abspath(__file__))


# Options that change the estimator under DDP: ranks still agree, but no longer equal one process.
VARIANTS = [
    "flat_lora:noise=per_rank",
    *(f"{m}:sync_first_pass=false" for m in ("lora_sam", "sam_full", "fm_lora")),
]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(os.path.join(HERE, "ddp_worker.py"), str(out), *flatpeft.list_methods(), *VARIANTS)
    return str(out)


def _load(out: str, name: str, rank: int) -> dict:
    return torch.load(os.path.join(out, f"{name}-rank{rank}.pt"), weights_only=False)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ranks_end_with_identical_adapters(ddp_results, method_name):
    r0, r1 = _load(ddp_results, method_name, 0), _load(ddp_results, method_name, 1)
    assert r0["frozen_untouched"] and r1["frozen_untouched"]
    _assert_equal(r0["adapter"], r1["adapter"])
    _assert_equal(r0["trainer"], r1["trainer"])  # FlatTrainer under torchrun


@pytest.mark.parametrize("spec", VARIANTS)
def test_per_rank_options_keep_ranks_identical_but_change_the_estimate(ddp_results, spec):
    r0, r1 = _load(ddp_results, spec, 0), _load(ddp_results, spec, 1)
    _assert_equal(r0["adapter"], r1["adapter"])
    default = _load(ddp_results, spec.split(":")[0], 0)["adapter"]
    assert any(not torch.allclose(r0["adapter"][k], default[k], rtol=1e-4, atol=1e-5) for k in default)


def test_two_ranks_equal_one_process_on_the_concatenated_batch(ddp_results, method_name):
    single = trainable_state(run(method_name, tiny_bert()))
    ranked = _load(ddp_results, method_name, 0)["adapter"]
    for k in single:
        torch.testing.assert_close(ranked[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
