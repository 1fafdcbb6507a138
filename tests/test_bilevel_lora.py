"""BiLoRA (``bilevel_lora``): pseudo-SVD adapter, level schedule, data splits, darts, export."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import flatpeft
from flatpeft.methods.bilevel_lora import (
    binary_penalty,
    binary_penalty_grad,
    orthogonality_grads,
    orthogonality_penalty,
    split_dataset,
    split_indices,
)
from helpers import assert_bit_identical, assert_passes_released, make_batch, tiny_bert, trainable_state

ADAPTER = "default"


class _Net(nn.Module):
    """Linear → tanh → Conv2d(1×1 spatial) → Linear: both kinds of lora_A (rank on the last dim / dim 1)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
        self.fc2 = nn.Linear(36, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)).reshape(-1, 2, 2, 2)
        h = torch.tanh(self.conv(h)).reshape(-1, 4 * 2 * 2)
        return self.fc2(torch.cat([h, h, h[:, :4]], dim=1))


def tiny_net(dtype=torch.float64, b_std=0.3, seed=0, r=4) -> peft.PeftModel:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=["fc1", "conv", "fc2"])
    model = peft.get_peft_model(_Net().to(dtype), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    return model


def _xy(seed, n=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def _mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _set_lambdas(method, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lam in method.lambdas:
            lam.add_(scale * torch.randn(lam.shape, generator=g, dtype=lam.dtype))


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]


# -- configuration and data split -------------------------------------------------------------------


def test_config_defaults_and_errors():
    cls = flatpeft.get_method("bilevel_lora")
    assert cls.needs_upper_loss and cls.config_class.strength_fields() == []
    c = flatpeft.make_config("bilevel_lora")
    want = {"g": "softmax", "gamma": 0.1, "split": 0.8, "hypergradient": "first_order", "lower_steps": 4}
    assert {k: c.to_dict()[k] for k in want} == want and c.upper_steps == 1
    with pytest.raises(ValueError, match="split must be in"):
        flatpeft.make_config("bilevel_lora", split=1.0)
    with pytest.raises(ValueError, match="g must be one of"):
        flatpeft.make_config("bilevel_lora", g="relu")
    with pytest.raises(ValueError, match="upper_lr must be in"):
        flatpeft.make_config("bilevel_lora", upper_lr=0.0)
    with pytest.raises(ValueError, match="hypergradient must be one of"):
        flatpeft.make_config("bilevel_lora", hypergradient="implicit")


def test_split_is_seeded_8_to_2():
    d1, d2 = split_indices(50, 0.8, seed=3)
    assert len(d1) == 40 and len(d2) == 10
    assert sorted(d1 + d2) == list(range(50)) and not set(d1) & set(d2)
    assert (d1, d2) == split_indices(50, 0.8, seed=3)
    assert d2 != split_indices(50, 0.8, seed=4)[1]
    assert [len(part) for part in split_indices(2, 0.99)] == [1, 1]  # D2 is never empty
    data = list(range(100, 150))
    s1, s2 = split_dataset(data, 0.8, seed=3)
    assert [data[i] for i in d1] == list(s1) and [data[i] for i in d2] == list(s2)
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1)
    with pytest.raises(ValueError, match="fraction must be in"):
        split_indices(10, 1.0)


# -- the pseudo-SVD adapter -------------------------------------------------------------------------


@pytest.mark.parametrize("g", ["softmax", "identity", "sigmoid"])
def test_delta_is_zero_at_step_zero_and_training_moves_it(g):
    torch.manual_seed(0)
    base = tiny_bert(base_only=True)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(base, cfg)  # PEFT's default init: B = P = 0
    batch = make_batch(0)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        pretrained = model(**batch).logits
    method = flatpeft.attach(model, "bilevel_lora", g=g)
    layers = _layers(model)
    assert all(torch.equal(method.rank_scale(i), torch.ones(4)) for i in range(len(layers)))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, pretrained)
        with method.exported():
            assert all(layer.get_delta_weight(ADAPTER).abs().max() == 0 for layer in layers)
    model.train()
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    method.bind(opt)
    method.backward(lambda: model(**batch).loss, upper_loss_fn=lambda: model(**make_batch(1)).loss)
    opt.step()
    with torch.no_grad(), method.exported():  # one lower step: P leaves 0, so ΔW does too
        assert all(layer.get_delta_weight(ADAPTER).abs().max() > 0 for layer in layers)


