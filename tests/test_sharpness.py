"""flatpeft.sharpness: closed forms on quadratics, exact restoration, landscapes and plots."""

from __future__ import annotations

import argparse
import json
import math

import peft
import pytest
import torch
from torch import nn

from flatpeft import sharpness as S
from flatpeft import sharpness_cli as C
from helpers import (
    assert_bit_identical,
    frozen_state,
    make_batch,
    tiny_bert,
    tiny_gpt2,
    train,
    trainable_state,
)

N_IN, N_OUT, N = 5, 3, 16


class Linear(nn.Module):
    """y = W x + b: with a squared-error loss the loss is an explicit quadratic in W."""

    def __init__(self, n_in: int = N_IN, n_out: int = N_OUT) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def mse(model, batch) -> torch.Tensor:
    """L = (1/N) Σ_k ‖W' x_k + b − y_k‖² (mean over equal-sized batches = mean over samples)."""
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(-1).mean()


def quadratic(seed: int = 0, x: torch.Tensor | None = None):
    """A LoRA-adapted linear layer with non-zero B, data (X, Y) in two equal batches."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(Linear(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(N, N_IN) if x is None else x
    y = torch.randn(x.shape[0], N_OUT)
    half = x.shape[0] // 2
    batches = [{"x": x[:half], "y": y[:half]}, {"x": x[half:], "y": y[half:]}]
    return model, batches, x, y


def layer_of(model):
    return model.base_model.model.lin


def effective_weight(model) -> torch.Tensor:
    layer = layer_of(model)
    return (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach().double()


def full_space_hessian(x: torch.Tensor) -> torch.Tensor:
    """∂²L/∂W'² for row-major vec(W'): I_m ⊗ (2/N)·XᵀX (the output rows do not interact)."""
    return torch.kron(torch.eye(N_OUT, dtype=torch.float64), 2.0 / x.shape[0] * x.double().T @ x.double())


def lora_space_hessian(model, x, y) -> torch.Tensor:
    """The exact Hessian of L w.r.t. (vec A, vec B) of the adapter, by autograd in float64."""
    layer = layer_of(model)
    a0, b0 = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    w0, bias = layer.get_base_layer().weight.detach().double(), layer.get_base_layer().bias.detach().double()
    s = layer.scaling["default"]

    def loss(theta):
        a = theta[: a0.numel()].reshape(a0.shape)
        b = theta[a0.numel() :].reshape(b0.shape)
        w = w0 + s * b @ a
        return ((x.double() @ w.T + bias - y.double()) ** 2).sum(-1).mean()

    theta = torch.cat([a0.flatten(), b0.flatten()]).double()
    return torch.autograd.functional.hessian(loss, theta)


def within(estimate: S.SharpnessResult, truth: float, n_se: float = 3.5, max_rel_se: float = 0.1) -> None:
    """The estimate is within n_se standard errors of the truth, and the error bar is informative."""
    assert estimate.stderr is not None and estimate.stderr < max_rel_se * abs(truth), estimate
    assert abs(estimate.value - truth) <= n_se * estimate.stderr, (estimate.value, truth, estimate.stderr)


# -- closed forms on the quadratic --------------------------------------------------------------


def test_full_space_hessian_matches_closed_form():
    model, batches, x, _ = quadratic()
    h = full_space_hessian(x)
    top = S.hessian_top_eigenvalue(model, mse, batches, iters=100, tol=1e-7, progress=False)
    assert top.details["converged"]
    assert top.value == pytest.approx(float(torch.linalg.eigvalsh(h).max()), rel=1e-5)
    with torch.no_grad():
        assert top.base_loss == pytest.approx(float(sum(mse(model, b) for b in batches) / 2), rel=1e-6)
    trace = S.hessian_trace(model, mse, batches, n_probes=64, progress=False)
    within(trace, float(h.trace()))  # = m·(2/N)·‖X‖_F²
    assert trace.details["dimension"] == N_OUT * N_IN and len(trace.samples) == 64


def test_lora_space_hessian_matches_autograd():
    model, batches, x, y = quadratic()
    h = lora_space_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(h)
    dominant = float(eig[eig.abs().argmax()])
    top = S.hessian_top_eigenvalue(model, mse, batches, space="lora", iters=300, tol=1e-6, progress=False)
    assert top.value == pytest.approx(dominant, rel=1e-4)
    trace = S.hessian_trace(model, mse, batches, space="lora", n_probes=256, progress=False)
    within(trace, float(h.trace()))


def test_tied_base_weight_is_measured_through_a_probe():
    """A base weight shared with another module must not pick up that module's curvature."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(N_IN, N_OUT)
            self.other = nn.Linear(N_IN, N_OUT, bias=False)
            self.other.weight = self.lin.weight

        def forward(self, x):
            return self.lin(x) + self.other(x.flip(1))

    torch.manual_seed(0)
    model = peft.get_peft_model(Tied(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    x, y = torch.randn(N, N_IN), torch.randn(N, N_OUT)
    batches = [{"x": x[:8], "y": y[:8]}, {"x": x[8:], "y": y[8:]}]
    before = frozen_state(model)
    top = S.hessian_top_eigenvalue(model, mse, batches, iters=100, tol=1e-7, progress=False)
    assert top.value == pytest.approx(float(torch.linalg.eigvalsh(full_space_hessian(x)).max()), rel=1e-5)
    assert_bit_identical(before, frozen_state(model))
    assert not model.base_model.model.lin.base_layer.weight.requires_grad


def at_minimum():
    """The quadratic with its base weight moved to the least-squares optimum of W' (gradient ≈ 0)."""
    model, batches, x, y = quadratic()
    layer = layer_of(model)
    xa = torch.cat([x, torch.ones(N, 1)], 1).double()
    sol = torch.linalg.lstsq(xa, y.double()).solution
    with torch.no_grad():
        layer.get_base_layer().weight.copy_(sol[:N_IN].T.float() - layer.get_delta_weight("default"))
        layer.get_base_layer().bias.copy_(sol[N_IN].float())
    return model, batches, x


def half_trace_h_sigma_full(model, x, sigma: float) -> float:
    """Σ is diagonal: every entry of row i has variance s_i² = σ²‖W'_i‖²/n, so with H = I ⊗ (2/N)XᵀX,
    ½tr(HΣ) = ½ Σ_i s_i² · tr((2/N)XᵀX)."""
    row_var = sigma**2 * effective_weight(model).pow(2).sum(1) / N_IN
    return 0.5 * float(row_var.sum()) * float(2.0 / x.shape[0] * x.double().pow(2).sum())


def test_expected_sharpness_full_space_is_half_trace_h_sigma():
    model, batches, x, _ = quadratic()  # away from the minimum: the ±ε pairs cancel gᵀε exactly
    sigma = 0.05
    est = S.expected_sharpness(model, mse, batches, sigma=sigma, n_samples=48, progress=False)
    within(est, half_trace_h_sigma_full(model, x, sigma))
    assert len(est.samples) == 48
    radius = sigma * float(effective_weight(model).norm())
    assert est.details["rms_radius"] == pytest.approx(radius, rel=1e-6)


def test_expected_sharpness_without_antithetic_pairs_is_unbiased():
    model, batches, x = at_minimum()  # gᵀε ≈ 0, so one-sided samples are informative too
    sigma = 0.05
    est = S.expected_sharpness(
        model, mse, batches, sigma=sigma, n_samples=64, antithetic=False, progress=False
    )
    within(est, half_trace_h_sigma_full(model, x, sigma), max_rel_se=0.15)


def test_expected_sharpness_lora_space_is_half_trace_h_sigma():
    """Row i of A (r×n) has variance σ²‖A_i‖²/n per entry, row i of B (m×r) σ²‖B_i‖²/r."""
    model, batches, x, y = quadratic()
    sigma = 0.02  # the loss is quartic in (A, B): the ±ε pairs leave an O(σ⁴) remainder only
    layer = layer_of(model)
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    var_a = (sigma**2 * a.pow(2).sum(1) / a.shape[1]).repeat_interleave(a.shape[1])
    var_b = (sigma**2 * b.pow(2).sum(1) / b.shape[1]).repeat_interleave(b.shape[1])
    truth = 0.5 * float((torch.diagonal(lora_space_hessian(model, x, y)) * torch.cat([var_a, var_b])).sum())
    est = S.expected_sharpness(model, mse, batches, sigma=sigma, n_samples=64, space="lora", progress=False)
    within(est, truth)
    radius = sigma * math.sqrt(float(a.pow(2).sum() + b.pow(2).sum()))
    assert est.details["rms_radius"] == pytest.approx(radius, rel=1e-6)


def trust_region_max(g: torch.Tensor, h: torch.Tensor, rho: float) -> float:
    """max_{‖ε‖≤ρ} gᵀε + ½εᵀHε for PSD H: ε = (μI − H)⁻¹g on the sphere, μ > λ_max by bisection."""
    lam, q = torch.linalg.eigh(h)
    gt = q.T @ g
    lo, hi = float(lam.max()), float(lam.max()) + float(gt.norm()) / rho + 1.0
    for _ in range(200):
        mu = (lo + hi) / 2
        if float((gt / (mu - lam)).norm()) > rho:
            lo = mu
        else:
            hi = mu
    e = gt / (hi - lam)
    return float(gt @ e + 0.5 * (lam * e * e).sum())


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_worst_case_matches_trust_region_solution(rho):
    model, batches, x, y = quadratic()
    layer = layer_of(model)
    bias = layer.get_base_layer().bias.detach().double()

    def loss(w):
        return ((x.double() @ w.reshape(N_OUT, N_IN).T + bias - y.double()) ** 2).sum(-1).mean()

    w = effective_weight(model).flatten()
    g = torch.autograd.functional.jacobian(loss, w)
    truth = trust_region_max(g, full_space_hessian(x), rho)
    est = S.worst_case_sharpness(model, mse, batches, rho=rho, steps=10, progress=False)
    # Projected ascent gives a lower bound; it must reach the maximum but never exceed it.
    assert 0.995 * truth <= est.value <= truth * (1 + 1e-5) + 1e-6
    assert est.details["final_radius"] == pytest.approx(rho, rel=1e-5)
    assert len(est.samples) == 10 and est.value == max(est.samples)


def test_worst_case_at_least_expected_and_monotone_in_rho():
    model, batches, x = at_minimum()
    lam_max = float(torch.linalg.eigvalsh(full_space_hessian(x)).max())
    values = []
    for sigma in (0.02, 0.05, 0.2):
        exp = S.expected_sharpness(model, mse, batches, sigma=sigma, n_samples=8, progress=False)
        rho = exp.details["rms_radius"]
        worst = S.worst_case_sharpness(model, mse, batches, rho=rho, steps=10, progress=False)
        # At a minimum: expected = ½tr(HΣ) ≤ ½λ_max ρ², and the worst case reaches ½λ_max ρ².
        assert worst.value >= exp.value + exp.stderr
        assert worst.value == pytest.approx(0.5 * lam_max * rho**2, rel=0.02)
        values.append(worst.value)
    assert values == sorted(values) and values[0] > 0


@pytest.mark.parametrize("space", ["full", "lora"])
def test_worst_case_on_a_network_dominates_expected_and_grows_with_rho(space):
    model = tiny_bert(seed=1)
    batches = [make_batch(0), make_batch(1)]
    exp = S.expected_sharpness(model, None, batches, sigma=0.05, n_samples=4, space=space, progress=False)
    radius = exp.details["rms_radius"]
    values = [
        S.worst_case_sharpness(
            model, None, batches, rho=f * radius, steps=3, space=space, progress=False
        ).value
        for f in (0.5, 1.0, 2.0)
    ]
    assert values[1] >= exp.value
    assert values[0] < values[1] < values[2]


# -- exactness -----------------------------------------------------------------------------------


def run_everything(model, batches, space):
    kw = {"space": space, "progress": False}
    return [
        S.expected_sharpness(model, None, batches, sigma=0.1, n_samples=2, **kw),
        S.worst_case_sharpness(model, None, batches, rho=0.5, steps=2, **kw),
        S.hessian_top_eigenvalue(model, None, batches, iters=2, **kw),
        S.hessian_trace(model, None, batches, n_probes=2, **kw),
        S.loss_landscape(model, None, batches, dims=2, points=3, **kw),
    ]


def gpt2_batches():
    return [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in (make_batch(0), make_batch(1))]


@pytest.mark.parametrize("build", ["bert-fp32", "bert-bf16", "gpt2-fp32"], ids=lambda s: s.replace("-", "_"))
@pytest.mark.parametrize("space", ["full", "lora"])
def test_model_comes_back_bit_identical(build, space):
    if build.startswith("bert"):
        dtype = torch.bfloat16 if build.endswith("bf16") else torch.float32
        model, batches = tiny_bert(dtype=dtype, dropout=0.1), [make_batch(0), make_batch(1)]
    else:
        model, batches = tiny_gpt2(), gpt2_batches()
    model.train()
    list(model.modules())[5].eval()  # mixed train/eval modes must come back as they were
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen, trainable = frozen_state(model), trainable_state(model)
    rng = torch.get_rng_state()
    results = run_everything(model, batches, space)
    assert_bit_identical(frozen, frozen_state(model))
    assert_bit_identical(trainable, trainable_state(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG (dropout) is never touched
    for r in results:
        assert math.isfinite(r.base_loss)
        json.loads(r.to_json())


def test_trained_model_gives_different_numbers_in_the_full_and_lora_spaces():
    model = tiny_bert(seed=2)
    train(model, "lora", steps=6, lr=2e-2).detach()
    batches = [make_batch(2), make_batch(3)]
    for measure in (S.expected_sharpness, S.hessian_top_eigenvalue):
        kwargs = {"n_samples": 4} if measure is S.expected_sharpness else {"iters": 5}
        full, lora = (
            measure(model, None, batches, space=s, progress=False, **kwargs).value for s in ("full", "lora")
        )
        assert math.isfinite(full) and math.isfinite(lora)
        assert abs(full - lora) > 0.05 * max(abs(full), abs(lora))


def test_an_attached_method_is_measured_at_its_clean_point(method_name):
    """Methods act only inside their backward: attached or detached, the numbers are the same."""
    model = tiny_bert(seed=4)
    # Five steps so that every method has moved all its state (bilevel_lora trains λ at step 5).
    method = train(model, method_name, steps=5, lr=2e-2)
    batches = [make_batch(4)]

    def measure():
        out = [
            S.expected_sharpness(model, None, batches, n_samples=2, space=space, progress=False).to_dict()
            for space in ("full", "lora")
        ]
        land = S.loss_landscape(model, None, batches, points=3, radius=0.1, space="lora", progress=False)
        return [*out, land.to_dict()]

    frozen, trainable = frozen_state(model), trainable_state(model)
    attached = measure()
    assert_bit_identical(frozen, frozen_state(model))
    assert_bit_identical(trainable, trainable_state(model))
    method.detach()
    assert measure() == attached


def test_seeded_and_deterministic():
    model, batches, _, _ = quadratic()
    a = S.expected_sharpness(model, mse, batches, n_samples=4, seed=3, progress=False)
    b = S.expected_sharpness(model, mse, batches, n_samples=4, seed=3, progress=False)
    c = S.expected_sharpness(model, mse, batches, n_samples=4, seed=4, progress=False)
    assert a == b and a.samples != c.samples
    t1 = S.hessian_trace(model, mse, batches, n_probes=3, seed=1, progress=False)
    t2 = S.hessian_trace(model, mse, batches, n_probes=3, seed=2, progress=False)
    assert t1.samples != t2.samples


# -- landscapes ----------------------------------------------------------------------------------


def test_landscape_is_filter_normalised():
    """With (2/N)XᵀX = c·I, H = c·I and along d: ½[L(αd) + L(−αd)] − L(0) = ½cα²‖d‖² = ½cα²‖W'‖²."""
    x = torch.cat([torch.eye(N_IN), torch.eye(N_IN)]) * 1.5  # XᵀX = 4.5·I, N = 10
    c = 2.0 / x.shape[0] * 4.5
    model, batches, _, _ = quadratic(x=x)
    land = S.loss_landscape(model, mse, batches, dims=1, radius=0.5, points=5, progress=False)
    assert land.alphas == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert land.losses[2] == land.base_loss
    w_sq = float(effective_weight(model).pow(2).sum())
    for i, alpha in ((3, 0.25), (4, 0.5)):
        sym = 0.5 * (land.losses[i] + land.losses[4 - i]) - land.base_loss
        assert sym == pytest.approx(0.5 * c * alpha**2 * w_sq, rel=1e-4)


@pytest.mark.parametrize("space", ["full", "lora"])
def test_landscape_grid_json_and_png(space, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    model = tiny_bert(seed=3)
    batches = [make_batch(0)]
    one = S.loss_landscape(model, None, batches, dims=1, radius=0.2, points=5, space=space, progress=False)
    two = S.loss_landscape(model, None, batches, dims=2, radius=0.2, points=3, space=space, progress=False)
    assert len(one.losses) == 5 and one.betas == [] and one.losses[2] == one.base_loss
    assert len(two.losses) == 3 and all(len(row) == 3 for row in two.losses)
    assert two.losses[1][1] == two.base_loss and two.losses[0][2] != two.losses[2][0]
    assert len({round(v, 6) for v in one.losses}) > 1
    again = S.Landscape.from_dict(json.loads(two.to_json(tmp_path / "land.json")))
    assert again == two
    other = S.loss_landscape(model, None, batches, radius=0.2, points=5, space="lora", seed=1, progress=False)
    for land, name in ((one, "one.png"), (two, "sub/two.png"), ([one, other], "both.png")):
        path = S.plot_landscape(land, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_overflowed_losses_are_written_as_null_and_read_back_as_nan(tmp_path):
    land = S.Landscape("full", 1, [-1.0, 0.0, 1.0], [], [math.inf, 0.5, math.nan], 0.5, {"dims": 1})
    data = json.loads(land.to_json())
    assert data["losses"] == [None, 0.5, None]
    again = S.Landscape.from_dict(data)
    assert math.isnan(again.losses[0]) and again.losses[1] == 0.5
    assert S.plot_landscape(again, tmp_path / "nan.png").stat().st_size > 0


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_rejected_with_the_fix():
    model, batches, _, _ = quadratic()
    with pytest.raises(ValueError, match="space must be"):
        S.expected_sharpness(model, mse, batches, space="adapter", progress=False)
    with pytest.raises(ValueError, match="sigma"):
        S.expected_sharpness(model, mse, batches, sigma=-0.1, progress=False)
    with pytest.raises(ValueError, match="sigma"):
        S.expected_sharpness(model, mse, batches, sigma=float("nan"), progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        S.expected_sharpness(model, mse, batches, n_samples=0, progress=False)
    with pytest.raises(ValueError, match="rho"):
        S.worst_case_sharpness(model, mse, batches, rho=float("inf"), progress=False)
    with pytest.raises(ValueError, match="steps"):
        S.worst_case_sharpness(model, mse, batches, steps=0, progress=False)
    with pytest.raises(ValueError, match="iters"):
        S.hessian_top_eigenvalue(model, mse, batches, iters=0, progress=False)
    with pytest.raises(ValueError, match="n_probes"):
        S.hessian_trace(model, mse, batches, n_probes=0, progress=False)
    with pytest.raises(ValueError, match="dims"):
        S.loss_landscape(model, mse, batches, dims=3, progress=False)
    with pytest.raises(ValueError, match="points"):
        S.loss_landscape(model, mse, batches, points=1, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        S.expected_sharpness(model, mse, iter([]), progress=False)
    with pytest.raises(TypeError, match="scalar tensor"):
        S.expected_sharpness(model, lambda m, b: m(b["x"]), batches, progress=False)
    with pytest.raises(TypeError, match="PeftModel"):
        S.hessian_trace(Linear(), mse, batches, progress=False)
    with pytest.raises(ValueError, match="empty"):
        S.plot_landscape([], "x.png")
    with pytest.raises(TypeError, match="Landscape"):
        S.plot_landscape(S.expected_sharpness(model, mse, batches, n_samples=1, progress=False), "x.png")
    bad = [{"x": batches[0]["x"], "y": batches[0]["y"] * float("nan")}]
    with pytest.raises(ValueError, match=r"clean point is nan"):
        S.hessian_trace(model, mse, bad, progress=False)


# -- flatpeft sharpness: measuring a saved adapter -----------------------------------------------


def write_csv(path, n: int = 48, labels=("neg", "pos")) -> str:
    words = {"neg": "bad awful sad", "pos": "good great happy", "mid": "fine okay plain"}
    rows = ["text,label"] + [
        f"{words[labels[i % len(labels)]]} {i},{labels[i % len(labels)]}" for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A `flatpeft train` run folder: the tiny random BERT, a few steps on a two-class CSV."""
    from flatpeft import train as train_lib

    root = tmp_path_factory.mktemp("sharpness-run")
    data = write_csv(root / "small.csv")
    options = {"model": "tiny", "data": data, "max_steps": 3, "batch_size": 8, "out": str(root / "run")}
    train_lib.train(options | {"progress": False, "lr": 1e-2})
    return root / "run"


def small_cli_options(adapter, out, **extra):
    options = {"adapter": str(adapter), "out": str(out), "max_examples": 8, "batch_size": 4, "samples": 2}
    options |= {"steps": 2, "iters": 2, "probes": 2, "points": 3, "points_2d": 3, "progress": False}
    return options | extra


def test_cli_writes_every_requested_metric_and_pictures(run_folder, tmp_path, capsys):
    import matplotlib.image

    from flatpeft.cli import main

    out = tmp_path / "measured"
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in small_cli_options(run_folder, out).items()
        if k != "progress"
    ]
    assert main(["sharpness", *flags, "--no-progress", "--metrics", *C.METRICS]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "sharpness.json").read_text())
    assert set(data["results"]) == set(C.METRICS)
    assert all(set(by_space) == {"full", "lora"} for by_space in data["results"].values())
    assert data["model"] == "tiny" and data["split"] == "test" and data["n_examples"] == 4
    exp = S.SharpnessResult.from_dict(data["results"]["expected"]["full"])
    assert exp.config["n_samples"] == 2 and math.isfinite(exp.value)
    land = S.Landscape.from_dict(data["results"]["landscape_2d"]["lora"])
    assert len(land.losses) == 3 and land.losses[1][1] == land.base_loss == data["clean_loss"]
    assert sorted(data["images"]) == ["landscape_1d.png", "landscape_2d_full.png", "landscape_2d_lora.png"]
    for name in data["images"]:
        assert matplotlib.image.imread(out / name).ndim == 3
    table = (out / "sharpness.md").read_text().strip()
    assert table in printed and str(out) in printed
    assert table.count("\n") == 2 + len(C.METRICS)  # header, rule, clean loss, one row per metric


def test_cli_arguments_reach_run_sharpness_cli(tmp_path):
    parser = argparse.ArgumentParser()
    C.add_cli_arguments(parser)
    args = parser.parse_args(
        ["--adapter", str(tmp_path), "--metrics", "expected", "hessian_trace", "--no-progress"]
    )
    opts = C._cli_options(args)
    assert opts["metrics"] == ["expected", "hessian_trace"] and opts["progress"] is False
    assert opts["spaces"] == ["full", "lora"] and opts["sigma"] == 0.05


def test_cli_bad_input_names_the_fix_and_writes_nothing(run_folder, tmp_path, capsys):
    out = tmp_path / "never"
    from flatpeft.cli import main

    assert main(["sharpness", "--adapter", str(tmp_path), "--out", str(out)]) == 2
    assert "neither a PEFT adapter folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown metric"):
        C.run_sharpness_cli(small_cli_options(run_folder, out, metrics=["flatness"]))
    with pytest.raises(ValueError, match="max_examples"):
        C.run_sharpness_cli(small_cli_options(run_folder, out, max_examples=0))
    three = write_csv(
        tmp_path / "three.csv", labels=("neg", "mid", "pos")
    )  # a 3-way head for a 2-way adapter
    with pytest.raises(ValueError, match="does not fit model"):
        C.run_sharpness_cli(small_cli_options(run_folder / "adapter", out, data=three))
    assert not out.exists()
