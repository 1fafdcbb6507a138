"""The reference training loop behind ``flatpeft train``: readable, linear, exactly resumable.

    splits  = load_splits(...)                      # seeded, stratified train / val / test
    model   = get_peft_model(load_model(...), LoraConfig(...))
    method  = flatpeft.attach(model, name, total_steps=T, seed=seed, **options)
    opt     = AdamW(method.param_groups(weight_decay), lr);  method.bind(opt)
    for step in range(T):
        for micro_batch in step's micro-batches:    # gradient accumulation
            method.backward(lambda: loss(model, micro_batch) / accum)
        clip; opt.step(); scheduler.step(); opt.zero_grad()
        every N steps: checkpoint (trainable weights, optimizer, scheduler, method state, RNG)
    method.detach(); model.save_pretrained(out / "adapter")

The data order is a pure function of (seed, micro-batch index), so a checkpoint only needs the step
counter, the RNG state and the states of the model, optimizer, scheduler and method: ``--resume``
gives the same final adapter as an uninterrupted run. Every input is checked before the run folder is
created, so a bad option writes nothing. A NaN/inf loss stops the run before the optimizer step and
leaves the last good checkpoint as it was. Ctrl-C or SIGTERM stops at the next step boundary with a
checkpoint (under torchrun every rank agrees on the step), and the last step is always checkpointed.
The run folder's lock, resume checks and file formats: see ``_runfolder``.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs data-parallel: the process group is started
(gloo on CPU, NCCL on CUDA), the method is attached and the model then wrapped in
``DistributedDataParallel``. Every rank draws the same micro-batches and trains on its strided share of
each (rank r takes examples r, r + world, ...), its loss weighted so that the ranks' averaged gradient
is the gradient of the whole micro-batch: 2 ranks compute what 1 process computes on the concatenated
batch, with the same effective batch size and number of optimizer steps. Rank 0 alone writes the run
folder and evaluates (on the full held-out sets); the metrics are broadcast to every rank. Checkpoints
keep every rank's RNG state, so ``--resume`` under torchrun (same number of processes) continues exactly.
Every micro-batch's backward all-reduces (two-pass methods need synchronised gradients mid-step); the
example weighting is exact for classification, per-example for causal-LM (as gradient accumulation is).

Large models (``_scale`` prepares them): ``--precision bf16|fp16`` (autocast; fp16 with a grad scaler whose
skipped steps skip the optimizer and LR steps), ``--gradient-checkpointing``, ``--load-in-4bit|8bit``
(bitsandbytes) and ``--fsdp``: under torchrun the model is sharded with FSDP2 instead of wrapped in DDP,
checkpoints hold ``torch.distributed.checkpoint`` shards written by every rank, and every rank evaluates
(each forward all-gathers the weights) while rank 0 writes. The options and their checks live in
``_train_config``.
"""

from __future__ import annotations

import datetime
import json
import math
import resource
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _runfolder, _scale
from . import data as data_lib
from . import models as model_lib
from ._evaluate import evaluate
from ._evaluate import sharpness as sharpness_of
from ._runfolder import (
    _checkpoints,
    _git_revision,
    _load_checkpoint,
    _rng_state,
    _save_checkpoint,
    _versions,
)
from ._scale import Precision, Ranks
from ._strict_json import dumps, write_json
from ._train_config import (
    FULL,
    ConfigError,
    TrainConfig,
    _method_config,
    apply_method_spec,
    check_model_limits,
    coerce,
    lr_scheduler,
    parse_method_spec,
    resolve,
)
from .method import unread_loss
from .methods.full import FullFineTune
from .registry import get_method, list_methods

__all__ = [
    "FULL",
    "ConfigError",
    "Diverged",
    "Interrupted",
    "TrainConfig",
    "apply_method_spec",
    "coerce",
    "evaluate",
    "parse_method_spec",
    "resolve",
    "train",
]


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


class Interrupted(RuntimeError):
    """The run was stopped by Ctrl-C or SIGTERM after writing a checkpoint.

    Attributes:
        signum: the signal that stopped it (``flatpeft`` exits with 128 + ``signum``).
    """

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


#: the signals that stop a run at the next step boundary with a checkpoint (SIGTERM: how torchrun,
#: Slurm and Kubernetes preempt)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