@pytest.mark.parametrize("r", [3, 5])
def test_attaching_changes_no_output_bit_for_bit(r):
    model = tiny_bert(r=r)  # B ≠ 0, rank not a power of two
    batch = make_batch(0)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    flatpeft.attach(model, "bilevel_lora", g="softmax")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


@pytest.mark.parametrize(
    ("g", "expected"),
    [
        ("softmax", lambda lam: 4 * torch.softmax(lam, 0)),
        ("sigmoid", lambda lam: 2 * torch.sigmoid(lam)),
        ("identity", lambda lam: lam),
    ],
)
def test_layer_output_is_p_diag_g_q(g, expected):
    model = tiny_net()
    method = flatpeft.attach(model, "bilevel_lora", g=g)
    lam_values = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    with torch.no_grad():
        for lam in method.lambdas:
            lam.copy_(lam_values if g != "identity" else 1 + lam_values)
    inner = model.base_model.model
    scale = expected(method.lambdas[0].detach())
    x = torch.randn(5, 6, dtype=torch.float64)
    layer = inner.fc1
    a, b, s = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER]
    want = layer.base_layer(x) + s * x @ (b @ torch.diag(scale) @ a).t()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        h = torch.randn(3, 2, 2, 2, dtype=torch.float64)  # conv: rank along dim 1
        conv = inner.conv
        ca, cb = conv.lora_A[ADAPTER].weight, conv.lora_B[ADAPTER].weight
        delta = (cb.reshape(4, 4) @ torch.diag(scale) @ ca.reshape(4, -1)).reshape(
            conv.base_layer.weight.shape
        )
        want = torch.nn.functional.conv2d(
            h, conv.base_layer.weight + conv.scaling[ADAPTER] * delta, conv.base_layer.bias, padding=1
        )
        torch.testing.assert_close(conv(h), want, rtol=1e-12, atol=1e-12)
        b_before = b.clone()
        want = layer(x)
        with method.exported():  # stock LoRA: B holds P·diag(g̃), PEFT's own delta agrees
            torch.testing.assert_close(layer.get_delta_weight(ADAPTER), s * b_before @ torch.diag(scale) @ a)
            torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        assert torch.equal(b, b_before)  # P restored by copy
        assert torch.equal(layer(x), want)


def test_orthogonality_penalty_closed_forms():
    p = 2 * torch.eye(5, 3, dtype=torch.float64)  # PᵀP = 4I → ‖PᵀP − I‖² = 9·3
    q = torch.eye(3, 7, dtype=torch.float64)  # orthonormal rows → 0
    assert orthogonality_penalty(q, p).item() == 27.0
    ga, gb = orthogonality_grads(q, p)
    assert torch.equal(ga, torch.zeros_like(q))
    assert torch.equal(gb, 12 * p)  # 4·P·(PᵀP − I) = 4·P·3I
    a = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, 1, 1, dtype=torch.float64, requires_grad=True)  # conv lora_B layout
    want = torch.autograd.grad(orthogonality_penalty(a, b), [a, b])
    got = orthogonality_grads(a, b)
    for w, g_ in zip(want, got, strict=True):
        torch.testing.assert_close(g_.double(), w, rtol=1e-5, atol=1e-5)


# -- the two levels -----------------------------------------------------------------------------------


