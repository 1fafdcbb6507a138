"""Bi-LoRA (``bi_lora``): gradients, clipping and the update checked against independent computations."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn
from transformers import TrainingArguments

import flatpeft
from flatpeft import _peft
from flatpeft.methods.bi_lora import AUX_ADAPTER
from helpers import assert_bit_identical, make_batch, tiny_bert, tiny_gpt2, trainable_state


def _lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = make_batch(seed)["input_ids"]
    return {"input_ids": ids, "labels": ids}


MODELS = {
    "bert": (tiny_bert, make_batch),
    "gpt2_fan_in_fan_out": (tiny_gpt2, _lm_batch),
    "bert_dora": (lambda: tiny_bert(use_dora=True), make_batch),
}


def _set_aux(method, std: float = 0.3, seed: int = 0, scale_layers=None) -> None:
    """Overwrite every auxiliary factor with N(0, std²) (layer i times ``scale_layers(i)``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (b, a) in enumerate(method.factors):
            k = 1.0 if scale_layers is None else scale_layers(i)
            b.copy_(torch.randn(b.shape, generator=gen) * std * k)
            a.copy_(torch.randn(a.shape, generator=gen) * std)


def _explicit_norms(method) -> torch.Tensor:
    """‖s2·B2A2‖_F per layer, forming B2A2 explicitly in float64."""
    out = []
    for (b, a), s in zip(method.factors, method.scalings, strict=True):
        delta = b.detach().double().reshape(b.shape[0], -1) @ a.detach().double().reshape(a.shape[0], -1)
        out.append((s * delta).norm())
    return torch.stack(out)


def _true_grads(make_model, method, batches):
    """∇ Σ_batches L at W0 + s1·B1A1 + s2·B2A2 on a fresh copy of the model, with the auxiliary term
    added by forward hooks on the LoRA layers' outputs (no PEFT multi-adapter machinery involved)."""
    fresh = make_model()
    layers = [layer for _, layer in _peft.lora_layers(fresh, "default")]
    aux = [
        (b.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()) for b, a in method.factors
    ]
    for layer, (b, a), s in zip(layers, aux, method.scalings, strict=True):
        layer.register_forward_hook(lambda m, args, out, b=b, a=a, s=s: out + s * (args[0] @ a.t() @ b.t()))
    named = [(n, p) for n, p in fresh.named_parameters() if p.requires_grad]
    loss = sum(fresh(**batch).loss for batch in batches)
    leaves = [p for _, p in named] + [t for pair in aux for t in pair]
    grads = torch.autograd.grad(loss, leaves)
    return dict(zip([n for n, _ in named], grads[: len(named)], strict=True)), list(grads[len(named) :])


@pytest.mark.parametrize("kind", list(MODELS))
def test_grads_are_true_gradient_at_perturbed_point(kind):
    make_model, make_data = MODELS[kind]
    model = make_model()
    method = flatpeft.attach(model, "bi_lora", rho=0.5, aux_init="random", aux_r=2)
    assert math.isclose(method.aux_norm(), 0.5, rel_tol=1e-5)  # random start sits on the boundary
    batches = [make_data(1), make_data(2)]
    for batch in batches:  # gradient accumulation: two micro-batches, one step
        method.backward(lambda batch=batch: model(**batch).loss)

    primary, aux = _true_grads(make_model, method, batches)
    aux_ids = {id(p) for p in method.aux_params}
    got = {n: p.grad for n, p in model.named_parameters() if id(p) not in aux_ids and p.requires_grad}
    assert got.keys() == primary.keys()
    for name, g in primary.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
    for p, g in zip(method.aux_params, aux, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, -g, rtol=1e-5, atol=1e-6)  # ascent on the accumulated gradient


FUSION_CASES = {
    "bert": (lambda: tiny_bert(), make_batch, True),
    "bert_dropout": (lambda: tiny_bert(dropout=0.1), make_batch, True),
    "gpt2_fan_in_fan_out": (tiny_gpt2, _lm_batch, True),
    "bert_dora": (lambda: tiny_bert(use_dora=True), make_batch, False),
}


@pytest.mark.parametrize("kind", list(FUSION_CASES))
def test_fused_pass_equals_peft_two_adapter_pass(kind):
    """The rank-(r1+r2) fused branch is PEFT's two-adapter forward: same loss, same gradients for
    every factor (dropout masks included); DoRA layers are left to PEFT."""
    make_model, make_data, fused = FUSION_CASES[kind]
    model = make_model()
    model.train()
    method = flatpeft.attach(model, "bi_lora", rho=0.5, aux_init="random", aux_r=3)
    calls = []
    for layer in method.aux_layers:
        layer.lora_A[AUX_ADAPTER].register_forward_hook(lambda *_: calls.append(1))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = make_data(3)

    def run(context):
        calls.clear()
        torch.manual_seed(11)
        with context as unfused:
            loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params)
        return loss, grads, len(calls), unfused

    loss, grads, n_calls, unfused = run(_peft.fused_adapters(method.aux_layers, method.adapter, AUX_ADAPTER))
    ref_loss, ref_grads, ref_calls, _ = run(
        _peft.adapters_active(method.aux_layers, [method.adapter, AUX_ADAPTER])
    )
    assert ref_calls == len(method.aux_layers)
    assert n_calls == (0 if fused else ref_calls)  # fused layers never call the auxiliary modules
    assert len(unfused) == (0 if fused else len(method.aux_layers))
    # The fused branch trains the auxiliary factors by ascent: their gradient is negated in the graph.
    ascent = {
        id(p)
        for layer in method.aux_layers
        if layer not in unfused
        for p in _peft.aux_factors(layer, AUX_ADAPTER)
    }
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for p, g, ref in zip(params, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, -ref if id(p) in ascent else ref, rtol=1e-5, atol=1e-6)
    assert all("forward" not in layer.__dict__ for layer in method.aux_layers)
    assert model.active_adapters == ["default"]