# -- data parallelism (torchrun) ------------------------------------------------------------------


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s dropout stream after setup (rank 0 keeps the single-process one)."""
    return seed * 1_000_003 + 7919 * rank


# -- preparing a run (checks everything, writes nothing) --------------------------------------------


@dataclass
class Run:
    cfg: TrainConfig
    splits: data_lib.Splits
    upper: list[data_lib.Example]
    model: nn.Module
    tokenizer: Any
    method: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    device: torch.device
    net: nn.Module  # what the loss is computed through: the DistributedDataParallel wrapper or the model
    ranks: Ranks
    precision: Precision

    def batch(self, examples: list[data_lib.Example]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        made = data_lib.make_batch(cfg.task, self.tokenizer, examples, cfg.max_length, cfg.chat_template)
        return {k: v.to(self.device) for k, v in made.items()}


def _micro_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def _data_used(cfg: TrainConfig) -> Any:
    """``step -> (reads a training batch, reads an upper-split batch)`` for the run's method."""
    if cfg.method == FULL:
        return lambda step: FullFineTune.data_used(None, step)
    cls, config = get_method(cfg.method), _method_config(cfg, 1)
    return lambda step: cls.data_used(config, step)


def _steps_reading(cfg: TrainConfig, reading: int) -> int:
    """The number of optimizer steps of which ``reading`` read the training set for the lower level
    (BiLoRA's upper steps do not; darts' look-ahead batches come from a stream of their own: every D1
    example reaches the lower level once per epoch, and the step count follows)."""
    used, steps, count = _data_used(cfg), 0, 0
    while count < reading:
        count += _reads_lower(used(steps))
        steps += 1
    return steps


def _reads_lower(reads: tuple[bool, bool]) -> bool:
    """Whether a step that reads ``(training batch, upper batch)`` trains on the lower-level stream
    (a step reading both is a darts upper step: its training batch is the look-ahead one)."""
    return reads[0] and not reads[1]


def prepare(cfg: TrainConfig, ranks: Ranks | None = None) -> Run:
    """Load the data, model and method and build the optimizer and scheduler; write nothing.

    Under torchrun (``ranks.world > 1``) every rank builds the same model and method (same seeds), then
    wraps the model in ``DistributedDataParallel`` (or shards it with FSDP2) and reseeds its own dropout
    stream. Precision, checkpointing, quantization and sharding: see ``_scale``.

    Raises:
        ValueError (``DataError``, ``ModelError``, ``ConfigError``): anything wrong with the inputs.
    """
    ranks = ranks or Ranks(device=_scale.device_for(cfg.device))
    _scale.check_environment(cfg, ranks.world)
    if cfg.method != FULL:
        get_method(cfg.method)
    model_lib.resolve_model(cfg.model, cfg.task)  # cheap check before reading the data
    splits = data_lib.load_splits(
        cfg.data,
        task=cfg.task,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        prompt_column=cfg.prompt_column,
        response_column=cfg.response_column,
        val_size=cfg.val_size,
        test_size=cfg.test_size,
        train_size=cfg.train_size,
        seed=cfg.data_seed,
        eval_data=cfg.eval_data,
    )
    train_set, upper = splits.train, []
    bilevel = cfg.method != FULL and get_method(cfg.method).needs_upper_loss
    if cfg.upper_data == "val" and not bilevel:
        raise ConfigError(
            f"--upper-data val is for methods with an upper level (bilevel_lora), not {cfg.method}"
        )
    if bilevel and cfg.upper_data == "val":  # D2 = the validation split, D1 = the whole training set
        upper = splits.val
        if not upper:
            raise ConfigError("--upper-data val needs a validation split: set --val-size > 0")
    elif bilevel:
        d1 = getattr(_method_config(cfg, 1), "split", 0.8)  # D1 : D2 = split : 1 - split
        n1 = round(d1 * len(splits.train))
        train_set, upper = data_lib.stratified_split(splits.train, [max(n1, 1), None], cfg.data_seed + 2)
        if not upper or not train_set:
            raise ConfigError(f"{cfg.method}: split={d1} leaves an empty D1 or D2; use more training data")
        splits.train = train_set
    micro = _micro_per_epoch(len(train_set), cfg.batch_size)
    reading = max(1, math.ceil(cfg.epochs * micro / cfg.grad_accum))  # steps that read the training set
    total_steps = cfg.max_steps or _steps_reading(cfg, reading)
    method_config = _method_config(cfg, total_steps)

    device = ranks.device
    torch.manual_seed(cfg.seed)
    num_labels = max(len(splits.labels), 2)
    load_options = _scale.load_options(cfg, device)
    model, tokenizer = model_lib.load_model(cfg.model, cfg.task, num_labels, cfg.seed, **load_options)
    check_model_limits(cfg, getattr(model, "config", None), tokenizer)
    if "quantization_config" not in load_options:  # a quantized model is loaded onto the device
        model.to(device)  # before the method attaches, so its buffers and auxiliary adapters follow
    model = _scale.prepare_base(model, cfg)
    if method_config is None:
        method = FullFineTune(model)
    else:
        import peft

        task_type = "SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM"
        targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else cfg.target_modules
        lora = peft.LoraConfig(
            task_type=task_type, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets,
        )  # fmt: skip
        try:
            model = peft.get_peft_model(model, lora)
        except ValueError as e:
            raise ConfigError(f"LoRA: {e} (check --target-modules)") from e
        from .method import attach

        _scale.keep_trainable_fp32(model)
        method = attach(model, method_config)
    model.train()
    net = model
    # After attach: a method may add parameters (Bi-LoRA's auxiliary adapter).
    if cfg.fsdp:  # sharded in place; FSDP2 has no no_sync wrapper to tell the method about
        _scale.shard(model)
    elif ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.needs_upper_loss,  # a bilevel upper step leaves some unused
        )
        method.set_wrapper(net)
    if ranks.rank:
        torch.manual_seed(_rank_seed(cfg.seed, ranks.rank))  # other dropout masks on other data
    optimizer = torch.optim.AdamW(method.param_groups(cfg.weight_decay), lr=cfg.lr)
    method.bind(optimizer)
    scheduler = lr_scheduler(cfg, optimizer, total_steps)
    precision = Precision(cfg.precision, device, sharded=cfg.fsdp)
    return Run(
        cfg, splits, upper, model, tokenizer, method, optimizer, scheduler, total_steps, device, net, ranks,
        precision,
    )  # fmt: skip