def test_levels_alternate_change_only_their_parameters_and_see_only_their_split():
    model = tiny_bert()
    data = make_batch(0, n=40)
    d1, d2 = split_indices(40, 0.8, seed=0)
    method = flatpeft.attach(model, "bilevel_lora", lower_steps=2, upper_steps=1)
    # Weight decay and zero_grad(set_to_none=False) would move the idle level if its grads were kept.
    opt = torch.optim.AdamW(method.param_groups(weight_decay=0.1), lr=1e-2)
    method.bind(opt)
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["weight_decay"] == 0.0
    seen = {"lower": [], "upper": []}

    def closure(level, ids):
        def fn():
            seen[level].append((method.step, list(ids)))
            return model(**{k: v[ids] for k, v in data.items()}).loss

        return fn

    levels = []
    for step in range(6):
        lower_ids, upper_ids = d1[4 * step % 32 :][:4], d2[2 * step % 8 :][:2]
        before_v = trainable_state(model)
        before_l = [lam.detach().clone() for lam in method.lambdas]
        for micro in range(2):  # two micro-batches per optimizer step
            ids_l, ids_u = lower_ids[2 * micro :][:2], upper_ids[micro:][:1]
            method.backward(closure("lower", ids_l), upper_loss_fn=closure("upper", ids_u))
        opt.step()
        opt.zero_grad(set_to_none=False)
        after_v = trainable_state(model)
        lam_moved = any(not torch.equal(x, lam) for x, lam in zip(before_l, method.lambdas, strict=True))
        v_moved = {k for k in after_v if not torch.equal(after_v[k], before_v[k])}
        if method.step - 1 in (2, 5):
            levels.append("upper")
            assert lam_moved and not v_moved
        else:
            levels.append("lower")
            assert not lam_moved
            assert any("lora_A" in k for k in v_moved) and any("lora_B" in k for k in v_moved)
    assert levels == ["lower", "lower", "upper", "lower", "lower", "upper"]
    assert sorted({s for s, _ in seen["lower"]}) == [0, 1, 3, 4]
    assert sorted({s for s, _ in seen["upper"]}) == [2, 5]
    assert {i for _, ids in seen["lower"] for i in ids} <= set(d1)
    assert {i for _, ids in seen["upper"] for i in ids} <= set(d2)


def test_orthogonality_gradient_is_added_once_per_optimizer_step():
    model = tiny_net()
    method = flatpeft.attach(model, "bilevel_lora", gamma=0.5)
    opt = torch.optim.SGD(method.parameters(), lr=1.0)
    method.bind(opt)
    b1, b2 = _xy(1), _xy(2)
    factors = [p for pair in method.factors for p in pair]
    start = [p.detach().clone() for p in factors]
    task = torch.autograd.grad(_mse(model, b1) + _mse(model, b2), factors)
    penalty = [g for a, b in method.factors for g in orthogonality_grads(a, b)]
    method.backward(lambda: _mse(model, b1), upper_loss_fn=lambda: _mse(model, b2))
    method.backward(lambda: _mse(model, b2), upper_loss_fn=lambda: _mse(model, b1))
    for p, t in zip(factors, task, strict=True):  # .grad right after backward: the task loss only
        torch.testing.assert_close(p.grad, t)
    opt.step()
    for p, p0, t, r in zip(factors, start, task, penalty, strict=True):
        torch.testing.assert_close(p.detach(), p0 - t - 0.5 * r)


def test_binary_penalty_gradient_is_added_on_upper_steps_only():
    """R2 = Σ s(1 − s) (sigmoid map): closed form against autograd, and an upper step's λ.grad is the
    D2 gradient plus γ2·∂R2/∂λ, added once per optimizer step."""
    lam = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(binary_penalty(lam), lam)
    torch.testing.assert_close(binary_penalty_grad(lam.detach()), auto)
    assert float(binary_penalty(torch.tensor([-50.0, 50.0]))) == pytest.approx(0.0, abs=1e-12)

    model = tiny_net()
    method = flatpeft.attach(model, "bilevel_lora", g="sigmoid", gamma2=0.5, lower_steps=1, upper_steps=1)
    opt = torch.optim.SGD(method.param_groups(), lr=1.0)
    method.bind(opt)
    b1, b2 = _xy(1), _xy(2)
    method.backward(lambda: _mse(model, b1), upper_loss_fn=lambda: _mse(model, b2))
    opt.step()  # lower step: λ untouched
    opt.zero_grad()
    with torch.no_grad():
        for i, lam in enumerate(method.lambdas):
            lam.copy_(torch.linspace(-1.0, 1.0, lam.numel()) * (i + 1))
    start = [lam.detach().clone() for lam in method.lambdas]
    method.backward(lambda: _mse(model, b1), upper_loss_fn=lambda: _mse(model, b2))
    data = [lam.grad.clone() for lam in method.lambdas]
    opt.step()  # upper step with lr 1e-3 (upper_lr)
    for lam, l0, d in zip(method.lambdas, start, data, strict=True):
        expected = l0 - method.config.upper_lr * (d + 0.5 * binary_penalty_grad(l0))
        torch.testing.assert_close(lam.detach(), expected)
        assert float(binary_penalty_grad(l0).abs().sum()) > 0
    with pytest.raises(ValueError, match="g='sigmoid'"):
        flatpeft.attach(tiny_net(), "bilevel_lora", gamma2=0.1)


