"""Transformers integration: ``FlatTrainer`` and ``FlatTrainerMixin`` (SPEC §2).

The mixin keeps everything the Trainer already does (loss computation and scaling for gradient
accumulation, ``accelerator.backward`` with AMP loss scaling, its optimizer choice and weight-decay
rules) and changes three things:

- the method is attached when the optimizer is built, with T = the Trainer's own max steps, and bound
  to the optimizer so post-step work runs exactly once per optimizer step;
- ``training_step`` hands the method a closure that runs the Trainer's own ``training_step`` with
  ``accelerator.backward`` intercepted, so one- and two-pass methods see exactly the loss the
  Trainer would have backpropagated, and backpropagate it with ``accelerator.backward``;
- checkpoints also hold ``flatpeft_method.pt`` (the method state) and only the primary adapter;
- for a method with steps that read no training batch (``Method.data_used``: BiLoRA's first-order
  upper steps), the Trainer's own dataloader yields, step by step, the split that step reads (see
  :class:`FlatTrainerMixin`), so no training batch is drawn and thrown away.

Usage with another Trainer subclass (e.g. TRL's ``SFTTrainer``)::

    class FlatSFTTrainer(FlatTrainerMixin, SFTTrainer):
        pass

    trainer = FlatSFTTrainer(model=peft_model, args=..., train_dataset=..., method="flat_lora",
                             method_config={"sigma": 0.05})
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from transformers import Trainer

from .. import _peft
from ..config import MethodConfig
from ..method import Method, attach, unread_loss, unwrap_optimizer
from ..registry import get_method, make_config
from ._levels import SIDE, Levels, LevelSampler

__all__ = ["METHOD_STATE_NAME", "FlatTrainer", "FlatTrainerMixin"]

METHOD_STATE_NAME = "flatpeft_method.pt"


class FlatTrainerMixin:
    """Adds a flatpeft method to a ``transformers.Trainer`` subclass.

    Data flow of a bi-level method (``needs_upper_loss``). The training set is split into D1 (the
    Trainer's ``train_dataset`` from then on) and D2 (``upper_dataset``), unless D2 is given. Which
    split optimizer step ``s`` reads is ``Method.data_used(config, s)``; when the run has upper steps
    (steps that read D2) besides steps that do not (BiLoRA: lower steps read D1, upper steps D2, and
    D1 as well with darts), ``get_train_dataloader`` builds the Trainer's own dataloader over D1 + D2
    in an arranged order:

    - D1 and D2 are each an endless sequence of passes (a permutation per pass, seeded by
      ``data_seed``, else ``seed``), cut into global micro-batches of ``per_device_train_batch_size``
      examples per process; consecutive groups of ``num_processes`` batches of the loader are one
      global micro-batch, which Accelerate's batch sharding deals out to the ranks (one batch of
      ``per_device_train_batch_size`` examples split between the ranks with ``split_batches``);
    - the ``gradient_accumulation_steps`` micro-batches of a step that reads D2 come from D2, those
      of every other step from D1, each stream taken in order, so every D1 example reaches the lower
      level once per pass, and no D1 batch is drawn on an upper step;
    - an epoch is the number of optimizer steps in which the lower level sees D1 once, counted from
      step 0, so the step count follows (BiLoRA with T1 = 4, T2 = 1 runs 5/4 as many steps per epoch
      as plain LoRA). The streams run on across epochs: when an epoch is not a whole number of
      T1 + T2 cycles, a later epoch has one lower step more or less than the first, and the D1
      passes drift across epoch boundaries (no example is skipped or repeated within a pass);
    - ``training_step`` hands the Trainer's batch to ``upper_loss_fn`` on a step that reads D2 and to
      ``loss_fn`` otherwise; a step that reads both (darts) takes its D1 batches from a third stream
      (D1 again, its own seeded passes), drawn by the rank's share like the loader's;
    - the arrangement is a pure function of the step, the seed, the sizes and the number of
      processes, and the method's level follows the Trainer's step (``global_step``), so
      ``resume_from_checkpoint``, which skips the batches of the steps already taken, continues the
      same sequence, and the Trainer's ``train_sampling_strategy`` does not apply to this loader.

    Otherwise (every step reads both splits, or a run too short to reach an upper step) the Trainer's
    dataloader is unchanged and the D2 batches come from a second loader over ``upper_dataset``.

    Args:
        method: Registry name or config instance (default ``"lora"``).
        method_config: Config overrides, e.g. ``{"sigma": 0.1}``. ``total_steps`` is taken from the
            Trainer's max steps and ``seed`` from ``TrainingArguments.seed`` unless given here (or in a
            config instance passed as ``method``), so runs with different Trainer seeds draw different
            noise, auxiliary starts and data splits.
        upper_dataset: For methods with ``needs_upper_loss`` (bi-level), the D2 split; by default the
            training set is split with the config's ``split`` fraction and its ``seed``.
        *args, **kwargs: Passed to the Trainer.
    """

    def __init__(
        self,
        *args: Any,
        method: str | MethodConfig = "lora",
        method_config: dict[str, Any] | None = None,
        upper_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        overrides = dict(method_config or {})
        self._user_total_steps = "total_steps" in overrides
        self.flat_config = make_config(method, **_with_placeholder_steps(method, overrides))
        self.flat_method: Method | None = None
        super().__init__(*args, **kwargs)
        if "seed" not in overrides and not isinstance(method, MethodConfig):
            self.flat_config = self.flat_config.replace(seed=int(self.args.seed))
        self._upper_loader = None
        self._upper_iter = None
        self._levels: Levels | None = None  # the arranged stream, when get_train_dataloader built one
        self._levels_data: Any = None
        self._side: list[Any] | None = None  # (step, D1 batches, items, next) of a step reading both
        if get_method(self.flat_config.method).needs_upper_loss:
            if upper_dataset is None:
                from ..methods.bilevel_lora import split_dataset

                self.train_dataset, upper_dataset = split_dataset(
                    self.train_dataset, getattr(self.flat_config, "split", 0.8), self.flat_config.seed
                )
            self.upper_dataset = upper_dataset

    # -- attaching the method where the optimizer is built -------------------------------------------

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self._flat_steps = num_training_steps
        super().create_optimizer_and_scheduler(num_training_steps)

    def _ensure_method(self) -> Method:
        if self.flat_method is None:
            steps = (
                getattr(self, "_flat_steps", None)
                or getattr(self.state, "max_steps", 0)
                or self.args.max_steps
            )
            config = self.flat_config
            if steps and steps > 0 and not self._user_total_steps and config.has_field("total_steps"):
                config = config.replace(total_steps=int(steps))
            self.flat_method = attach(self.model, config)
        return self.flat_method

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        method = self._ensure_method()
        no_decay = {id(p) for p in method.no_decay_parameters()}
        return [n for n, p in model.named_parameters() if n in names and id(p) not in no_decay]

    def create_optimizer(self, model=None):
        method = self._ensure_method()
        if getattr(self, "is_fsdp_enabled", False) and method.own_parameters():
            raise ValueError(
                f"{method.config.method} keeps trainable parameters outside the model "
                f"({', '.join(method.own_parameters())}), which Accelerate's FSDP cannot map to the sharded "
                "model; train it with `torchrun -m flatpeft train --fsdp`, or with FlatTrainer under DDP"
            )
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        _apply_group_options(optimizer, method.param_groups(self.args.weight_decay))
        method.bind(optimizer)
        return optimizer

    def _clip_grad_norm(self, model):
        """Clip :meth:`Method.clip_parameters` (Bi-LoRA: the descent gradients only; BiLoRA: λ, kept
        outside the model, included) instead of the model's parameters, where the Trainer clips through
        this hook; the Trainer's own clip when the two are the same parameters."""
        method = self._ensure_method()
        clip = method.clip_parameters()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if {id(p) for p in clip} == {id(p) for p in trainable}:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(clip, self.args.max_grad_norm)

    # -- the step -----------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        method = self._ensure_method()
        method.set_wrapper(model)  # the DDP wrapper the Trainer made, for no_sync
        accelerator = self.accelerator
        real_backward = accelerator.backward
        captured: dict[str, Any] = {}

        def run(batch, items=num_items_in_batch) -> torch.Tensor:
            # The Trainer's own step, with its backward replaced by capturing the loss it would use.
            def capture(loss, **bw_kwargs):
                captured["loss"], captured["kwargs"] = loss, bw_kwargs

            accelerator.backward = capture
            try:
                parent = super(FlatTrainerMixin, self)
                parent.training_step(model, dict(batch), items, *args, **kwargs)
            finally:
                del accelerator.backward
            return captured["loss"]

        if getattr(self, "_flat_zeroed", None) != self.state.global_step:
            # The Trainer zeroes the gradients with model.zero_grad() between optimizer steps; those of
            # parameters the method keeps outside the model (BiLoRA's λ) are zeroed here, at the first
            # micro-batch of every step, or they would carry into the next step's clip and update.
            self._flat_zeroed = self.state.global_step
            for p in method.own_parameters().values():
                p.grad = None
        self._flat_strength = method.strength()  # logged with this step's loss
        loss_fn, extra = (lambda: run(inputs)), {}
        if method.needs_upper_loss and self._levels is not None:
            # The loader drew this batch for the Trainer's step; the level follows it (an fp16 step
            # the scaler skipped has consumed its batches too).
            step = self.state.global_step
            method.step = step
            reads_d1, reads_d2 = self._levels.used(step)
            if reads_d2:
                extra["upper_loss_fn"] = loss_fn
                loss_fn = unread_loss
                if reads_d1:
                    d1_batch, items = self._next_side_batch(step)
                    loss_fn = lambda: run(d1_batch, items)  # noqa: E731
            else:
                extra["upper_loss_fn"] = unread_loss
        elif method.needs_upper_loss:
            upper = self._next_upper_batch()
            extra["upper_loss_fn"] = lambda: run(upper)
        loss = method.backward(
            loss_fn, backward_fn=lambda loss: real_backward(loss, **captured["kwargs"]), **extra
        )
        return loss

    # -- the data of bi-level methods -----------------------------------------------------------------

    def get_train_dataloader(self):
        """The Trainer's dataloader; over D1 + D2 in the arranged order when a step reads no D1."""
        self._levels, self._levels_data, self._side = self._arrange(), None, None
        if self._levels is None:
            return super().get_train_dataloader()
        saved = self.train_dataset
        self._levels_data = torch.utils.data.ConcatDataset([saved, self.upper_dataset])
        self.train_dataset = self._levels_data  # for the Trainer's loader only (D1 stays train_dataset)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = saved

    def _get_train_sampler(self, *args: Any, **kwargs: Any):
        dataset = args[0] if args else kwargs.get("train_dataset", self.train_dataset)
        levels = self._levels
        if levels is None or dataset is not self._levels_data:
            return super()._get_train_sampler(*args, **kwargs)
        # The epoch from the Trainer's step when the loader starts an epoch: Accelerate does not
        # forward set_epoch through the wrappers it puts around a sampler when skipping on resume.
        return LevelSampler(levels, lambda: self.state.global_step // levels.steps_per_epoch)

    def _arrange(self) -> Levels | None:
        """The arranged stream, or ``None`` unless the Trainer's usual run (one epoch over D1 per
        epoch, or ``max_steps``) has upper steps (steps that read D2) besides steps that do not."""
        if not get_method(self.flat_config.method).needs_upper_loss:
            return None
        args, accelerator = self.args, self.accelerator
        used = functools.partial(get_method(self.flat_config.method).data_used, self.flat_config)
        d1, d2 = self.train_dataset, self.upper_dataset
        lengths = [_length(d) for d in (d1, d2)]
        size = self._train_batch_size * (1 if accelerator.split_batches else accelerator.num_processes)
        accum = args.gradient_accumulation_steps
        if lengths[0] is not None:
            per_epoch = math.ceil(lengths[0] / (size * accum))
            steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        else:
            steps = args.max_steps
        reads = {tuple(used(s)) for s in range(max(1, steps))}
        if not any(d2 for _, d2 in reads) or reads == {(True, True)}:
            return None  # no upper step, or every step reads both splits
        if None in lengths or 0 in lengths:
            raise ValueError(
                f"{self.flat_config.method} has upper steps (steps that read D2) besides lower ones, so "
                "FlatTrainer arranges D1 and D2 in one loader; both need a length (map-style datasets, "
                f"not IterableDataset) and at least one example, got sizes {lengths}"
            )
        seed = args.data_seed if args.data_seed is not None else args.seed
        return Levels(used, lengths[0], lengths[1], size, accum, int(seed))

    def _next_side_batch(self, step: int) -> tuple[Any, Any]:
        """This rank's D1 micro-batch for a step that reads D2 and D1 (darts), with the step's count
        of loss items over its D1 micro-batches (as the Trainer counts its own)."""
        levels = self._levels
        if self._side is None or self._side[0] != step:
            first = levels.accum * levels.count(levels.reads_both, step)
            share = levels.size // self.accelerator.num_processes
            mine = slice(self.accelerator.process_index * share, (self.accelerator.process_index + 1) * share)
            collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
            batches = [
                collate([self.train_dataset[i] for i in levels.batch(SIDE, first + k)[mine]])
                for k in range(levels.accum)
            ]
            batches, items = self.get_batch_samples(iter(batches), len(batches), self.args.device)
            self._side = [step, batches, items, 0]
        _, batches, items, k = self._side
        self._side[3] = k + 1
        return batches[k % len(batches)], items

    def _next_upper_batch(self):
        if self._upper_loader is None:
            self._upper_loader = self._get_upper_dataloader()
        while True:
            if self._upper_iter is None:
                self._upper_iter = iter(self._upper_loader)
            try:
                return next(self._upper_iter)
            except StopIteration:
                self._upper_iter = None

    def _get_upper_dataloader(self):
        saved = self.train_dataset
        try:
            self.train_dataset = self.upper_dataset
            return super().get_train_dataloader()
        finally:
            self.train_dataset = saved

    # -- checkpoints and logs -------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Every rank runs save_model; under FSDP the Trainer gathers the sharded weights here, so the
        # adapter is put in its stock form around the gather as well as the write.
        method = self.flat_method
        if method is None:
            return super().save_model(output_dir, _internal_call)
        with method.exported():
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        method = self.flat_method
        if method is None:
            return super()._save(output_dir, state_dict)
        with method.exported():  # already inside it when called through save_model
            super()._save(output_dir, state_dict)  # FSDP: the whole weights the Trainer gathered
        if self.args.should_save:
            _peft.prune_saved_adapters(output_dir or self.args.output_dir, self.model, keep=method.adapter)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Inside the Trainer's checkpoint lifecycle: next to the optimizer state it belongs with, before
        # trainer_state.json and the rotation of old checkpoints, written atomically.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.flat_method is None:
            return
        state = self.flat_method.state_dict()  # on every rank: under FSDP a method gathers its tensors
        if self.args.should_save:
            path = os.path.join(output_dir, METHOD_STATE_NAME)
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                torch.save(state, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if not checkpoint or self.flat_method is None:
            return
        path = os.path.join(checkpoint, METHOD_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} is missing: {checkpoint} holds no flatpeft method state, so the method would "
                "restart at step 0. Resume from a checkpoint a FlatTrainer wrote, or train without "
                "resume_from_checkpoint"
            )
        from .._runfolder import load_state

        state = load_state(path)
        if not self._user_total_steps and self.flat_method.config.has_field("total_steps"):
            self.flat_method.set_total_steps(state["config"]["total_steps"])
        self.flat_method.load_state_dict(state)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.flat_method is not None and "loss" in logs:
            logs.update(getattr(self, "_flat_strength", {}))
        super().log(logs, *args, **kwargs)


class FlatTrainer(FlatTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains with a flatpeft method (see :class:`FlatTrainerMixin`)."""


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _with_placeholder_steps(method: str | MethodConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    # The config is validated now, but T is only known when training starts: use a placeholder.
    name = method.method if isinstance(method, MethodConfig) else method
    cls = get_method(name).config_class
    unset = not isinstance(method, MethodConfig) or getattr(method, "total_steps", None) is None
    if cls.has_field("total_steps") and "total_steps" not in overrides and unset:
        return {**overrides, "total_steps": 1}
    return overrides


def _apply_group_options(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Give each method group that sets its own options (e.g. ``lr``), or that holds parameters the
    Trainer did not collect from the model (e.g. per-rank scales kept by the method), its own group."""
    inner = unwrap_optimizer(optimizer)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    for group in groups:
        options = {k: v for k, v in group.items() if k not in ("params", "weight_decay")}
        if not options and all(id(p) in held for p in group["params"]):
            continue
        ids = {id(p) for p in group["params"]}
        for existing in inner.param_groups:
            existing["params"] = [p for p in existing["params"] if id(p) not in ids]
        inner.param_groups[:] = [g for g in inner.param_groups if g["params"]]
        new = {k: v for k, v in inner.defaults.items() if k != "params"}
        new.update(group)
        new["params"] = list(group["params"])
        inner.add_param_group(new)
