"""``bilevel_lora`` — BiLoRA (Qiang, Zhang, Xie, 2024, https://arxiv.org/abs/2403.13037).

Not Bi-LoRA (``bi_lora``, an auxiliary adversarial adapter). A pseudo-SVD adapter on every layer,

    ΔW = s · P · diag(g̃(λ)) · Q,   P ∈ R^{m×r}, Q ∈ R^{r×n}, λ ∈ R^r,   g̃(λ) = g(λ) / g(λ₀),
    g = softmax (default) | identity | sigmoid,   λ₀ = 0 (softmax, sigmoid) or 1 (identity),

trained as a bi-level problem on two splits of the training set (D1 : D2 = ``split`` : 1 − ``split``):

    lower:  V*(λ) = argmin_V  L(V, λ; D1) + γ1 Σ_layers (‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F²),   V = {P, Q, ...}
    upper:  min_λ  L(V*(λ), λ; D2) + γ2 Σ_layers Σ_i s_i (1 − s_i),   s = sigmoid(λ)   (g = sigmoid;
            R2 pushes each pseudo singular value towards 0 or 1; our form of the paper's R2, whose exact
            expression was not recoverable; γ2 = 0 by default)

by alternation over optimizer steps: ``lower_steps`` (T1) steps update V (P, Q and any other
trainable weight, e.g. a classifier head) on D1 with λ fixed, then ``upper_steps`` (T2) steps update
λ on D2 with V fixed. Hypergradient of an upper step:

    first_order:  ∇_λ L(V, λ; D2)                                                  (one pass)
    darts:        ∇_λ L(V′, λ; D2) − ξ [∇_λ L(V⁺, λ; D1) − ∇_λ L(V⁻, λ; D1)] / (2ε)   (four passes)
                  V′ = V − ξ ∇_V [L(V, λ; D1) + γ1 R(V)],  v = ∇_V′ L(V′, λ; D2),  V± = V ± ε v,
                  ε = ``darts_radius`` / ‖v‖       (DARTS, Liu et al. 2019, eqs. 7-8)

V is put back by copy after the unrolled step and each ±εv perturbation (the popular Betty
implementation subtracts the perturbation, which leaves V shifted by rounding).

Design. P, Q are lora_B, lora_A of the user's own PEFT LoRA adapter; λ (fp32, one vector per layer)
lives in the method and enters through a persistent forward hook on lora_A that scales its output by
g̃(λ) along the rank, so the model the user evaluates *is* P·diag(g̃(λ))·Q, in eval too. AdaLoRA's SVD
layer was not used: it needs another tuner (AdaLoraConfig) instead of the user's LoRA model, applies
its E without g, ties orthogonality and rank allocation to its own update calls, and would still need
converting for export. ``exported()`` (FlatTrainer saves inside it) and ``detach()`` fold g̃(λ) into
B (B ← P·diag(g̃(λ)), scaling unchanged): vanilla PEFT loads and merges the result; ``exported()``
restores P by copy on exit. g̃(λ₀) is exactly 1, so attaching changes nothing (bit-exact): ΔW = 0 at
step 0 with PEFT's default init (B = P = 0) for every g, and P, Q start with the user's LoRA dynamics
(the paper's s becomes s/g(λ₀): ×r softmax, ×2 sigmoid, ×1 identity). identity starts at λ₀ = 1:
with P = 0 and λ = 0 no gradient would ever reach P, Q or λ. T1 : T2 = 4 : 1 consumes D1 and D2 at
the rates of their 8 : 2 sizes; upper_lr = 1e-3 is ours (the paper's values were not recoverable).

Plain loop (the optimizer stays the user's; ``param_groups`` gives λ the learning rate ``upper_lr``)::

    d1, d2 = split_dataset(train_set, 0.8, seed=0)              # or d2 = a validation set
    method = flatpeft.attach(model, "bilevel_lora")
    opt = torch.optim.AdamW(method.param_groups(0.01), lr=5e-4)
    method.bind(opt)
    for b1, b2 in zip(loader(d1), itertools.cycle(loader(d2))):
        method.backward(lambda: model(**b1).loss, upper_loss_fn=lambda: model(**b2).loss)
        opt.step(); opt.zero_grad()

Pitfalls. The level depends on the optimizer step counter only, so every micro-batch of a step trains
the same level and gradient accumulation adds. A lower step never calls ``upper_loss_fn``; a
first-order upper step never calls ``loss_fn`` (that D1 batch goes unused); a darts upper step's
``loss_fn`` is the unrolled step's look-ahead D1 batch, which a loop draws from a D1 stream other than
the lower level's (``flatpeft train`` and ``FlatTrainer`` do), so that every D1 example still reaches
the lower level once per epoch. The pre-step hook ``bind``
adds clears the idle level's gradients (so weight decay and momentum leave it alone: ``torch.optim``
skips parameters without a gradient) and adds γ1·∇R once per optimizer step (after AMP unscaling,
whatever the accumulation), so R is not in ``.grad`` right after ``backward``. ξ defaults to the bound
optimizer's current lr of V, as in DARTS; darts differentiates the loss the closures return, so a
Trainer dividing it by k accumulation steps shrinks the unrolled step by k; keep adapter weights in
fp32 for darts (±εv vanishes in bf16). Never merge while attached (PEFT's delta weight does not see
λ). DDP: upper-level passes run in the wrapper's ``no_sync()`` (attach through the wrapper or
``set_wrapper``; FlatTrainer does it) and the pre-hook averages λ's gradients over ranks, so ranks
agree; first_order equals one process on the whole batch, darts unrolls each rank on its own shard.
``state_dict`` holds λ and the training-form P, so resuming from a folded checkpoint is exact.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import _peft
from .._sharded import full, like, model_is_sharded
from ..config import MethodConfig, option
from ..method import Method
from ..perturb import RngReplay, global_norm, restore_, snapshot
from ..registry import register

__all__ = [
    "BilevelLoRA",
    "BilevelLoRAConfig",
    "binary_penalty",
    "binary_penalty_grad",
    "orthogonality_grads",
    "orthogonality_penalty",
    "split_dataset",
    "split_indices",
]

_G = {"softmax": lambda x: torch.softmax(x, dim=0), "sigmoid": torch.sigmoid, "identity": lambda x: x}


@dataclass(frozen=True)
class BilevelLoRAConfig(MethodConfig):
    """BiLoRA: pseudo-SVD adapter, P and Q on D1 (lower level), pseudo singular values λ on D2 (upper)."""

    method = "bilevel_lora"
    g: Literal["softmax", "identity", "sigmoid"] = option(
        "softmax", "Map g of the pseudo singular values λ (the paper's default and best: softmax)."
    )
    gamma: float = option(
        0.1, "γ1, weight of the orthogonality penalty ‖PᵀP-I‖²+‖QQᵀ-I‖² (lower level).", min=0.0
    )
    gamma2: float = option(
        0.0,
        "γ2, weight of R2 = Σ g(λ)(1 - g(λ)) on the upper level, pushing each sigmoid value towards 0 "
        "or 1 (g='sigmoid' only).",
        min=0.0,
    )
    lower_steps: int = option(4, "T1, optimizer steps on P, Q (D1) per cycle.", min=1)
    upper_steps: int = option(1, "T2, optimizer steps on λ (D2) per cycle.", min=1)
    upper_lr: float = option(
        1e-3, "Learning rate of λ in param_groups() (the upper level).", min=0.0, min_exclusive=True
    )
    hypergradient: Literal["first_order", "darts"] = option(
        "first_order", "Upper-level gradient: first_order ∇λ L(D2), or darts (one unrolled lower step)."
    )
    unroll_lr: float | None = option(
        None, "ξ of the darts unrolled step (default: the bound optimizer's current lr of P, Q).", min=0.0
    )
    darts_radius: float = option(
        0.01, "darts finite-difference radius: ε = radius / ‖∇V' L(D2)‖.", min=0.0, min_exclusive=True
    )
    split: float = option(
        0.8,
        "Fraction of the training set in D1 (the rest is D2) for split_dataset / FlatTrainer.",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    )

    def validate(self) -> None:
        if self.split >= 1.0:
            raise ValueError("BilevelLoRAConfig.split must be in (0, 1) so that D2 is not empty; got 1.0")
        if self.gamma2 > 0 and self.g != "sigmoid":
            raise ValueError(
                f"BilevelLoRAConfig.gamma2 > 0 pushes sigmoid values towards 0 or 1; it needs g='sigmoid', "
                f"got g={self.g!r} (set gamma2=0)"
            )


def split_indices(n: int, fraction: float = 0.8, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded ``fraction : 1 - fraction`` split of ``range(n)`` into sorted (D1, D2) index lists.

    Both parts are non-empty; the same seed gives the same split (dedicated generator).

    Raises:
        ValueError: if ``n < 2`` or ``fraction`` is not in (0, 1).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"need at least 2 examples to split into D1 and D2, got n={n!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must be in (0, 1) (e.g. 0.8 for an 8:2 split), got {fraction!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    cut = max(1, min(n - 1, round(fraction * n)))
    return sorted(order[:cut]), sorted(order[cut:])


def split_dataset(dataset: Any, fraction: float = 0.8, seed: int = 0) -> tuple[Any, Any]:
    """(D1, D2) of a map-style dataset by :func:`split_indices` (``datasets.Dataset.select`` or Subset)."""
    first, second = split_indices(len(dataset), fraction, seed)
    if hasattr(dataset, "select"):
        return dataset.select(first), dataset.select(second)
    return torch.utils.data.Subset(dataset, first), torch.utils.data.Subset(dataset, second)


def _pq(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, dtype = a.shape[0], torch.promote_types(a.dtype, torch.float32)
    eye = torch.eye(r, device=a.device, dtype=dtype)
    return b.reshape(b.shape[0], r).to(dtype), a.reshape(r, -1).to(dtype), eye


def orthogonality_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R = ‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F² of one layer (P = lora_B, Q = lora_A weights), at least fp32."""
    p, q, eye = _pq(a, b)
    return (p.t() @ p - eye).pow(2).sum() + (q @ q.t() - eye).pow(2).sum()