def test_darts_hypergradient_matches_finite_difference_of_unrolled_upper_loss():
    xi, gamma = 0.7, 0.1
    model = tiny_net()
    method = flatpeft.attach(
        model, "bilevel_lora", hypergradient="darts", unroll_lr=xi, gamma=gamma, lower_steps=1, upper_steps=1
    )
    _set_lambdas(method, seed=1)
    method.step = 1  # an upper step
    b1, b2 = _xy(1), _xy(2)
    lower = method.lower
    lams = method.lambdas
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lam_before = [lam.detach().clone() for lam in lams]

    method.backward(lambda: _mse(model, b1), upper_loss_fn=lambda: _mse(model, b2))
    hyper = torch.cat([lam.grad for lam in lams])
    assert_bit_identical(before, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(a, b) for a, b in zip(lam_before, lams, strict=True))

    factor_ids = {id(p) for pair in method.factors for p in pair}
    saved = [p.detach().clone() for p in lower]

    def unrolled_upper_loss(lam_flat, fixed_v=None):
        with torch.no_grad():
            for lam, v in zip(lams, lam_flat.split([lam.numel() for lam in lams]), strict=True):
                lam.copy_(v)
            for p, s in zip(lower, saved, strict=True):
                p.copy_(s)
        if fixed_v is None:  # V′ = V − ξ ∇_V [L(D1) + γ R(V)], R by autograd (independent of the code)
            reg = sum(orthogonality_penalty(a, b) for a, b in method.factors)
            grads = torch.autograd.grad(_mse(model, b1), lower)
            reg_list = torch.autograd.grad(reg, [p for p in lower if id(p) in factor_ids])
            reg_grads = dict(zip([id(p) for p in lower if id(p) in factor_ids], reg_list, strict=True))
            new_v = [
                p - xi * (g + gamma * reg_grads.get(id(p), 0)) for p, g in zip(lower, grads, strict=True)
            ]
        else:
            new_v = fixed_v
        with torch.no_grad():
            for p, v in zip(lower, new_v, strict=True):
                p.copy_(v)
            return _mse(model, b2).item(), [v.detach() for v in new_v]

    lam0 = torch.cat(lam_before)
    _, v_prime = unrolled_upper_loss(lam0)
    gen = torch.Generator().manual_seed(5)
    h = 1e-5
    for _ in range(3):
        u = torch.randn(lam0.shape, generator=gen, dtype=lam0.dtype)
        total = (unrolled_upper_loss(lam0 + h * u)[0] - unrolled_upper_loss(lam0 - h * u)[0]) / (2 * h)
        direct = (
            unrolled_upper_loss(lam0 + h * u, v_prime)[0] - unrolled_upper_loss(lam0 - h * u, v_prime)[0]
        ) / (2 * h)
        got = float(hyper @ u)
        assert got == pytest.approx(total, rel=1e-3, abs=1e-7)
        assert abs(total - direct) > 50 * 1e-3 * abs(total)  # the second-order term matters here


@pytest.mark.parametrize("hypergradient", ["first_order", "darts"])
def test_upper_level_micro_batches_add(hypergradient):
    model = tiny_net(dtype=torch.float32)
    method = flatpeft.attach(model, "bilevel_lora", hypergradient=hypergradient, unroll_lr=0.3, lower_steps=1)
    _set_lambdas(method)
    method.step = 1
    pairs = [
        (_xy(1, dtype=torch.float32), _xy(2, dtype=torch.float32)),
        (_xy(3, dtype=torch.float32), _xy(4, dtype=torch.float32)),
    ]
    grads = []
    for pair in pairs:
        method.backward(lambda p=pair: _mse(model, p[0]), upper_loss_fn=lambda p=pair: _mse(model, p[1]))
        grads.append(torch.cat([lam.grad.clone() for lam in method.lambdas]))
        for lam in method.lambdas:
            lam.grad = None
    for pair in pairs:
        method.backward(lambda p=pair: _mse(model, p[0]), upper_loss_fn=lambda p=pair: _mse(model, p[1]))
    both = torch.cat([lam.grad for lam in method.lambdas])
    torch.testing.assert_close(both, grads[0] + grads[1], rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in method.lower)