def test_gram_norms_match_explicit_product():
    method = flatpeft.attach(tiny_bert(), "bi_lora")
    _set_aux(method)
    torch.testing.assert_close(method.layer_norms().double(), _explicit_norms(method), rtol=1e-5, atol=0)


def test_global_clip_lands_on_rho():
    method = flatpeft.attach(tiny_bert(), "bi_lora", rho=0.05)
    _set_aux(method)
    before = [p.detach().clone() for p in method.aux_params]
    c = float(_explicit_norms(method).pow(2).sum().sqrt())
    assert c > 10 * 0.05
    method.after_step()
    assert float(_explicit_norms(method).pow(2).sum().sqrt()) == pytest.approx(0.05, rel=1e-5)
    factor = math.sqrt(0.05 / c)
    for p, old in zip(method.aux_params, before, strict=True):
        torch.testing.assert_close(p.detach(), old * factor, rtol=1e-5, atol=1e-8)


def test_global_clip_leaves_small_perturbation_alone():
    method = flatpeft.attach(tiny_bert(), "bi_lora", rho=0.05)
    _set_aux(method, std=0.01)
    assert float(_explicit_norms(method).pow(2).sum().sqrt()) < 0.05
    before = [p.detach().clone() for p in method.aux_params]
    method.after_step()
    assert all(torch.equal(p, old) for p, old in zip(method.aux_params, before, strict=True))


def test_layer_clip_bounds_each_layer():
    method = flatpeft.attach(tiny_bert(), "bi_lora", rho=0.05, clip="layer")
    _set_aux(method, std=0.1, scale_layers=lambda i: 10.0 if i % 2 == 0 else 0.001)
    norms = _explicit_norms(method)
    assert (norms[0::2] > 0.05).all() and (norms[1::2] < 0.05).all()
    before = [p.detach().clone() for p in method.aux_params]
    method.after_step()
    after = _explicit_norms(method)
    torch.testing.assert_close(after[0::2], torch.full_like(after[0::2], 0.05), rtol=1e-5, atol=0)
    assert after.pow(2).sum().sqrt() > 0.05  # the global norm is not bounded in this mode
    for i, (b, a) in enumerate(method.factors):
        if i % 2 == 1:
            assert torch.equal(b, before[2 * i]) and torch.equal(a, before[2 * i + 1])


def test_no_clip_leaves_aux_free():
    method = flatpeft.attach(tiny_bert(), "bi_lora", rho=0.05, clip="none")
    _set_aux(method)
    before = [p.detach().clone() for p in method.aux_params]
    method.after_step()
    assert all(torch.equal(p, old) for p, old in zip(method.aux_params, before, strict=True))


