"""Every registered method under DistributedDataParallel: 2 CPU ranks (gloo) launched by torchrun."""

from __future__ import annotations

import os

import pytest
import torch

import flatpeft
from ddp_worker import BATCH, probe, run, shard
from helpers import make_batch, tiny_bert, torchrun, trainable_state

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


def test_per_rank_noise_differs_between_ranks_and_the_reduced_gradient_agrees(ddp_results):
    """On a batch both ranks share, shared noise gives both ranks the same perturbed loss; per-rank
    noise gives rank 0 the shared draw and rank 1 its own, and DDP's all-reduce leaves one gradient."""
    shared = [_load(ddp_results, "flat_lora", r)["probe"] for r in (0, 1)]
    per_rank = [_load(ddp_results, "flat_lora:noise=per_rank", r)["probe"] for r in (0, 1)]
    assert shared[0]["loss"] == shared[1]["loss"]
    assert per_rank[0]["loss"] == shared[0]["loss"] and per_rank[1]["loss"] != per_rank[0]["loss"]
    _assert_equal(per_rank[0]["grad"], per_rank[1]["grad"])
    assert any(not torch.equal(per_rank[0]["grad"][k], shared[0]["grad"][k]) for k in shared[0]["grad"])


def _sam_by_hand(model, batch: dict, rho: float) -> dict[str, torch.Tensor]:
    """SAM on the LoRA factors written out: g = ∇L, ε = ρ·g/‖g‖, the gradient of L at θ + ε."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [p for n, p in named.items() if "lora_" in n]
    g = torch.autograd.grad(model(**batch).loss, lora)
    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(lora, g, strict=True):
            p.add_(x * (rho / norm))
    return dict(zip(named, torch.autograd.grad(model(**batch).loss, list(named.values())), strict=True))


@pytest.mark.parametrize("name", ["lora_sam", "sam_full", "fm_lora"])
def test_unsynchronised_first_pass_perturbs_each_rank_along_its_own_shard(ddp_results, name):
    """sync_first_pass=False: rank r perturbs along the gradient of its own shard, and DDP averages the
    second-pass gradients: the mean over shards of one process running the method on that shard (for
    lora_sam also written out by hand); the synchronised default perturbs along the averaged gradient."""
    got = [_load(ddp_results, f"{name}:sync_first_pass=false", r)["probe"]["grad"] for r in (0, 1)]
    _assert_equal(got[0], got[1])
    per_shard = [probe(name, r, 2)["grad"] for r in (0, 1)]  # one process, shard r of the same batch
    if name == "lora_sam":
        rho = flatpeft.make_config(name).rho
        by_hand = [_sam_by_hand(tiny_bert(), shard(make_batch(0, n=BATCH), r, 2), rho) for r in (0, 1)]
        for k in by_hand[0]:
            for r in (0, 1):
                torch.testing.assert_close(per_shard[r][k], by_hand[r][k], rtol=1e-5, atol=1e-7, msg=k)
    synced = _load(ddp_results, name, 0)["probe"]["grad"]
    assert got[0].keys() == per_shard[0].keys()
    for k in got[0]:
        mean = (per_shard[0][k] + per_shard[1][k]) / 2
        torch.testing.assert_close(got[0][k], mean, rtol=1e-5, atol=1e-7, msg=k)
    assert any(not torch.allclose(synced[k], got[0][k], rtol=1e-4, atol=1e-6) for k in synced)