# -- export, resume, integrations ----------------------------------------------------------------


def _train(model, method, steps, seed=0):
    opt = torch.optim.AdamW(method.param_groups(0.01), lr=1e-2)
    method.bind(opt)
    for i in range(steps):
        method.backward(
            lambda i=i: model(**make_batch(i % 3)).loss,
            upper_loss_fn=lambda i=i: model(**make_batch(50 + i)).loss,
        )
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("dora", [False, True])
def test_exported_adapter_reproduces_outputs_in_vanilla_peft(dora, tmp_path):
    model = tiny_bert(use_dora=dora)
    method = flatpeft.attach(model, "bilevel_lora", lower_steps=1, upper_steps=1, upper_lr=0.1)
    _train(model, method, 4)
    assert all(not torch.equal(s, torch.ones_like(s)) for s in (method.rank_scale(i) for i in range(3)))
    model.eval()
    batch = make_batch(7)
    with torch.no_grad():
        trained = model(**batch).logits
    state = trainable_state(model)
    with method.exported():
        model.save_pretrained(tmp_path)
    assert_bit_identical(state, trainable_state(model))  # training form restored by copy
    loaded = peft.PeftModel.from_pretrained(tiny_bert(base_only=True), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.merge_and_unload()(**batch).logits, trained, rtol=1e-4, atol=1e-5)
    method.detach()
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained, rtol=1e-5, atol=1e-6)


