"""FMLoRA / EFMLoRA: the full-weight gradient estimate, E_B, the B = 0 fallback, both passes, the EMA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flatpeft
from flatpeft import _peft
from flatpeft.methods.fm_lora import (
    B_ZERO_RMS,
    full_gradient_estimate,
    perturbation_directions,
    rho_at,
)
from helpers import make_batch, tiny_bert, tiny_gpt2

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _proj_rows(a):  # P_A: projector onto A's row space (n×n)
    return torch.linalg.pinv(a) @ a


def _proj_cols(b):  # P_B: projector onto B's column space (m×m)
    return b @ torch.linalg.pinv(b)


def _lora_grads(a, b, g, s):
    """∇A, ∇B of L with ∂L/∂W = G and W = W0 + s·B·A."""
    return s * b.t() @ g, s * g @ a.t()


def _reference(factors, grads, scalings, norm="layer", damping=1e-4):
    """The paper's formulas literally, densely in fp64: unit E_B per layer, and the dense ĝ."""
    gs, pinvs = [], []
    for (a, b), (ga, gb), s in zip(factors, grads, scalings, strict=True):
        a = a.detach().to(D).reshape(a.shape[0], -1)
        b = b.detach().to(D).reshape(b.shape[0], -1)
        r = a.shape[0]
        eye = torch.eye(r, dtype=D)
        ka = a @ a.t() + damping * torch.trace(a @ a.t()) / r * eye
        kb = b.t() @ b + damping * torch.trace(b.t() @ b) / r * eye
        a_plus = a.t() @ torch.linalg.inv(ka)  # A⁺ (n×r); (Aᵀ)⁺ = A⁺ᵀ
        term1 = gb.detach().to(D).reshape(b.shape) @ a_plus.t() / s
        if ga is None or b.pow(2).mean().sqrt() <= B_ZERO_RMS:
            g_hat = term1
        else:
            term2 = b @ torch.linalg.inv(kb) @ ga.detach().to(D).reshape(a.shape) / s
            g_hat = 0.5 * (term1 + term2)
        gs.append(g_hat)
        pinvs.append(a_plus)
    norms = [g.norm() for g in gs]
    if norm == "global":
        norms = [torch.stack(norms).norm()] * len(gs)
    dirs = [(g / n) @ p / s for g, n, p, s in zip(gs, norms, pinvs, scalings, strict=True)]
    return dirs, gs


def _model_factors(model):
    layers = _peft.lora_layers(model, "default")
    return [_peft.lora_factors(layer, "default") for _, layer in layers], [
        _peft.scaling(layer, "default") for _, layer in layers
    ]


# -- the estimate on hand-set tensors -----------------------------------------------------------------


def test_estimate_is_the_average_of_both_projections():
    m, n, r, s = 7, 5, 3, 2.0
    a, b, g = _rand(r, n, seed=1), _rand(m, r, seed=2), _rand(m, n, seed=3)
    ga, gb = _lora_grads(a, b, g, s)
    got = full_gradient_estimate(a, b, ga, gb, s, damping=1e-13)
    expected = 0.5 * (g @ _proj_rows(a) + _proj_cols(b) @ g)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # the two terms separately: B = 0 leaves G·P_A, and the estimate is not G (r < n, m)
    zero = full_gradient_estimate(
        a, torch.zeros_like(b), *_lora_grads(a, torch.zeros_like(b), g, s), s, 1e-13
    )
    torch.testing.assert_close(zero, g @ _proj_rows(a), rtol=1e-9, atol=1e-9)
    assert (got - g).norm() > 0.1 * g.norm()