def _f64(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("rho", [0.05, 5.0])  # clipping fires / does not fire
def test_one_sgd_step_matches_paper_update(rho):
    # Hand-set values, kept in float64 for the closed form; the model holds them in float32.
    t = _f64
    w0 = t([0.5, -1.0, 0.25], [1.5, 0.0, -0.5])
    b1, a1 = t([0.1, -0.2], [0.3, 0.05]), t([0.2, 0.4, -0.6], [-0.1, 0.3, 0.5])
    b2, a2 = t([0.3], [-0.2]), t([0.5, -0.4, 0.1])
    x = t([1.0, 2.0, -1.0], [0.5, -0.5, 2.0], [-1.5, 1.0, 0.0], [0.0, 1.0, 1.0])
    y = t([0.3, -0.7], [1.1, 0.2], [-0.4, 0.9], [0.6, 0.6])
    s1, s2, lr = 4 / 2, 4 / 1, 0.01

    model = peft.get_peft_model(_Tiny(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    method = flatpeft.attach(model, "bi_lora", rho=rho, aux_r=1)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(w0)
        layer.lora_B["default"].weight.copy_(b1)
        layer.lora_A["default"].weight.copy_(a1)
        layer.lora_B[AUX_ADAPTER].weight.copy_(b2)
        layer.lora_A[AUX_ADAPTER].weight.copy_(a2)
    assert method.scalings == [s2]
    opt = torch.optim.SGD(method.parameters(), lr=lr)
    method.bind(opt)
    loss = method.backward(lambda: 0.5 * (model(x.float()) - y.float()).pow(2).sum())
    opt.step()

    # Closed form: L = ½‖x Wᵀ − y‖², W = W0 + s1·B1A1 + s2·B2A2, G = ∂L/∂W = (x Wᵀ − y)ᵀ x.
    w = w0 + s1 * b1 @ a1 + s2 * b2 @ a2
    g = (x @ w.t() - y).t() @ x
    assert float(loss) == pytest.approx(0.5 * float((x @ w.t() - y).pow(2).sum()), rel=1e-6)
    b1_new, a1_new = b1 - lr * s1 * g @ a1.t(), a1 - lr * s1 * b1.t() @ g  # descent
    b2_new, a2_new = b2 + lr * s2 * g @ a2.t(), a2 + lr * s2 * b2.t() @ g  # ascent
    c = float((s2 * b2_new @ a2_new).norm())
    assert (c > rho) == (rho == 0.05)
    if c > rho:  # projection back onto ‖s2·B2A2‖ = ρ
        b2_new, a2_new = b2_new * math.sqrt(rho / c), a2_new * math.sqrt(rho / c)
    for got, want in [
        (layer.lora_B["default"].weight, b1_new),
        (layer.lora_A["default"].weight, a1_new),
        (layer.lora_B[AUX_ADAPTER].weight, b2_new),
        (layer.lora_A[AUX_ADAPTER].weight, a2_new),
    ]:
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # outside backward the model is W0 + s1·B1A1 only
        clean = x @ (w0 + s1 * b1_new @ a1_new).t()
        torch.testing.assert_close(model(x.float()).double(), clean, rtol=1e-6, atol=1e-6)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_saved_adapter_is_primary_only(tmp_path):
    model = tiny_bert()
    method = flatpeft.attach(model, "bi_lora", rho=0.2, aux_init="random")
    opt = torch.optim.AdamW(method.param_groups(0.01), lr=1e-2)
    method.bind(opt)
    for i in range(3):
        method.backward(lambda i=i: model(**make_batch(i)).loss)
        opt.step()
        opt.zero_grad()
    batch = make_batch(5)
    expected = _logits(model, batch)
    with torch.no_grad(), _peft.adapters_active(method.aux_layers, [method.adapter, AUX_ADAPTER]):
        perturbed = model(**batch).logits
    assert not torch.allclose(perturbed, expected, atol=1e-4)  # the aux branch is non-trivial...

    model.save_pretrained(tmp_path / "attached", selected_adapters=[method.adapter])
    method.detach()
    model.save_pretrained(tmp_path / "detached")
    assert not any(AUX_ADAPTER in k for k in model.state_dict())
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    saved = [peft.load_peft_weights(str(tmp_path / d)) for d in ("attached", "detached")]
    assert saved[0].keys() == saved[1].keys()
    assert saved[0] and not any(AUX_ADAPTER in k for k in saved[0])
    for k in saved[0]:
        assert torch.equal(saved[0][k], saved[1][k]), k
    assert not [p for p in (tmp_path / "attached").iterdir() if p.is_dir()]

    loaded = peft.PeftModel.from_pretrained(tiny_bert(base_only=True), str(tmp_path / "attached"))
    torch.testing.assert_close(_logits(loaded, batch), expected)  # ...and it is not saved
    torch.testing.assert_close(_logits(loaded.merge_and_unload(), batch), expected, rtol=1e-4, atol=1e-5)


def test_merge_while_attached_merges_primary_only():
    model = tiny_bert()
    method = flatpeft.attach(model, "bi_lora", rho=0.5, aux_init="random")
    batch = make_batch(5)
    expected = _logits(model, batch)
    assert method.aux_norm() == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(_logits(model.merge_and_unload(), batch), expected, rtol=1e-4, atol=1e-5)


def test_clean_and_trainable_outside_backward():
    model = tiny_bert()
    method = flatpeft.attach(model, "bi_lora", aux_init="random")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter("default")  # PEFT freezes inactive adapters here; backward must not care
    method.backward(lambda: model(**make_batch()).loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.aux_params)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(layer.active_adapters == ["default"] for layer in method.aux_layers)
    assert {id(p) for p in method.aux_params} <= {id(p) for p in method.parameters()}
    assert {id(p) for p in method.no_decay_parameters()} == {id(p) for p in method.aux_params}
    groups = method.param_groups(0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.aux_params}


def test_aux_lr_gives_the_auxiliary_branch_its_own_learning_rate():
    """η₂ (the paper's ablation): one SGD step moves the primary by −η·g and the auxiliary by +η₂·g."""
    model = tiny_bert()
    method = flatpeft.attach(model, "bi_lora", aux_init="random", aux_lr=0.3, clip="none")
    groups = method.param_groups(0.1)
    assert [(g["weight_decay"], g.get("lr")) for g in groups] == [(0.1, None), (0.0, 0.3)]
    opt = torch.optim.SGD(method.param_groups(0.0), lr=0.01)
    method.bind(opt)
    before = {id(p): p.detach().clone() for p in method.parameters()}
    method.backward(lambda: model(**make_batch()).loss)
    grads = {id(p): p.grad.clone() for p in method.parameters() if p.grad is not None}
    opt.step()
    aux = {id(p) for p in method.aux_params}
    for p in method.parameters():
        if id(p) in grads:
            lr = 0.3 if id(p) in aux else 0.01
            torch.testing.assert_close(p.detach(), before[id(p)] - lr * grads[id(p)], rtol=1e-6, atol=1e-8)
    assert all(grads[i].abs().sum() > 0 for i in aux)
    default = flatpeft.attach(tiny_bert(), "bi_lora").param_groups(0.0)
    assert "lr" not in default[1]  # by default the optimizer's lr (the paper's main runs)


def test_zero_rho_never_runs_aux():
    model = tiny_bert()
    method = flatpeft.attach(model, "bi_lora", rho=0.0, aux_init="random")
    assert all(torch.equal(b, torch.zeros_like(b)) for b, _ in method.factors)
    method.backward(lambda: model(**make_batch()).loss)
    assert all(p.grad is None for p in method.aux_params)


def test_init_is_seeded_and_leaves_global_rng_alone():
    model = tiny_bert()
    state = torch.get_rng_state()
    a = flatpeft.attach(model, "bi_lora", seed=1, aux_init="random")
    assert torch.equal(state, torch.get_rng_state())  # PEFT's own init draws are rolled back
    model_b = tiny_bert()
    torch.manual_seed(123)  # another global RNG state must not change the auxiliary start
    b = flatpeft.attach(model_b, "bi_lora", seed=1, aux_init="random")
    c = flatpeft.attach(tiny_bert(), "bi_lora", seed=2, aux_init="random")
    assert all(torch.equal(p, q) for p, q in zip(a.aux_params, b.aux_params, strict=True))
    assert not torch.equal(a.aux_params[1], c.aux_params[1])
    zero = flatpeft.attach(tiny_bert(), "bi_lora", seed=1)
    assert all(torch.equal(b2, torch.zeros_like(b2)) for b2, _ in zero.factors)
    a2 = zero.factors[0][1]
    bound = 1 / math.sqrt(32)  # PEFT's default for A: U(±1/√fan_in), fan_in = hidden size 32
    assert a2.abs().max() <= bound and a2.std() > bound / 2


def test_state_dict_carries_aux_weights():
    model = tiny_bert()
    method = flatpeft.attach(model, "bi_lora", aux_init="random")
    _set_aux(method, std=0.01)
    state = method.state_dict()
    other = flatpeft.attach(tiny_bert(seed=3), "bi_lora", aux_init="random", seed=5)
    with pytest.raises(ValueError, match="different configuration"):
        other.load_state_dict(state)
    other.detach()
    other = flatpeft.attach(tiny_bert(seed=3), "bi_lora", aux_init="random")
    other.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(method.aux_params, other.aux_params, strict=True))
    narrow = flatpeft.attach(tiny_bert(target_modules=["query"]), "bi_lora", aux_init="random")
    with pytest.raises(ValueError, match="does not match"):
        narrow.load_state_dict(state)


def test_detach_then_reattach_and_name_clash():
    model = tiny_bert()
    flatpeft.attach(model, "bi_lora").detach()
    assert list(model.peft_config) == ["default"]
    assert not any(AUX_ADAPTER in n for n, _ in model.named_parameters())
    method = flatpeft.attach(model, "bi_lora")  # a second attach works after detach
    assert len(method.aux_params) == 2 * len(method.layers)
    method.detach()
    model.add_adapter(AUX_ADAPTER, peft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="already has an adapter named"):
        flatpeft.attach(model, "bi_lora")


def test_trainer_resume_restores_aux(tmp_path):
    data = [{k: v[i] for k, v in make_batch(0, n=16).items()} for i in range(16)]

    def make(max_steps):
        model = tiny_bert()
        args = TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=max_steps,
            learning_rate=1e-2,
            weight_decay=0.1,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            logging_steps=1,
        )
        trainer = flatpeft.FlatTrainer(
            model=model, args=args, train_dataset=data, method="bi_lora", method_config={"rho": 0.1}
        )
        return model, trainer

    ref_model, ref = make(4)
    ref.train()
    aux_ids = {id(p) for p in ref.flat_method.aux_params}
    for group in ref.optimizer.param_groups:
        if any(id(p) in aux_ids for p in group["params"]):
            assert group["weight_decay"] == 0.0
    assert ref.flat_method.aux_norm() == pytest.approx(0.1, rel=1e-4)  # the ascent reached the boundary
    model, resumed = make(4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_bit_identical(trainable_state(ref_model), trainable_state(model))


@pytest.mark.parametrize("clip_aux", [False, True])
def test_gradient_clipping_covers_the_descent_gradients_only_by_default(tmp_path, clip_aux):
    """max_grad_norm in FlatTrainer: with a clip of 1e-12 AdamW's first step barely moves what is
    clipped (its gradient falls far below eps) and moves the rest by about lr."""
    data = [{k: v[i] for k, v in make_batch(0, n=8).items()} for i in range(8)]
    lr = 1e-2
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=lr,
        max_grad_norm=1e-12,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    config = {"aux_init": "random", "clip": "none", "grad_clip_aux": clip_aux}
    trainer = flatpeft.FlatTrainer(
        model=tiny_bert(), args=args, train_dataset=data, method="bi_lora", method_config=config
    )
    trainer.create_optimizer()
    method = trainer.flat_method
    aux = {id(p) for p in method.aux_params}
    assert ({id(p) for p in method.clip_parameters()} >= aux) == clip_aux
    before = {id(p): p.detach().clone() for p in method.parameters()}
    trainer.train()
    moved = {i: float((p.detach() - before[i]).abs().max()) for p in method.parameters() if (i := id(p))}
    assert max(v for i, v in moved.items() if i not in aux) < 0.01 * lr  # the primary: clipped
    aux_moved = max(moved[i] for i in aux)
    assert (aux_moved < 0.01 * lr) if clip_aux else (aux_moved > 0.5 * lr)


def test_train_loop_clips_the_method_clip_parameters(tmp_path, monkeypatch):
    """flatpeft train clips what the method names: Bi-LoRA's descent parameters, never its ascent."""
    import json

    import flatpeft.method as method_lib
    from flatpeft import _scale
    from flatpeft import train as train_lib

    attached, clipped = [], []
    real_attach, real_clip = method_lib.attach, _scale.clip_grad_norm
    monkeypatch.setattr(
        method_lib, "attach", lambda *a, **k: attached.append(real_attach(*a, **k)) or attached[-1]
    )

    def clip(params, max_norm):
        method = attached[-1]
        clipped.append(
            ({id(p) for p in params}, {id(p) for p in method.aux_params}, len(method.parameters()))
        )
        return real_clip(params, max_norm)

    monkeypatch.setattr(_scale, "clip_grad_norm", clip)
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"w{i % 7} x{i % 3}", "label": i % 3}) + "\n" for i in range(40))
    )
    options = {
        "model": "tiny",
        "data": str(path),
        "out": str(tmp_path / "run"),
        "max_steps": 2,
        "batch_size": 8,
    }
    train_lib.train({**options, "method": "bi_lora", "checkpoint_every": 0, "progress": False})
    assert len(clipped) == 2
    for ids, aux, total in clipped:
        assert aux and not ids & aux and len(ids) == total - len(aux)