def binary_penalty(lam: torch.Tensor) -> torch.Tensor:
    """R2 = Σ s(1 − s), s = sigmoid(λ): zero when every s is 0 or 1, largest at s = ½."""
    s = torch.sigmoid(lam.float())
    return (s * (1 - s)).sum()


@torch.no_grad()
def binary_penalty_grad(lam: torch.Tensor) -> torch.Tensor:
    """∂R2/∂λ = s(1 − s)(1 − 2s) in closed form (s = sigmoid(λ)), in λ's dtype."""
    s = torch.sigmoid(lam.float())
    return (s * (1 - s) * (1 - 2 * s)).to(lam.dtype)


@torch.no_grad()
def orthogonality_grads(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂R/∂A, ∂R/∂B) in closed form: ∂R/∂Q = 4(QQᵀ − I)Q, ∂R/∂P = 4P(PᵀP − I) (shapes of A, B)."""
    p, q, eye = _pq(a, b)
    grad_q = 4 * (q @ q.t() - eye) @ q
    grad_p = 4 * p @ (p.t() @ p - eye)
    return grad_q.reshape(a.shape).to(a.dtype), grad_p.reshape(b.shape).to(b.dtype)


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _full(a: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full(
        (a.shape[0],), value, dtype=torch.promote_types(a.dtype, torch.float32), device=a.device
    )


def _mean_over_ranks(tensors: list[torch.Tensor]) -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())


@register
class BilevelLoRA(Method):
    """BiLoRA: P, Q (lower level, D1) and per-rank λ (upper level, D2), alternating over optimizer steps."""

    config_class = BilevelLoRAConfig
    paper = (
        "BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient Low-Rank Adaptation of "
        "Large Pre-trained Models (Qiang, Zhang, Xie, 2024) arXiv:2403.13037"
    )
    passes = 1  # lower and first-order upper steps; a darts upper step runs four
    needs_upper_loss = True

    def _setup(self) -> None:
        for name, layer in self.layers:
            _peft.check_rank_scalable(name, layer, self.adapter)
        if not all(a.requires_grad and b.requires_grad for a, b in self.factors):
            raise ValueError(
                f"adapter {self.adapter!r} is not trainable; call model.train() / set_adapter first"
            )
        self._lower_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        start = 1.0 if self.config.g == "identity" else 0.0  # λ₀
        self.lambdas = [nn.Parameter(_full(a, start)) for a, _ in self.factors]
        self._g = _G[self.config.g]
        self._g0 = [self._g(lam.detach()).clone() for lam in self.lambdas]
        self._live = False  # λ carries gradient (upper level, inside backward)
        self._folded = False  # B holds P·diag(g̃(λ)) (exported / detached): the hooks pass through
        self._training_b: list[torch.Tensor] | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._pre_hooks: list[Any] = []
        self._scale_hooks = [
            _peft.add_rank_scale_hook(layer, self.adapter, functools.partial(self.rank_scale, i))
            for i, (_, layer) in enumerate(self.layers)
        ]

    # -- the pseudo-SVD adapter ---------------------------------------------------------------------

    @property
    def factors(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """``(A, B)`` = (Q, P) of every layer, read from the layers (FSDP2 replaces parameters)."""
        return [_peft.rank_factors(layer, self.adapter) for _, layer in self.layers]

    @property
    def lower(self) -> list[nn.Parameter]:
        """V: the parameters that were trainable at attach (P, Q, any head), looked up by name."""
        named = dict(self.model.named_parameters())
        return [named[n] for n in self._lower_names]

    def rank_scale(self, index: int) -> torch.Tensor | None:
        """g̃(λ) = g(λ)/g(λ₀) of layer ``index`` (``None`` while folded into B)."""
        if self._folded:
            return None
        with torch.set_grad_enabled(self._live and torch.is_grad_enabled()):
            return self._g(self.lambdas[index]) / self._g0[index]

    def upper_level(self) -> bool:
        """Whether the current optimizer step trains λ (upper level) rather than P, Q (lower level)."""
        return self.data_used(self.config, self.step)[1]

    @classmethod
    def data_used(cls, config: BilevelLoRAConfig, step: int) -> tuple[bool, bool]:
        """Lower steps read D1; upper steps read D2, and D1 too only for darts' unrolled step."""
        upper = step % (config.lower_steps + config.upper_steps) >= config.lower_steps
        return (not upper or config.hypergradient == "darts"), upper

    def parameters(self) -> list[nn.Parameter]:
        return [*self.lower, *self.lambdas]

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return list(self.lambdas)

    def own_parameters(self) -> dict[str, nn.Parameter]:
        return {f"bilevel_lora_lambda_{i}": lam for i, lam in enumerate(self.lambdas)}

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """V with ``weight_decay``; λ with no weight decay and its own ``lr = upper_lr``."""
        return [
            {"params": list(self.lower), "weight_decay": weight_decay},
            {"params": list(self.lambdas), "weight_decay": 0.0, "lr": self.config.upper_lr},
        ]

    @torch.no_grad()
    def _fold(self) -> None:
        for i, (_, layer) in enumerate(self.layers):
            _peft.fold_rank_scale_(layer, self.adapter, self.rank_scale(i))
        self._folded = True

    @contextlib.contextmanager
    def exported(self) -> Iterator[None]:
        if self._folded or not self._attached:
            yield
            return
        bs = [b for _, b in self.factors]
        self._training_b = snapshot(bs)
        self._fold()
        try:
            yield
        finally:
            if self._attached:  # detach() inside the block keeps the folded (stock) adapter
                restore_(bs, self._training_b)
                self._folded = False
            self._training_b = None

    # -- backward -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lambda_only(self) -> Iterator[None]:
        lower = self.lower
        flags = [p.requires_grad for p in lower]
        for p in lower:
            p.requires_grad_(False)
        self._live = True
        try:
            yield
        finally:
            self._live = False
            for p, flag in zip(lower, flags, strict=True):
                p.requires_grad_(flag)

    def _backward(self, loss_fn, backward_fn, upper_loss_fn=None, **kwargs):
        if upper_loss_fn is None or kwargs:
            raise TypeError(
                "bilevel_lora needs the D2 loss and nothing else: method.backward(loss_fn, "
                "upper_loss_fn=lambda: model(**d2_batch).loss); make D1/D2 with split_dataset(...)"
                + (f"; unexpected arguments {sorted(kwargs)}" if kwargs else "")
            )
        if not self.upper_level():
            loss = loss_fn()
            backward_fn(loss)
            return loss.detach()
        if self.config.hypergradient == "darts":
            return self._darts(loss_fn, upper_loss_fn, backward_fn)
        with self._unsynced(), self._lambda_only():
            loss = upper_loss_fn()
            backward_fn(loss)
        return loss.detach()

    def _unsynced(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync()`` for upper-level passes: λ is not in DDP (the pre-hook averages it) and
        they leave V without gradient, which DDP's reducer would wait for."""
        no_sync = getattr(getattr(self, "wrapper", None), "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def _xi(self) -> float:
        if self.config.unroll_lr is not None:
            return self.config.unroll_lr
        for opt in self._optimizers:
            for group in opt.param_groups:
                if any(p is self.lower[0] for p in group["params"]):
                    return float(group["lr"])
        raise ValueError(
            "bilevel_lora with hypergradient='darts' needs ξ: bind the optimizer that updates P, Q "
            "(method.bind(opt)) or set unroll_lr"
        )

    def _darts(self, loss_fn, upper_loss_fn, backward_fn):
        if model_is_sharded(self.model):
            raise ValueError(
                "bilevel_lora with hypergradient='darts' differentiates the loss with respect to the "
                "parameters (torch.autograd.grad), which FSDP2's sharded parameters do not receive; use "
                "hypergradient='first_order' under FSDP, or train with DDP"
            )
        xi, V, lams = self._xi(), self.lower, self.lambdas
        penalty = self._penalty_grads()
        rng = RngReplay()
        saved = snapshot(V)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._unsynced())
            stack.callback(restore_, V, saved)
            stack.callback(setattr, self, "_live", False)
            grads = torch.autograd.grad(loss_fn(), V, allow_unused=True)
            with torch.no_grad():  # V′ = V − ξ ∇_V [L(D1) + γ1 R]
                for p, g in zip(V, grads, strict=True):
                    step = _or_zeros(g, p).to(p.dtype)
                    if id(p) in penalty:
                        step = step + penalty[id(p)]
                    p.sub_(step, alpha=xi)
            self._live = True
            upper = upper_loss_fn()
            grads = torch.autograd.grad(upper, [*V, *lams], allow_unused=True)
            upper = upper.detach()  # its graph is not needed by the two passes below
            v, direct = grads[: len(V)], grads[len(V) :]
            eps = self.config.darts_radius / (float(global_norm(v)) + 1e-12)
            mixed = []
            for sign in (1.0, -1.0):
                restore_(V, saved)
                with torch.no_grad():
                    for p, d in zip(V, v, strict=True):
                        if d is not None:
                            p.add_(d.to(p.dtype), alpha=sign * eps)
                rng.replay()
                with self._lambda_only():
                    mixed.append(torch.autograd.grad(loss_fn(), lams, allow_unused=True))
        hyper = [
            _or_zeros(d, lam) - xi * (_or_zeros(gp, lam) - _or_zeros(gm, lam)) / (2 * eps)
            for lam, d, gp, gm in zip(lams, direct, *mixed, strict=True)
        ]
        backward_fn(sum((lam * h.detach()).sum() for lam, h in zip(lams, hyper, strict=True)))
        return upper.detach()

    # -- optimizer hooks ----------------------------------------------------------------------------

    def bind(self, optimizer: torch.optim.Optimizer) -> Method:
        """As :meth:`Method.bind`, plus a step pre-hook: clear the idle level's gradients, add γ1·∇R."""
        inner = optimizer
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        held = {id(p) for group in getattr(inner, "param_groups", []) for p in group["params"]}
        if isinstance(inner, torch.optim.Optimizer) and not all(id(lam) in held for lam in self.lambdas):
            raise ValueError(
                "this optimizer does not update bilevel_lora's λ (the upper level); build it from "
                "method.param_groups(weight_decay) or method.parameters(), not model.parameters()"
            )
        super().bind(optimizer)
        if all(o is not inner for o in self._optimizers):
            self._optimizers.append(inner)
            self._pre_hooks.append(inner.register_step_pre_hook(lambda *_: self._before_step()))
        return self

    def _penalty_grads(self) -> dict[int, torch.Tensor]:
        if self.config.gamma == 0.0:
            return {}
        out = {}
        for a, b in self.factors:  # FSDP2 shards: the penalty of the whole factors, placed like them
            ga, gb = orthogonality_grads(full(a), full(b))
            out[id(a)], out[id(b)] = like(ga.mul_(self.config.gamma), a), like(gb.mul_(self.config.gamma), b)
        return out

    @torch.no_grad()
    def _before_step(self) -> None:
        if self.upper_level():
            for p in self.lower:
                p.grad = None
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for lam in self.lambdas:
                    lam.grad = _or_zeros(lam.grad, lam)
                _mean_over_ranks([lam.grad for lam in self.lambdas])
            if self.config.gamma2 > 0:  # γ2·∇R2, once per upper step (the same on every rank)
                for lam in self.lambdas:
                    lam.grad = _or_zeros(lam.grad, lam).add_(
                        binary_penalty_grad(lam), alpha=self.config.gamma2
                    )
            return
        for lam in self.lambdas:
            lam.grad = None
        factor_by_id = {id(p): p for pair in self.factors for p in pair}
        for p_id, g in self._penalty_grads().items():
            p = factor_by_id[p_id]
            p.grad = g if p.grad is None else p.grad.add_(g)

    def _teardown(self) -> None:
        if not self._folded:
            self._fold()
        for handle in [*self._scale_hooks, *self._pre_hooks]:
            handle.remove()
        self._scale_hooks, self._pre_hooks, self._optimizers = [], [], []

    # -- state --------------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        bs = self._training_b if self._folded and self._training_b else [b for _, b in self.factors]
        return {"lambda": snapshot(self.lambdas), "lora_B": snapshot(full(b) for b in bs)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        lams, bs = state.get("lambda", []), state.get("lora_B", [])
        mine = [*self.lambdas, *(b for _, b in self.factors)]
        theirs = [*lams, *bs]
        if len(lams) != len(self.lambdas) or [t.shape for t in theirs] != [p.shape for p in mine]:
            raise ValueError(
                "bilevel_lora state was saved for other adapted layers or ranks; attach to the same "
                "PEFT model (same LoraConfig) before load_state_dict"
            )
        restore_(mine, [like(t.to(p.device, p.dtype), p) for t, p in zip(theirs, mine, strict=True)])