def test_estimate_is_exact_when_factors_are_invertible():
    n, s = 4, 0.5
    a, g = _rand(n, n, seed=4), _rand(n, n, seed=5)
    b = _rand(n, n, seed=6)  # r = n = m: both terms recover G
    torch.testing.assert_close(full_gradient_estimate(a, b, *_lora_grads(a, b, g, s), s, 1e-13), g)
    # r = n < m: the first term is G exactly, the second only P_B·G (so ĝ = ½(G + P_B·G))
    b, g = _rand(9, n, seed=7), _rand(9, n, seed=8)
    ga, gb = _lora_grads(a, b, g, s)
    torch.testing.assert_close(full_gradient_estimate(a, b, None, gb, s, 1e-13), g)
    torch.testing.assert_close(full_gradient_estimate(a, b, ga, gb, s, 1e-13), 0.5 * (g + _proj_cols(b) @ g))
    # fp32 with the default damping stays within its relative size (1e-4) of the exact value
    got32 = full_gradient_estimate(a.float(), b.float(), ga.float(), gb.float(), s)
    torch.testing.assert_close(got32.double(), 0.5 * (g + _proj_cols(b) @ g), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("norm", ["layer", "global"])
def test_realised_perturbation_has_radius_at_most_rho(norm):
    s, shapes = 2.0, [(6, 8, 3), (5, 7, 2)]
    factors, grads, in_row_space = [], [], []
    for i, (m, n, r) in enumerate(shapes):
        a, b = _rand(r, n, seed=10 + i), _rand(m, r, seed=20 + i)
        g_any = _rand(m, n, seed=30 + i)
        g_row = _rand(m, r, seed=40 + i) @ a  # rows in A's row space, so Ē_W·P_A = Ē_W
        factors.append((a, b))
        grads.append(_lora_grads(a, b, g_any, s))
        in_row_space.append(_lora_grads(a, b, g_row, s))
    for case, closed in ((grads, False), (in_row_space, True)):
        dirs = perturbation_directions(factors, case, [s, s], norm, damping=1e-13)
        ref, _ = _reference(factors, case, [s, s], norm, damping=1e-13)
        realised = [(s * e @ a).norm() for e, (a, _) in zip(dirs, factors, strict=True)]
        for e, e_ref in zip(dirs, ref, strict=True):
            torch.testing.assert_close(e, e_ref)
        total = torch.stack(realised).norm() if norm == "global" else torch.stack(realised)
        if closed:
            torch.testing.assert_close(total, torch.ones_like(total))
        else:
            assert (total < 1 - 1e-3).all(), total


def test_b_zero_falls_back_to_the_first_term_without_nan():
    m, n, r, s = 6, 5, 2, 4.0
    a, b0, g = _rand(r, n, seed=50), _rand(m, r, seed=51), _rand(m, n, seed=52)
    first = g @ _proj_rows(a)
    for scale, fallback in ((0.0, True), (0.1 * B_ZERO_RMS, True), (1e-6, False)):
        b = scale * b0
        ga, gb = _lora_grads(a, b, g, s)
        got = full_gradient_estimate(a, b, ga, gb, s, 1e-13)
        assert torch.isfinite(got).all()
        expected = first if fallback else 0.5 * (first + _proj_cols(b0) @ g)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
        (e,) = perturbation_directions([(a, b)], [(ga, gb)], [s], damping=1e-13)
        assert torch.isfinite(e).all() and e.abs().sum() > 0
    # a frozen A (no ∇A) drops the second term the same way; no gradient at all gives E_B = 0
    b = b0.clone()
    torch.testing.assert_close(full_gradient_estimate(a, b, None, s * g @ a.t(), s, 1e-13), first)
    (e,) = perturbation_directions([(a, b)], [(None, torch.zeros(m, r, dtype=D))], [s])
    assert torch.equal(e, torch.zeros_like(e))
    (e,) = perturbation_directions([(torch.zeros(r, n), torch.zeros(m, r))], [(None, None)], [s])
    assert torch.equal(e, torch.zeros_like(e))


def test_cost_is_low_rank_no_m_by_n_matrix():
    m, n, r = 256, 320, 8
    factors = [(_rand(r, n, seed=60).float(), _rand(m, r, seed=61).float())]
    grads = [(_rand(r, n, seed=62).float(), _rand(m, r, seed=63).float())]
    with FlopCounterMode(display=False) as counter:
        perturbation_directions(factors, grads, [2.0])
    flops = counter.get_total_flops()
    # Gram matrices 2·(2r)²·(m + n), E_B 2·(2r)·r·m, r×r algebra: far below one rank-r m×n product.
    assert flops <= 8 * r * r * (m + n) + 4 * r * r * m + 200 * r**3, flops
    assert flops < m * n * r  # forming the dense ĝ alone costs 4·m·n·r


# -- fm_lora on a tiny model --------------------------------------------------------------------------


def _full_weight_grads(model, batch):
    """G = ∂L/∂W' of every adapted layer, read off the base weights of a copy (sam_full's direction)."""
    twin = copy.deepcopy(model)
    layers = [layer for _, layer in _peft.lora_layers(twin, "default")]
    for layer in layers:
        layer.get_base_layer().weight.requires_grad_(True)
    twin(**batch).loss.backward()
    return [layer.get_base_layer().weight.grad for layer in layers]


def test_fm_lora_direction_agrees_with_full_sam():
    model, batch = tiny_bert(), make_batch(0)
    factors, scalings = _model_factors(model)
    params = [p for pair in factors for p in pair]
    flat = torch.autograd.grad(model(**batch).loss, params)
    grads = list(zip(flat[0::2], flat[1::2], strict=True))
    dirs = perturbation_directions(factors, grads, scalings)
    realised = [s * e @ a.detach() for e, (a, _), s in zip(dirs, factors, scalings, strict=True)]
    full = _full_weight_grads(model, batch)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([x.flatten() for x in realised]), torch.cat([g.flatten() for g in full]), dim=0
    )
    # ⟨G, ĝ·P_A⟩ = ½‖G·P_A‖² + ½‖P_B·G·P_A‖² > 0; pin the value against the dense formulas
    ref, _ = _reference(factors, grads, scalings)
    ref_realised = torch.cat(
        [(s * e @ a.detach().double()).flatten() for e, (a, _), s in zip(ref, factors, scalings, strict=True)]
    )
    ref_cos = torch.nn.functional.cosine_similarity(
        ref_realised, torch.cat([g.double().flatten() for g in full]), dim=0
    )
    assert cos > 0.05
    torch.testing.assert_close(cos.double(), ref_cos, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "global"])