# -- data order ------------------------------------------------------------------------------------


class Stream:
    """Micro-batch ``j`` of an endless, seeded sequence of epochs (a pure function of ``j``)."""

    def __init__(self, examples: list[data_lib.Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = _micro_per_epoch(len(examples), batch_size)
        self._epoch, self._order = -1, torch.empty(0)

    def __getitem__(self, j: int) -> list[data_lib.Example]:
        epoch, pos = divmod(j, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.examples), generator=g)
        idx = self._order[pos * self.batch_size : (pos + 1) * self.batch_size]
        return [self.examples[i] for i in idx.tolist()]


def _forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


# -- the loop --------------------------------------------------------------------------------------


def train(options: dict[str, Any] | TrainConfig) -> dict[str, Any]:
    """Run ``flatpeft train``: fine-tune, evaluate, and write the run folder (under ``torchrun``:
    data-parallel on every rank, written by rank 0; every rank returns the same metrics).

    Args:
        options: Explicit options (config-file keys / flags), or a :class:`TrainConfig`.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        ValueError: bad input (nothing is written).
        Diverged: the loss became NaN/inf on any rank (the last good checkpoint is kept).
        Interrupted: Ctrl-C or SIGTERM (a checkpoint of the last completed step is written).
        ConfigError: the run folder is in use by another process, or ``--resume`` finds other data.
    """
    cfg = resolve(
        _runfolder.absolute_data(options.to_dict() if isinstance(options, TrainConfig) else options)
    )
    out = Path(cfg.out)
    if cfg.resume and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())  # already complete
    ranks = Ranks.start(cfg.device)
    lock = _runfolder.RunLock(out)  # taken in _train once everything is checked, held to the end
    try:
        metrics = _train(cfg, out, ranks, lock)
        ranks.barrier()  # no rank tears the process group down while another still uses it
        return metrics
    finally:
        lock.release()
        ranks.stop()