def test_resume_from_a_folded_checkpoint_is_exact():
    ref_model = tiny_bert()
    ref = flatpeft.attach(ref_model, "bilevel_lora", lower_steps=1, upper_steps=1)
    _train(ref_model, ref, 6)

    model = tiny_bert()
    method = flatpeft.attach(model, "bilevel_lora", lower_steps=1, upper_steps=1)
    opt = _train(model, method, 3)
    with method.exported():  # what FlatTrainer writes: the folded (stock) adapter
        folded = trainable_state(model)
        inside = method.state_dict()
    saved = {"method": method.state_dict(), "opt": opt.state_dict()}
    for a, b in zip(inside["extra"]["lora_B"], saved["method"]["extra"]["lora_B"], strict=True):
        assert torch.equal(a, b)  # the training-form P, even while folded
    assert any(not torch.equal(folded[k], v) for k, v in trainable_state(model).items())

    model2 = tiny_bert()
    method2 = flatpeft.attach(model2, "bilevel_lora", lower_steps=1, upper_steps=1)
    with torch.no_grad():
        params = dict(model2.named_parameters())
        for k, v in folded.items():
            params[k].copy_(v)
    method2.load_state_dict(saved["method"])
    opt2 = torch.optim.AdamW(method2.param_groups(0.01), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    method2.bind(opt2)
    for i in range(3, 6):
        method2.backward(
            lambda i=i: model2(**make_batch(i % 3)).loss,
            upper_loss_fn=lambda i=i: model2(**make_batch(50 + i)).loss,
        )
        opt2.step()
        opt2.zero_grad()
    assert_bit_identical(trainable_state(ref_model), trainable_state(model2))
    assert all(torch.equal(a, b) for a, b in zip(ref.lambdas, method2.lambdas, strict=True))


def test_flat_trainer_refuses_accelerate_fsdp_with_a_clear_error(tmp_path):
    """λ lives outside the model: Accelerate's FSDP maps optimizer parameters to the model's by name."""
    from transformers import TrainingArguments

    batch = make_batch(0, n=10)
    data = [{k: v[i] for k, v in batch.items()} for i in range(10)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = flatpeft.FlatTrainer(model=tiny_bert(), args=args, train_dataset=data, method="bilevel_lora")
    trainer.is_fsdp_enabled = True  # what an Accelerate FSDP launch sets (CPU falls back to DDP)
    with pytest.raises(ValueError, match="flatpeft train --fsdp"):
        trainer.create_optimizer()
    assert set(trainer.flat_method.own_parameters()) == {
        f"bilevel_lora_lambda_{i}" for i in range(len(trainer.flat_method.lambdas))
    }


def test_flat_trainer_splits_the_data_and_trains_both_levels(tmp_path):
    from transformers import TrainingArguments

    batch = make_batch(0, n=30)
    data = [{k: v[i] for k, v in batch.items()} for i in range(30)]
    model = tiny_bert()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = flatpeft.FlatTrainer(
        model=model,
        args=args,
        train_dataset=data,
        method="bilevel_lora",
        method_config={"lower_steps": 1, "upper_steps": 1, "upper_lr": 0.05},
    )
    d1, d2 = split_indices(30, 0.8, seed=args.seed)  # the Trainer's seed reaches the method
    assert list(trainer.train_dataset.indices) == d1 and list(trainer.upper_dataset.indices) == d2
    trainer.train()
    method = trainer.flat_method
    assert method.step == 4
    assert any(not torch.equal(lam, torch.zeros_like(lam)) for lam in method.lambdas)
    lam_group = [
        g for g in trainer.optimizer.param_groups if any(p is method.lambdas[0] for p in g["params"])
    ]
    assert len(lam_group) == 1 and lam_group[0]["lr"] == 0.05 and lam_group[0]["weight_decay"] == 0.0
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    with torch.no_grad():
        expected = model(**make_batch(9)).logits
        loaded = peft.PeftModel.from_pretrained(tiny_bert(base_only=True), str(tmp_path / "final")).eval()
        torch.testing.assert_close(loaded(**make_batch(9)).logits, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    model = tiny_bert()
    method = flatpeft.attach(model, "bilevel_lora", hypergradient="darts", lower_steps=1)
    with (
        pytest.warns(UserWarning, match="no optimizer is bound"),
        pytest.raises(TypeError, match="upper_loss_fn"),
    ):
        method.backward(lambda: model(**make_batch(0)).loss)
    method.step = 1
    with pytest.raises(ValueError, match="unroll_lr"):
        method.backward(
            lambda: model(**make_batch(0)).loss, upper_loss_fn=lambda: model(**make_batch(1)).loss
        )
    with pytest.raises(ValueError, match="does not update bilevel_lora's λ"):
        method.bind(torch.optim.SGD(model.parameters(), lr=0.1))
    state = method.state_dict()
    method.detach()
    other = flatpeft.attach(tiny_bert(r=2), "bilevel_lora", hypergradient="darts", lower_steps=1)
    with pytest.raises(ValueError, match="other adapted layers or ranks"):
        other.load_state_dict(state)
    emb = peft.get_peft_model(
        tiny_bert(base_only=True),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "word_embeddings"]),
    )
    with pytest.raises(ValueError, match="exclude embeddings"):
        flatpeft.attach(emb, "bilevel_lora")


# -- DistributedDataParallel ------------------------------------------------------------------------


def _shard(batch, rank, world):
    size = batch["input_ids"].shape[0] // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def _ddp_train(hypergradient, rank=0, world=1, wrap=lambda m: m):
    model = tiny_bert()
    net = wrap(model)
    method = flatpeft.attach(
        net, "bilevel_lora", lower_steps=1, upper_steps=1, hypergradient=hypergradient, unroll_lr=0.1
    )
    opt = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    method.bind(opt)
    for step in range(4):
        b1, b2 = _shard(make_batch(step), rank, world), _shard(make_batch(50 + step), rank, world)
        method.backward(lambda b=b1: net(**b).loss, upper_loss_fn=lambda b=b2: net(**b).loss)
        opt.step()
        opt.zero_grad()
    return {**trainable_state(model), **{f"lambda.{i}": lam.detach() for i, lam in enumerate(method.lambdas)}}


def _ddp_worker(rank, world, port, out):
    import datetime
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    result = {h: _ddp_train(h, rank, world, DistributedDataParallel) for h in ("first_order", "darts")}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_agree_and_first_order_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for h in ("first_order", "darts"):
        assert_bit_identical(r0[h], r1[h])
        assert not torch.equal(r0[h]["lambda.0"], torch.zeros(4))  # upper steps ran under DDP
    single = _ddp_train("first_order")  # two half-batches averaged = one process on the whole batch
    for k in single:
        torch.testing.assert_close(r0["first_order"][k], single[k], rtol=1e-4, atol=1e-5, msg=k)


def test_darts_releases_each_pass():
    """DARTS runs four passes in one upper step; none holds an earlier pass's graph."""
    model = tiny_bert()
    method = flatpeft.attach(model, "bilevel_lora", hypergradient="darts", unroll_lr=0.1, lower_steps=1)
    method.step = 1
    assert method.upper_level()
    assert_passes_released(method, model)


@pytest.mark.parametrize("hypergradient", ["first_order", "darts"])
def test_train_loop_reads_every_d1_example_once_per_epoch(tmp_path, monkeypatch, hypergradient):
    """flatpeft train: upper steps draw no micro-batch of the lower level's D1 stream (first-order reads
    no D1 batch; darts reads its look-ahead batches from a D1 stream of its own), so one epoch of lower
    steps covers D1 exactly once; the step count follows (T1 : T2 = 2 : 1 adds one upper step per two)."""
    import json

    from flatpeft import train as train_lib

    drawn = []
    real = train_lib.Stream.__getitem__
    monkeypatch.setattr(
        train_lib.Stream, "__getitem__", lambda self, j: drawn.append((self.seed, j)) or real(self, j)
    )
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"w{i % 7} x{i % 3}", "label": i % 3}) + "\n" for i in range(60))
    )
    options = {"model": "tiny", "data": str(path), "out": str(tmp_path / "run"), "batch_size": 4}
    options |= {"val_size": 0, "test_size": 0.2, "checkpoint_every": 0, "progress": False, "epochs": 1}
    options |= {"method": "bilevel_lora", "method_options": {"lower_steps": 2, "upper_steps": 1}}
    options["method_options"]["hypergradient"] = hypergradient
    metrics = train_lib.train(options)
    d1, d2, side = ([j for s, j in drawn if s == seed] for seed in (0, 1, 2))  # seed, seed + 1, seed + 2
    n1 = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["train"]["n"]
    micro = -(-n1 // 4)  # one epoch of D1 micro-batches
    upper = [s % 3 == 2 for s in range(metrics["steps"])]
    lower = [not u for u in upper]
    assert sum(lower) == micro and lower[-1]  # the run ends when the lower level has read D1 once
    assert d1 == list(range(micro))  # every D1 micro-batch once, none drawn and thrown away
    assert d2 == list(range(sum(upper)))
    assert side == (list(range(sum(upper))) if hypergradient == "darts" else [])


def test_upper_data_val_makes_the_validation_split_d2(tmp_path):
    """--upper-data val: D2 is the validation split and D1 the whole training set; refused without a
    validation split or for a method without an upper level, before anything is written."""
    import json

    from flatpeft import train as train_lib

    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"w{i % 7} x{i % 3}", "label": i % 3}) + "\n" for i in range(60))
    )
    options = {"model": "tiny", "data": str(path), "batch_size": 4, "max_steps": 5, "checkpoint_every": 0}
    options |= {"progress": False, "val_size": 0.2, "test_size": 0.2, "method": "bilevel_lora"}
    options["method_options"] = {"lower_steps": 1, "upper_steps": 1}
    train_lib.train({**options, "out": str(tmp_path / "run"), "upper_data": "val"})
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert data["upper_n"] == data["val"]["n"] == 12 and data["train"]["n"] == 60 - 12 - 12
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["upper_data"] == "val"
    lora = {"method": "lora", "method_options": {}}
    for bad, match in [({"val_size": 0}, "val-size > 0"), (lora, "upper level")]:
        with pytest.raises(ValueError, match=match):
            train_lib.train({**options, **bad, "out": str(tmp_path / "bad"), "upper_data": "val"})
        assert not (tmp_path / "bad").exists()