def test_fm_lora_second_pass_is_the_gradient_at_b_plus_e_b(norm):
    rho, batch = 0.2, make_batch(1)
    model = tiny_bert()
    method = flatpeft.attach(model, "fm_lora", rho=rho, norm=norm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        clean_loss = model(**batch).loss
    loss = method.backward(lambda: model(**batch).loss)
    assert torch.equal(loss, clean_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # B restored bit-for-bit, nothing else touched

    twin = tiny_bert()
    factors, scalings = _model_factors(twin)
    flat = torch.autograd.grad(twin(**batch).loss, [p for pair in factors for p in pair])
    grads = list(zip(flat[0::2], flat[1::2], strict=True))
    ref, _ = _reference(factors, grads, scalings, norm)
    with torch.no_grad():
        for (_, b), e in zip(factors, ref, strict=True):
            b.add_(rho * e.float())
    twin(**batch).loss.backward()
    expected = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    plain = tiny_bert()
    plain(**batch).loss.backward()
    assert any(not torch.allclose(p.grad, got[n]) for n, p in plain.named_parameters() if p.grad is not None)


def test_fm_lora_from_peft_zero_init_b():
    model, ids = tiny_gpt2(), make_batch(2)["input_ids"]  # PEFT's B = 0: the first-term fallback
    method = flatpeft.attach(model, "fm_lora", rho=0.5)
    method.backward(lambda: model(input_ids=ids, labels=ids).loss)
    a_grads = [a.grad for a, _ in method.factors]
    assert all(torch.isfinite(p.grad).all() for p in method.parameters())
    assert all(torch.equal(b, torch.zeros_like(b)) for _, b in method.factors)  # restored to 0
    # at B = 0 the plain ∇A = s·BᵀG vanishes; at B + E_B ≠ 0 it does not
    plain = tiny_gpt2()
    plain(input_ids=ids, labels=ids).loss.backward()
    assert all(a.grad.abs().max() == 0 for a, _ in _model_factors(plain)[0])
    assert all(g.abs().max() > 0 for g in a_grads)


# -- eflat_lora: the EMA ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["inv_sqrt", "constant"])
def test_eflat_lora_ema_recurrence_over_three_steps_with_accumulation(schedule):
    """Algorithm 2: step 1 is a clean LoRA step and sets Ê = E from its gradient; every later step
    takes the gradient at B + ρ_t·Ê and averages Ê ← (1 − β)Ê + βE."""
    rho, beta, lr, steps = 0.1, 0.9, 0.05, 3
    micro = [[make_batch(2 * t), make_batch(2 * t + 1)] for t in range(steps)]

    model = tiny_bert()
    method = flatpeft.attach(model, "eflat_lora", rho=rho, beta=beta, rho_schedule=schedule)
    opt = torch.optim.SGD(method.parameters(), lr=lr)
    method.bind(opt)
    emas = []
    for t in range(steps):
        for batch in micro[t]:
            calls = []

            def loss_fn(batch=batch, calls=calls):
                calls.append(1)
                return model(**batch).loss

            method.backward(loss_fn)
            assert len(calls) == 1  # one pass, the first step included
        opt.step()
        opt.zero_grad()
        emas.append([u.clone() for u in method.state_dict()["extra"]["ema"]])

    # the same run by hand, with the paper's formulas in fp64
    twin = tiny_bert()
    factors, scalings = _model_factors(twin)
    u = None
    twin_opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=lr)
    for t in range(steps):
        rho_t = rho / math.sqrt(t + 1) if schedule == "inv_sqrt" else rho
        saved = [b.detach().clone() for _, b in factors]
        with torch.no_grad():
            for (_, b), x in zip(factors, u, strict=True) if u is not None else []:  # step 1: clean
                b.add_(rho_t * x.float())
        for batch in micro[t]:
            twin(**batch).loss.backward()  # accumulated over the step's micro-batches
        fresh, _ = _reference(factors, [(a.grad, b.grad) for a, b in factors], scalings)
        with torch.no_grad():
            for (_, b), s in zip(factors, saved, strict=True):
                b.copy_(s)
        twin_opt.step()
        twin_opt.zero_grad()
        u = fresh if u is None else [(1 - beta) * x + beta * e for x, e in zip(u, fresh, strict=True)]
        if t == 0:
            first = [x.clone() for x in u]
        for got, want in zip(emas[t], u, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert all(not torch.allclose(x, y) for x, y in zip(first, u, strict=True))
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_eflat_lora_state_holds_the_ema_and_rejects_another_model():
    model = tiny_bert()
    method = flatpeft.attach(model, "eflat_lora")
    assert method.state_dict()["extra"]["ema"] is None
    method.backward(lambda: model(**make_batch(0)).loss)
    assert method.state_dict()["extra"]["ema"] is None  # set after the first optimizer step
    method.after_step()
    state = method.state_dict()
    shapes = [tuple(b.reshape(b.shape[0], -1).shape) for _, b in method.factors]
    assert [tuple(u.shape) for u in state["extra"]["ema"]] == shapes
    other = flatpeft.attach(tiny_bert(r=2, lora_alpha=4), "eflat_lora")
    with pytest.raises(ValueError, match="EMA buffer shapes"):
        other.load_state_dict(state)


# -- configuration --------------------------------------------------------------------------------------


def test_rho_schedules_and_config_errors():
    assert rho_at(0.1, "constant", 7, None) == 0.1
    assert rho_at(0.1, "cosine", 0, 10) == pytest.approx(0.1)
    assert rho_at(0.1, "cosine", 5, 10) == pytest.approx(0.05)
    assert rho_at(0.1, "cosine", 12, 10) == pytest.approx(0.0)
    # ρ_t = ρ₀/√t for the paper's t = 1, 2, ... (0-based optimizer steps 0, 1, ...): no lag at the start
    assert rho_at(0.1, "inv_sqrt", 0, None) == 0.1
    assert rho_at(0.1, "inv_sqrt", 1, None) == pytest.approx(0.1 / math.sqrt(2))
    assert rho_at(0.1, "inv_sqrt", 4, None) == pytest.approx(0.1 / math.sqrt(5))
    assert rho_at(0.1, "inv_sqrt", 15, None) == pytest.approx(0.025)
    for name in ("fm_lora", "eflat_lora"):  # the paper's schedule is the default
        assert flatpeft.make_config(name).rho_schedule == "inv_sqrt"
    method = flatpeft.attach(tiny_bert(), "eflat_lora", rho=0.2, rho_schedule="cosine", total_steps=4)
    method.step = 3
    assert method.strength() == {"rho": pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))}
    with pytest.raises(ValueError, match="total_steps"):
        flatpeft.attach(tiny_bert(), "fm_lora", rho_schedule="cosine")
    with pytest.raises(ValueError, match="beta"):
        flatpeft.attach(tiny_bert(), "eflat_lora", beta=1.5)
    with pytest.raises(ValueError, match="damping"):
        flatpeft.attach(tiny_bert(), "fm_lora", damping=0.0)
    with pytest.raises(ValueError, match="norm"):
        flatpeft.attach(tiny_bert(), "fm_lora", norm="row")
