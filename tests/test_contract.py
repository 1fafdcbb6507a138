"""The method contract (SPEC §2, §6), parametrised over every registered method.

No per-method branches: a method declares what it needs as class attributes (``needs_upper_loss``)
and config metadata (``strength`` fields, ``total_steps``), and these tests read them.
"""

from __future__ import annotations

import peft
import pytest
import torch

import flatpeft
from helpers import (
    assert_bit_identical,
    assert_passes_released,
    defaults_for,
    frozen_state,
    make_batch,
    run_backward,
    tiny_bert,
    train,
    trainable_state,
)

# Options that change a method's computation join the contracts they can break.
VARIANTS = {
    "flat_lora:scope=all": ("flat_lora", {"scope": "all"}),
    "bi_lora:aux_lr": ("bi_lora", {"aux_lr": 0.05}),
    "bilevel_lora:gamma2": ("bilevel_lora", {"g": "sigmoid", "gamma2": 0.1}),
}


@pytest.fixture(params=[*flatpeft.list_methods(), *VARIANTS])
def method_spec(request) -> tuple[str, dict]:
    """``(name, options)``: every registered method with its defaults, and the variants above."""
    return VARIANTS.get(request.param, (request.param, {}))


def _zero_strength(name: str) -> dict:
    return {f: 0.0 for f in flatpeft.get_method(name).config_class.strength_fields()}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weights_bit_identical(method_spec, dtype):
    name, options = method_spec
    model = tiny_bert(dtype=dtype)
    before = frozen_state(model)
    train(model, name, steps=4, **options)
    assert_bit_identical(before, frozen_state(model))


def test_frozen_weights_get_no_gradient(method_name):
    model = tiny_bert()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    method.step = 5  # past the start of any warm-up ramp
    run_backward(method, model, make_batch())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_earlier_passes_are_released(method_name):
    """Whenever the method computes a loss, no loss it computed before is still alive: a pass whose
    backward has run must not hold its graph (and its memory) through later passes or steps."""
    model = tiny_bert()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    method.step = 5
    assert_passes_released(method, model)


def test_zero_strength_reproduces_plain_backward(method_spec):
    """At the initial point (bi-level methods: λ at its start, where the adapter is the LoRA one)."""
    name, options = method_spec
    model = tiny_bert()
    batch = make_batch()
    model(**batch).loss.backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)

    method = flatpeft.attach(model, name, **defaults_for(name, **options, **_zero_strength(name)))
    method.step = 5
    assert method.data_used(method.config, method.step) == (True, False)  # a step on the training loss
    run_backward(method, model, batch)
    got = _grads(model)
    assert got.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)


def _relative_gap(
    name: str, options: dict, strength: float, model_fn=tiny_bert, batch_fn=make_batch
) -> float:
    """max |method.backward gradient − plain backward gradient| / max |plain gradient| on an fp64 model,
    with every strength field set to ``strength``, at optimizer step 1 (after one SGD step, with T = 1:
    a σ ramp has reached σ, an EMA of the perturbation exists, an auxiliary branch started at zero has
    moved). ``model_fn(dtype=...)`` builds the model (called as ``model(**batch).loss``), ``batch_fn(seed)``
    its batches.

    Both gradients are taken at the same point on the same batch; only the parameters a plain
    backward reaches are compared (an auxiliary branch has no plain gradient).
    """
    fields = flatpeft.get_method(name).config_class.strength_fields()
    model = model_fn(dtype=torch.float64)
    strengths = dict.fromkeys(fields, strength)
    method = flatpeft.attach(model, name, **defaults_for(name, total_steps=1, **options, **strengths))
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    method.bind(opt)
    run_backward(method, model, batch_fn(1), upper_batch=batch_fn(99))
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert method.step == 1 and method.data_used(method.config, 1) == (True, False)

    batch = batch_fn(0)
    model(**batch).loss.backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    run_backward(method, model, batch, upper_batch=batch_fn(99))
    got = _grads(model)
    assert plain.keys() <= got.keys()
    gap = max(float((got[k] - plain[k]).abs().max()) for k in plain)
    return gap / max(float(plain[k].abs().max()) for k in plain)


def test_small_strength_perturbs_and_approaches_plain_backward(method_spec):
    """A strength s > 0 runs the perturbation (not a ``strength == 0`` shortcut): the gradient moves
    away from the plain one by a first-order amount, c·s with c in [0.01, 10] (fp64 rounding is
    ~1e-16), and the gap shrinks linearly as s does, so it vanishes as s → 0. A method that declares
    no strength field (``option(..., strength=True)``) must be a plain backward, exactly."""
    name, options = method_spec
    if not flatpeft.get_method(name).config_class.strength_fields():
        assert _relative_gap(name, options, 0.0) == 0.0
        return
    coarse, fine = (_relative_gap(name, options, s) for s in (1e-6, 1e-7))
    for s, gap in ((1e-6, coarse), (1e-7, fine)):
        assert 0.01 * s <= gap <= 10 * s, (s, gap)
    assert coarse / fine == pytest.approx(10.0, rel=1e-3)


