"""The method contract (SPEC §2): one API for every method.

A method replaces ``loss.backward()`` by :meth:`Method.backward`, which leaves the method's gradients
in ``.grad`` (adding to what is there), and does its post-step work through an optimizer step
post-hook registered by :meth:`Method.bind`. It never owns the optimizer, the LR scheduler or the
grad scaler. Outside ``backward`` the model is at its clean weights: no noise, no perturbation, no
auxiliary adapter active.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from . import _peft
from ._sharded import model_is_sharded
from .config import MethodConfig

__all__ = ["LossFn", "Method", "attach", "unread_loss"]

LossFn = Callable[[], torch.Tensor]
BackwardFn = Callable[[torch.Tensor], Any]

_ATTR = "_flatpeft_method"


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


class Method:
    """Base class of every flatpeft method.

    Subclasses set ``config_class`` and ``paper`` and implement :meth:`_backward`; they may override
    :meth:`_setup`, :meth:`_after_step`, :meth:`_teardown`, :meth:`_extra_state`,
    :meth:`_load_extra_state` and :meth:`strength`.

    Class attributes declare what a method needs, so shared tests and integrations carry no
    per-method branches:

    - ``passes``: forward/backward passes per ``backward`` call.
    - ``needs_upper_loss``: ``backward`` also takes ``upper_loss_fn`` (a loss on a second data split).
    - ``needs_dense_base``: refuses quantized base layers (it perturbs the dense weight itself).
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    passes: ClassVar[int] = 1
    needs_upper_loss: ClassVar[bool] = False
    needs_dense_base: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: MethodConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config)}")
        inner = _peft.check_peft_model(model)
        if getattr(inner, _ATTR, None) is not None:
            raise ValueError(
                f"a flatpeft method ({getattr(inner, _ATTR).config.method!r}) is already attached to this "
                "model; call .detach() on it first"
            )
        self.model = inner
        # The DistributedDataParallel wrapper when attached through it (or set by an integration):
        # two-pass methods use its no_sync() when their first pass is not synchronised.
        self.wrapper: nn.Module | None = model if model is not inner else None
        self.config = config
        self.adapter = _peft.active_adapter(inner)
        self.layers = _peft.lora_layers(inner, self.adapter)
        self.step = 0
        self._hooks: dict[int, Any] = {}
        self._warned_unbound = False
        self._attached = True
        self._setup()
        object.__setattr__(inner, _ATTR, self)

    # -- the public contract ------------------------------------------------------------------------

    def backward(
        self, loss_fn: LossFn, *, backward_fn: BackwardFn | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Replace ``loss.backward()``: run the method's forward/backward pass(es) through ``loss_fn``.

        Args:
            loss_fn: Closure computing the loss with a forward pass (called once per pass).
            backward_fn: How to backpropagate a loss (default ``loss.backward()``; the Trainer
                integration passes ``accelerator.backward`` so loss scaling and AMP are honoured).
            **kwargs: Method-specific extras (e.g. ``upper_loss_fn`` when ``needs_upper_loss``).

        Returns:
            The detached loss of the first pass.

        Raises:
            TypeError: ``loss_fn`` (or ``upper_loss_fn``) is a computed loss rather than a closure.
        """
        for name, fn in [("loss_fn", loss_fn), *((k, v) for k, v in kwargs.items() if k.endswith("_fn"))]:
            if not callable(fn):
                raise TypeError(
                    f"method.backward takes a closure that computes the loss, not the loss itself: {name} "
                    f"is a {type(fn).__name__}. Pass method.backward(lambda: model(**batch).loss) (the "
                    "method runs the forward pass itself, once per pass); do not call loss.backward() too"
                )
        if not self._attached:
            raise RuntimeError("this method was detached; attach a new one with flatpeft.attach(...)")
        if not self._hooks and not self._warned_unbound:
            self._warned_unbound = True
            warnings.warn(
                f"{type(self).__name__}: no optimizer is bound, so the step counter only advances if you "
                "call method.after_step() after each optimizer step; prefer method.bind(optimizer)",
                stacklevel=2,
            )
        return self._backward(loss_fn, backward_fn or _plain_backward, **kwargs)

    @classmethod
    def data_used(cls, config: MethodConfig, step: int) -> tuple[bool, bool]:
        """Which micro-batches optimizer step ``step`` (0-based) reads: (a training batch, through
        ``loss_fn``; an upper-split batch, through ``upper_loss_fn``). A loop draws only those, so no
        example is drawn and thrown away (BiLoRA's first-order upper steps read no training batch)."""
        return True, cls.needs_upper_loss

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer must update (trainable model parameters, auxiliary ones included)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients a max-norm clip covers (``flatpeft train``, ``FlatTrainer``;
        in a plain loop: ``clip_grad_norm_(method.clip_parameters(), max_norm)``). All of
        :meth:`parameters` unless a method says otherwise (Bi-LoRA leaves its ascent out)."""
        return self.parameters()

    def own_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters the method keeps outside the model (e.g. BiLoRA's λ), by stable names
        without dots, for code that addresses parameters by name (``torch.distributed.checkpoint``)."""
        return {}

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters that must get no weight decay (e.g. an adversarial auxiliary branch)."""
        return []

    def param_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: :meth:`parameters` with ``weight_decay``, except
        :meth:`no_decay_parameters` (weight decay 0). Methods with per-level learning rates add
        groups carrying their own ``lr``. Use as ``AdamW(method.param_groups(0.01), lr=...)``.
        """
        no_decay = {id(p) for p in self.no_decay_parameters()}
        groups = [
            {"params": [p for p in self.parameters() if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in self.parameters() if id(p) in no_decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def bind(self, optimizer: torch.optim.Optimizer) -> Method:
        """Run :meth:`after_step` after every ``optimizer.step()`` (idempotent, Accelerate-aware)."""
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"bind() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if id(inner) not in self._hooks:
            self._hooks[id(inner)] = inner.register_step_post_hook(lambda *_: self.after_step())
        return self

    def after_step(self) -> None:
        """Post-optimizer-step work, then advance :attr:`step`. Called by the hook :meth:`bind` adds."""
        self._after_step()
        self.step += 1

    def detach(self) -> nn.Module:
        """Remove every hook and auxiliary piece and let go of the DDP wrapper (so a loop can free it
        before destroying the process group); return the vanilla PEFT model."""
        if self._attached:
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()
            self._teardown()
            self.wrapper = None
            if getattr(self.model, _ATTR, None) is self:
                object.__delattr__(self.model, _ATTR)
            self._attached = False
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (config, step counter, method buffers)."""
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "step": self.step,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: if the state belongs to another method or another configuration.
        """
        if state.get("method") != self.config.method:
            raise ValueError(f"state is for method {state.get('method')!r}, not {self.config.method!r}")
        mine = self.config.to_dict()
        theirs = state.get("config", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(
                f"state was saved with a different configuration (fields {diff}); attach with it"
            )
        self.step = int(state["step"])
        self._load_extra_state(state.get("extra", {}))

    def set_wrapper(self, wrapper: nn.Module) -> Method:
        """Tell the method the ``DistributedDataParallel`` wrapper of its model.

        Attach before wrapping (a method may add parameters), then call this so a two-pass method
        whose first pass is not synchronised (``sync_first_pass=False``) can use ``no_sync()``.
        ``FlatTrainer`` does it itself.
        """
        self.wrapper = wrapper if wrapper is not self.model else None
        return self

    def strength(self) -> dict[str, float]:
        """The current perturbation strength(s) for logging, e.g. ``{"sigma": 0.03}``."""
        return {}

    def set_total_steps(self, total_steps: int) -> None:
        """Set T (total optimizer steps) in the config, for methods whose config has ``total_steps``."""
        if self.config.has_field("total_steps"):
            self.config = self.config.replace(total_steps=int(total_steps))

    @contextlib.contextmanager
    def exported(self) -> Iterator[None]:
        """Within the block, the primary adapter holds stock LoRA weights for saving.

        A method whose adapter is not a stock LoRA adapter while training (e.g. a per-rank scale
        between A and B) folds it in here and restores its training form exactly on exit. The
        Trainer integration saves checkpoints inside this block.
        """
        yield

    # -- hooks for subclasses -----------------------------------------------------------------------

    def _first_pass_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for a two-pass method's first pass: DDP's ``no_sync()`` unless ``sync``.

        Synchronised (the default), every rank perturbs along the all-reduced gradient, identically;
        unsynchronised, each rank perturbs along its own shard's gradient (the second pass is always
        synchronised, so the adapters stay identical across ranks either way).

        Raises:
            ValueError: unsynchronised on an FSDP2-sharded model, whose backward always reduce-scatters.
        """
        if not sync and model_is_sharded(self.model):
            raise ValueError(
                f"{self.config.method}: sync_first_pass=False needs DDP's no_sync(); under FSDP2 every "
                "backward reduce-scatters the gradient over ranks. Keep the default sync_first_pass=True"
            )
        no_sync = getattr(self.wrapper, "no_sync", None)
        return contextlib.nullcontext() if sync or no_sync is None else no_sync()

    def _setup(self) -> None:
        """Validate the model for this method and build any state; raise ``ValueError`` with the fix."""

    def _backward(self, loss_fn: LossFn, backward_fn: BackwardFn, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _after_step(self) -> None:
        """Work after each optimizer step (before :attr:`step` advances)."""

    def _teardown(self) -> None:
        """Undo :meth:`_setup` (remove auxiliary adapters, hooks)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_extra_state` output."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.step}, config={self.config})"


def unread_loss() -> torch.Tensor:
    """The loss closure a loop passes for data an optimizer step does not read (:meth:`Method.data_used`):
    a method that calls it anyway fails loudly instead of drawing a batch that was never meant for it."""
    raise RuntimeError("this optimizer step reads no micro-batch of this data (see Method.data_used)")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer under wrappers such as ``accelerate.AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def attach(
    model: nn.Module, method: str | MethodConfig = "lora", *, total_steps: int | None = None, **overrides: Any
) -> Method:
    """Attach a flatpeft method to a PEFT LoRA model or any module carrying PEFT LoRA layers.

    Call it before building the optimizer, then ``optimizer = Opt(method.parameters())`` and
    ``method.bind(optimizer)``.

    Args:
        model: A ``peft.PeftModel``, or any module with PEFT LoRA layers (diffusers' or Transformers'
            ``add_adapter``, ``peft.inject_adapter_in_model``), possibly wrapped by DDP.
        method: A registry name (see :func:`flatpeft.list_methods`) or a config instance.
        total_steps: Number of optimizer steps of the run, for methods with a schedule over T
            (ignored by the others, so a loop can pass it whatever the method).
        **overrides: Config fields to set, e.g. ``sigma=0.1``.

    Returns:
        The attached :class:`Method`.

    Raises:
        ValueError: unknown method or option, invalid option value, a model without LoRA layers or
            whose LoRA layers are disabled or run several adapters, a layer the method cannot perturb,
            or a model that already has a method attached.
        TypeError: ``model`` is neither a PEFT model nor a module with LoRA layers.
    """
    from .registry import get_method, make_config

    name = method.method if isinstance(method, MethodConfig) else method
    if total_steps is not None and get_method(name).config_class.has_field("total_steps"):
        overrides = {"total_steps": total_steps, **overrides}
    config = make_config(method, **overrides)
    return get_method(config.method)(model, config)