def _train(cfg: TrainConfig, out: Path, ranks: Ranks, lock: _runfolder.RunLock) -> dict[str, Any]:
    run = prepare(cfg, ranks)
    from tqdm.auto import tqdm

    # Resume or start the run folder (only now, after every check on every rank): claim it, and on
    # resume check that the data is the data it started on.
    _runfolder.claim(lock, out, ranks, cfg.resume, cfg.data, run.splits.fingerprint)
    start, history = 0, {"loss": [], "seconds": []}
    checkpoints = _checkpoints(out) if cfg.resume else []
    if checkpoints:
        start, history = _load_checkpoint(run, checkpoints[-1])
    ranks.barrier()
    if ranks.main and cfg.resume:  # the log as it was at the checkpoint (none: an empty log)
        log_lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
        kept = [line for line in log_lines if json.loads(line).get("step", 0) <= start]
        (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
    if ranks.main and not cfg.resume:
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "config": cfg.to_dict(),
            "method_config": None if cfg.method == FULL else run.method.config.to_dict(),
            "total_steps": run.total_steps,
            "world_size": ranks.world,
            "data": run.splits.summary() | {"upper_n": len(run.upper)},
            "seed": cfg.seed,
            "versions": _versions(),
            "git_revision": _git_revision(),
            "command": sys.argv,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(out / "config.json", config)
    log = open(out / "log.jsonl", "a") if ranks.main else None  # noqa: SIM115 (closed in finally)

    stream = Stream(run.splits.train, cfg.batch_size, cfg.seed)
    upper_stream = Stream(run.upper, cfg.batch_size, cfg.seed + 1) if run.upper else None
    side_stream = Stream(run.splits.train, cfg.batch_size, cfg.seed + 2) if run.upper else None  # darts
    used = _data_used(cfg)
    # Micro-batches drawn so far from each stream (lower D1, D2, darts' look-ahead D1): only the steps
    # that read a stream advance it.
    kinds = (_reads_lower, lambda reads: reads[1], all)
    drawn = [sum(kind(used(s)) for s in range(start)) * cfg.grad_accum for kind in kinds]
    stop = {"asked": 0}
    previous_handlers = {}
    if _main_thread():

        def on_signal(signum, frame):  # first Ctrl-C / SIGTERM: finish the step, checkpoint, stop
            if stop["asked"]:
                raise KeyboardInterrupt
            stop["asked"] = signum

        for sig in STOP_SIGNALS:
            previous_handlers[sig] = signal.signal(sig, on_signal)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    bar = tqdm(
        total=run.total_steps,
        initial=start,
        desc=f"{cfg.method} seed {cfg.seed}",
        disable=not (cfg.progress and ranks.main),
    )
    try:
        for step in range(start, run.total_steps):
            rng = _rng_state()  # the state at this step boundary, for a checkpoint taken on Ctrl-C
            if ranks.sum(stop["asked"] > 0)[0]:  # every rank stops at the same step
                path = _save_checkpoint(run, out, step, rng, history)
                raise Interrupted(
                    f"stopped at step {step}; checkpoint {path}. Continue with --resume --out {out}",
                    stop["asked"],
                )
            t0 = time.perf_counter()
            step_loss, bad_loss = 0.0, None
            reads_train, reads_upper = used(step)
            for _ in range(cfg.grad_accum):
                loss_fn, extra = unread_loss, {}
                if reads_train:  # (all of micro-batch j, 1.0) in one process
                    k = 2 if reads_upper and side_stream is not None else 0
                    examples, weight = ranks.shard((side_stream if k else stream)[drawn[k]])
                    loss_fn, drawn[k] = _loss_fn(run, run.batch(examples), weight), drawn[k] + 1
                if upper_stream is not None:
                    upper_fn = unread_loss
                    if reads_upper:
                        upper_examples, upper_weight = ranks.shard(upper_stream[drawn[1]])
                        upper_fn, drawn[1] = (
                            _loss_fn(run, run.batch(upper_examples), upper_weight),
                            drawn[1] + 1,
                        )
                    extra["upper_loss_fn"] = upper_fn
                loss = run.method.backward(loss_fn, backward_fn=run.precision.backward_fn, **extra)
                if not torch.isfinite(loss) and bad_loss is None:
                    bad_loss = float(loss)
                step_loss += float(loss)
            step_loss, bad = ranks.sum(step_loss, bad_loss is not None)  # all ranks stop together
            step_loss /= ranks.world
            if bad:
                what = f"the loss is {bad_loss}" if bad_loss is not None else "the loss on another rank"
                raise Diverged(_diverged_message(cfg, out, step, what))
            run.precision.unscale(run.optimizer)  # fp16: true gradients before clipping
            grad_norm = _scale.clip_grad_norm(run.method.clip_parameters(), cfg.max_grad_norm or math.inf)
            if not math.isfinite(grad_norm) and run.precision.scaler is None:  # the same on every rank
                raise Diverged(_diverged_message(cfg, out, step, f"the gradient norm is {grad_norm}"))
            stepped = run.precision.step(run.optimizer)  # fp16: False when the scaler skips an overflow
            if stepped:
                run.scheduler.step()
            else:
                history.setdefault("skipped", []).append(step + 1)
            run.optimizer.zero_grad(set_to_none=True)
            history["loss"].append(step_loss)
            history["seconds"].append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            done = step + 1
            if log and cfg.log_every and (done % cfg.log_every == 0 or done == run.total_steps):
                lr = run.scheduler.get_last_lr()[0]
                entry = {
                    "step": done,
                    "loss": step_loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    **run.method.strength(),
                    **run.precision.loss_scale(),
                    **({} if stepped else {"skipped": True}),
                }
                log.write(dumps(entry) + "\n")
                log.flush()
            if cfg.eval_every and done % cfg.eval_every == 0 and (log or cfg.fsdp):  # see evaluate()
                val = evaluate(run, run.splits.val)
                if log:
                    log.write(dumps({"step": done, "val": val}) + "\n")
            # Every N steps, and after the last one (a crash while evaluating then needs no retraining;
            # --resume from it just evaluates).
            if done == run.total_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                _save_checkpoint(run, out, done, _rng_state(), history)
        if start < run.total_steps and ranks.sum(stop["asked"] > 0)[0]:  # asked during the last step
            raise Interrupted(
                f"training finished and checkpointed at step {run.total_steps}; evaluate it with "
                f"--resume --out {out}",
                stop["asked"],
            )
    finally:
        bar.close()
        if log:
            log.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    # Back to a vanilla model, save it, evaluate exactly what was saved (rank 0 while the others wait;
    # under --fsdp every rank, since gathering the adapter and every forward are collectives).
    model = run.method.detach()
    run.model = model
    metrics = _finish(run, out, stream, history) if ranks.main or cfg.fsdp else None
    return ranks.broadcast(metrics)


def _loss_fn(run: Run, batch: dict[str, torch.Tensor], weight: float):
    """The closure a method backpropagates: this rank's weighted share of a micro-batch's mean loss,
    computed under the run's autocast."""

    def loss() -> torch.Tensor:
        with run.precision.autocast():
            return _forward_loss(run.net, batch) * weight / run.cfg.grad_accum

    return loss


def _finish(run: Run, out: Path, stream: Stream, history: dict[str, list]) -> dict[str, Any]:
    """Save the adapter (or model), evaluate it and write ``metrics.json`` (rank 0 writes)."""
    cfg = run.cfg
    target = out / ("model" if cfg.method == FULL else "adapter")
    # Sharded: the weights gathered whole on rank 0, saved in the same stock format.
    whole = {"state_dict": _scale.full_state_dict(run.model, cfg.method != FULL)} if cfg.fsdp else {}
    if run.ranks.main:
        run.model.save_pretrained(target, **whole)
        run.tokenizer.save_pretrained(target)
    epoch_steps = max(1, math.ceil(stream.per_epoch / cfg.grad_accum))
    times = history["seconds"][1:] or history["seconds"]
    samples: dict[str, list] = {}  # a few generated answers per held-out set (causal-LM)
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "method_options": cfg.method_options,
        "seed": cfg.seed,
        "steps": run.total_steps,
        "world_size": run.ranks.world,
        "train_loss": sum(history["loss"][-epoch_steps:]) / len(history["loss"][-epoch_steps:]),
        **_held_out(run, samples),
        "seconds_per_step": statistics.median(times),  # robust to a busy machine; first step excluded
        **_peak_memory(run.device),
        "labels": run.splits.labels,
    }
    if run.precision.scaler is not None:
        metrics["skipped_steps"] = history.get("skipped", [])  # fp16 overflows
    if cfg.sharpness_samples:
        sharp = sharpness_of(run)
        if sharp is not None and "skipped" in sharp:  # no held-out data: the reason, not a value
            metrics["sharpness_skipped"] = sharp["skipped"]
        elif sharp is not None:
            metrics["sharpness"] = sharp
    if run.ranks.main:
        lines = [dumps({"set": name, **r}) for name, records in samples.items() for r in records]
        if lines:
            (out / "predictions.jsonl").write_text("\n".join(lines) + "\n")
        write_json(out / "metrics.json", metrics)
    return metrics


def _held_out(run: Run, samples: dict[str, list]) -> dict[str, Any]:
    """The ``test``, ``val`` and ``eval`` blocks of ``metrics.json``: every held-out set scored, causal-LM
    answers generated (a sample of them per set lands in ``samples``)."""

    def score(name: str, examples: list[data_lib.Example]) -> dict[str, float]:
        return evaluate(run, examples, generate=True, samples=samples.setdefault(name, []))

    return {
        "test": score("test", run.splits.test),
        "val": score("val", run.splits.val),
        "eval": {name: score(name, examples) for name, examples in run.splits.eval_sets.items()},
    }


def _diverged_message(cfg: TrainConfig, out: Path, step: int, what: str) -> str:
    good = _checkpoints(out)
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint had been written yet"
    return (
        f"{what} at step {step + 1} ({cfg.method}, seed {cfg.seed}): training stopped before the optimizer "
        f"step; {where}. Lower --lr or raise --warmup and start a new run, or --resume from the checkpoint"
    )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "memory": "rss"}


def known_methods() -> list[str]:
    """Every method ``--method`` accepts: the registry plus ``full``."""
    return [*list_methods(), FULL]