def test_strength_report_names_the_strength_fields(method_name):
    """``strength()`` (logged next to the loss) reports exactly the declared strength fields, so a method
    cannot perturb by a radius the strength contracts above do not drive."""
    model = tiny_bert()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    declared = flatpeft.get_method(method_name).config_class.strength_fields()
    assert sorted(method.strength()) == sorted(declared)


def test_model_is_clean_outside_backward(method_name):
    model = tiny_bert()
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        clean = model(**batch).logits
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    method.step = 5
    run_backward(method, model, batch)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(clean, after)


def test_global_rng_untouched(method_name):
    model = tiny_bert()  # no dropout: a plain backward consumes no random numbers
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    method.step = 5
    state = torch.get_rng_state()
    run_backward(method, model, make_batch())
    assert torch.equal(state, torch.get_rng_state())


def test_same_seed_same_adapter(method_name):
    a, b = tiny_bert(), tiny_bert()
    train(a, method_name, steps=4, seed=3)
    train(b, method_name, steps=4, seed=3)
    assert_bit_identical(trainable_state(a), trainable_state(b))


def test_gradient_accumulation_adds(method_name):
    model = tiny_bert()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name))
    method.step = 5
    b1, b2 = make_batch(1), make_batch(2)
    run_backward(method, model, b1)
    g1 = _grads(model)
    model.zero_grad(set_to_none=True)
    run_backward(method, model, b2)
    g2 = _grads(model)
    model.zero_grad(set_to_none=True)
    run_backward(method, model, b1)
    run_backward(method, model, b2)
    both = _grads(model)
    for k in both:
        torch.testing.assert_close(both[k], g1[k] + g2[k], rtol=1e-5, atol=1e-6, msg=k)


def test_loss_falls_on_tiny_task(method_name):
    model = tiny_bert()
    batch = make_batch(0, n=16)
    with torch.no_grad():
        start = model(**batch).loss.item()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name, total_steps=30))
    opt = torch.optim.AdamW(method.parameters(), lr=2e-2)
    method.bind(opt)
    for _ in range(30):
        run_backward(method, model, batch)
        opt.step()
        opt.zero_grad()
    method.detach()
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < 0.7 * start, (start, end)


def test_detach_leaves_stock_adapter(method_name, tmp_path):
    model = tiny_bert()
    method = train(model, method_name, steps=3)
    returned = method.detach()
    assert returned is model
    model.eval()
    batch = make_batch(5)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    keys = set(peft.load_peft_weights(str(tmp_path)))
    assert keys and all("lora_" in k or "classifier" in k for k in keys), sorted(keys)

    loaded = peft.PeftModel.from_pretrained(tiny_bert(base_only=True), str(tmp_path))
    loaded.eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected)
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_state_dict_resume_is_exact(method_spec):
    method_name, options = method_spec
    steps, split = 6, 3

    def run(model, method, opt, start, stop):
        for i in range(start, stop):
            run_backward(method, model, make_batch(i % 3), upper_batch=make_batch(50 + i))
            opt.step()
            opt.zero_grad()

    ref_model = tiny_bert()
    ref = flatpeft.attach(ref_model, method_name, **defaults_for(method_name, total_steps=steps, **options))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref.bind(ref_opt)
    run(ref_model, ref, ref_opt, 0, steps)

    model = tiny_bert()
    method = flatpeft.attach(model, method_name, **defaults_for(method_name, total_steps=steps, **options))
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    method.bind(opt)
    run(model, method, opt, 0, split)
    saved = {
        "model": {k: v.clone() for k, v in trainable_state(model).items()},
        "method": method.state_dict(),
        "opt": opt.state_dict(),
    }
    saved = torch.load(_roundtrip(saved), weights_only=False)

    model2 = tiny_bert(seed=7)  # different init: everything must come from the checkpoint
    method2 = flatpeft.attach(model2, method_name, **defaults_for(method_name, total_steps=steps, **options))
    with torch.no_grad():
        params = dict(model2.named_parameters())
        for k, v in saved["model"].items():
            params[k].copy_(v)
    model2.load_state_dict(_frozen_from(model), strict=False)  # the same pretrained base
    opt2 = torch.optim.AdamW(method2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    method2.load_state_dict(saved["method"])
    method2.bind(opt2)
    assert method2.step == split
    run(model2, method2, opt2, split, steps)
    assert_bit_identical(trainable_state(ref_model), trainable_state(model2))


def _frozen_from(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" not in k and "classifier" not in k}


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
