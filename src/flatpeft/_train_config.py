"""The options of ``flatpeft train``: :class:`TrainConfig`, method specs (``name:key=value``) and the
resolution of a run's config (explicit options, or the saved config of a run to ``--resume``)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import MethodConfig
from .registry import get_method, make_config

FULL = "full"  # --method full: every weight trained, no adapters (the papers' reference row)
_RESUME_FREE = {"out", "resume", "progress", "checkpoint_every", "keep_checkpoints", "log_every"}


class ConfigError(ValueError):
    """An invalid run configuration; the message says how to fix it."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one ``flatpeft train`` run depends on; the keys of a YAML/JSON config file."""

    model: str = _opt(
        "minilm", "minilm or smollm2 (built-in), tiny (random, for tests), a local folder or a Hub name"
    )
    data: str = _opt("tweets", "tweets (built-in), a .csv/.jsonl/.parquet file or a datasets name")
    task: Literal["classification", "causal-lm"] = _opt("classification", "what to train")
    text_column: str | None = _opt(None, "text column (default: text)")
    label_column: str | None = _opt(None, "label column (default: label; tweets: sentiment)")
    prompt_column: str = _opt("prompt", "causal-lm: prompt column")
    response_column: str = _opt("response", "causal-lm: response column (the loss covers only it)")
    chat_template: Literal["auto", "none"] = _opt(
        "auto", "causal-lm: format prompts with the tokenizer's chat template (auto: when it has one)"
    )
    max_new_tokens: int = _opt(
        32, "causal-lm: tokens generated greedily per held-out prompt, scored by exact match (0: off)"
    )
    eval_data: list[str] = field(
        default_factory=list, metadata={"help": "extra evaluation data with the same columns (repeatable)"}
    )
    train_size: int | None = _opt(None, "number of training examples, stratified (default: all)")
    val_size: float = _opt(0.1, "validation split: fraction (< 1) or count")
    test_size: float = _opt(0.1, "held-out test split: fraction (< 1) or count")
    data_seed: int = _opt(0, "seed of the data split (kept fixed across --seed values)")
    max_length: int = _opt(128, "maximum tokens per example")
    method: str = _opt("lora", "a registered method (see `flatpeft methods`) or full; name:key=value allowed")
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "method options (--opt key=value, repeatable)"}
    )
    upper_data: Literal["split", "val"] = _opt(
        "split",
        "bi-level methods' D2: split (a seeded part of the training set, the method's split option) or val "
        "(the validation split; the whole training set is D1)",
    )
    rank: int = _opt(8, "LoRA rank r")
    alpha: float = _opt(16.0, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules (all-linear or names)"}
    )
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    epochs: float = _opt(1.0, "training epochs (ignored with --max-steps)")
    max_steps: int | None = _opt(None, "number of optimizer steps (overrides --epochs)")
    batch_size: int = _opt(16, "examples per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    warmup: float = _opt(0.06, "linear warm-up: fraction of steps (< 1) or number of steps")
    lr_scheduler: Literal["linear", "cosine", "constant"] = _opt(
        "linear",
        "learning-rate schedule after the warm-up, as Transformers' of that name: linear decay to 0, "
        "cosine decay to 0 (Flat-LoRA's and Bi-LoRA's), or constant",
    )
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    seed: int = _opt(0, "seed of initialisation, data order, dropout and the method")
    eval_batch_size: int = _opt(64, "examples per evaluation batch")
    eval_every: int = _opt(0, "evaluate on the validation split every N steps (0: at the end only)")
    log_every: int = _opt(10, "write the training loss to log.jsonl every N steps")
    checkpoint_every: int = _opt(100, "checkpoint every N steps (0: only after the last and on a stop)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep")
    sharpness_samples: int = _opt(0, "noise samples for the expected full-space sharpness (0: off)")
    sharpness_sigma: float = _opt(0.05, "relative noise std of the sharpness measurement")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = _opt(
        "fp32", "bf16: frozen weights stored in bf16, autocast bf16; fp16: autocast fp16 and a grad scaler"
    )
    gradient_checkpointing: bool = _opt(False, "recompute each block's activations in backward (less memory)")
    gradient_checkpointing_reentrant: bool = _opt(
        False, "with --gradient-checkpointing: the reentrant variant"
    )
    load_in_4bit: bool = _opt(
        False, "load the base quantized to 4-bit NF4 (QLoRA; pip install 'flatpeft[quant]')"
    )
    load_in_8bit: bool = _opt(
        False, "load the base quantized to 8-bit (LLM.int8; pip install 'flatpeft[quant]')"
    )
    fsdp: bool = _opt(False, "under torchrun: shard the model with FSDP2 instead of replicating it (DDP)")
    out: str | None = _opt(None, "run folder (default: runs/<method>-seed<seed>)")
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")
    progress: bool = _opt(True, "show progress bars")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (dashes or underscores); unknown keys and bad values raise ``ConfigError``."""
        values = {k.replace("-", "_"): v for k, v in values.items()}
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known options: {', '.join(known)}")
        typed = {k: check_type(hints[k], coerce(hints[k], v, k), k) for k, v in values.items()}
        if isinstance(typed.get("target_modules"), str):
            typed["target_modules"] = [typed["target_modules"]]
        if isinstance(typed.get("eval_data"), str):
            typed["eval_data"] = [typed["eval_data"]]
        cfg = cls(**typed)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Range checks; raise ``ConfigError`` naming the option."""
        positive = ["batch_size", "grad_accum", "max_length", "rank", "eval_batch_size", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ["lr", "epochs", "alpha"]:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        nonneg = ["warmup", "max_grad_norm", "val_size", "test_size", "weight_decay", "lora_dropout"]
        nonneg += ["eval_every", "log_every", "checkpoint_every", "sharpness_samples", "sharpness_sigma"]
        nonneg += ["max_new_tokens"]
        for name in nonneg:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be >= 0, got {value}")
        for name in ["max_steps", "train_size"]:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.task not in ("classification", "causal-lm"):
            raise ConfigError(f"task must be classification or causal-lm, got {self.task!r}")
        if self.task == "causal-lm" and self.max_length < 2:
            raise ConfigError(
                f"max_length={self.max_length} cannot hold a prompt token and a response token (causal-lm "
                "trains on the response only); pass --max-length 2 or more (e.g. 256)"
            )
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise ConfigError(f"lr_scheduler must be linear, cosine or constant, got {self.lr_scheduler!r}")
        if self.chat_template not in ("auto", "none"):
            raise ConfigError(f"chat_template must be auto or none, got {self.chat_template!r}")
        if self.upper_data not in ("split", "val"):
            raise ConfigError(f"upper_data must be split or val, got {self.upper_data!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.gradient_checkpointing_reentrant and not self.gradient_checkpointing:
            raise ConfigError("--gradient-checkpointing-reentrant needs --gradient-checkpointing")
        quantized = "--load-in-4bit" if self.load_in_4bit else "--load-in-8bit" if self.load_in_8bit else None
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
        if quantized and self.method.partition(":")[0] == FULL:
            raise ConfigError(
                f"--method full trains every weight, which a quantized base cannot; drop {quantized}"
            )
        if quantized and self.fsdp:
            raise ConfigError(
                f"--fsdp cannot shard bitsandbytes layers here; drop {quantized} (QLoRA) or --fsdp (shard a "
                "bf16 base: --fsdp --precision bf16)"
            )


# -- options ----------------------------------------------------------------------------------------


def coerce(hint: Any, value: Any, name: str) -> Any:
    """Convert a command-line string to the type ``hint`` (other values pass through unchanged)."""
    if not isinstance(value, str):
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null"):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    try:
        if origin is Literal:
            for choice in typing.get_args(hint):
                if str(choice) == value:
                    return choice
            return value  # the config's own validation lists the choices
        if origin is list:
            return [v.strip() for v in value.split(",") if v.strip()]
        if hint is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_type(hint: Any, value: Any, name: str) -> Any:
    """``value`` (already through :func:`coerce`) if it has the type ``hint`` asks for, else a
    ``ConfigError`` naming the option: a YAML/JSON ``batch_size: 2.5`` or ``progress: 1`` fails here,
    before anything is read or written. An int is a number; a bool is neither an int nor a number."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return value
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is Literal:  # the config's own validation lists the choices
        return value
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return value
        raise ConfigError(f"{name} must be a string or a list of strings, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a mapping of option names to values, got {value!r}")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        quote = " (quote it in a YAML file)" if hint is str else ""
        raise ConfigError(
            f"{name} must be {_TYPE_NAMES[hint]}{quote}, got {value!r} ({type(value).__name__})"
        )
    return value


def check_model_limits(cfg: TrainConfig, config: Any, tokenizer: Any) -> None:
    """Raise ``ConfigError`` when ``cfg.max_length`` exceeds what the model can embed: its config's
    ``max_position_embeddings`` (or ``n_positions``), or the tokenizer's ``model_max_length`` when that is
    a real limit (tokenizers without one report a huge sentinel). Called before anything is written."""
    limits = {}
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits[f"the model's {key}"] = value
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        limits["the tokenizer's model_max_length"] = value
    for what, limit in limits.items():
        if cfg.max_length > limit:
            raise ConfigError(
                f"max_length={cfg.max_length} is more than {what} ({limit}) of {cfg.model!r}; pass "
                f"--max-length {min(limits.values())} or less"
            )


def parse_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"flat_lora:sigma=0.1,schedule=constant"`` into ``("flat_lora", {"sigma": "0.1", ...})``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"method option {item!r} in {spec!r} must look like key=value")
        options[key.strip().replace("-", "_")] = value.strip()
    return name.strip(), options


def _method_fields(name: str) -> dict[str, Any]:
    if name == FULL:
        return {}
    cls = get_method(name).config_class
    return typing.get_type_hints(cls) | {"seed": int}


def apply_method_spec(cfg: TrainConfig, spec: str | None = None) -> TrainConfig:
    """Resolve ``cfg.method`` (or ``spec``) given as ``name:key=value,...``: keys that are fields of the
    method's config go to ``method_options``, keys that are run options (e.g. ``lr``) replace them.

    Raises:
        ValueError: unknown method (listing the known ones) or an option that is neither.
    """
    name, options = parse_method_spec(spec if spec is not None else cfg.method)
    if name != FULL:
        try:
            get_method(name)
        except ValueError as e:
            raise ConfigError(f"{e}; or {FULL} (full fine-tuning without adapters)") from None
    method_fields = _method_fields(name)
    method_options = dict(cfg.method_options) if spec is None or name == cfg.method else {}
    run_options = {}
    for key, value in options.items():
        if key in method_fields:
            method_options[key] = value
        elif key in {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "method_options"}:
            run_options[key] = value
        else:
            raise ConfigError(
                f"unknown option {key!r} for method {name!r}; method options: "
                f"{', '.join(sorted(method_fields)) or 'none'}; or any run option such as lr, rank"
            )
    unknown = sorted(set(method_options) - set(method_fields))
    if unknown:
        known = ", ".join(sorted(method_fields)) or "none"
        raise ConfigError(f"unknown option(s) {unknown} for method {name!r}; known options: {known}")
    method_options = {k: coerce(method_fields[k], v, f"{name}.{k}") for k, v in method_options.items()}
    merged = {**cfg.to_dict(), **run_options, "method": name, "method_options": method_options}
    return TrainConfig.from_dict(merged)


def _method_config(cfg: TrainConfig, total_steps: int) -> MethodConfig | None:
    if cfg.method == FULL:
        if cfg.method_options:
            raise ConfigError(f"--method full takes no method options, got {sorted(cfg.method_options)}")
        return None
    hints = _method_fields(cfg.method)
    unknown = sorted(set(cfg.method_options) - set(hints))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {cfg.method!r}; known: {sorted(hints)}")
    options = {k: coerce(hints[k], v, f"{cfg.method}.{k}") for k, v in cfg.method_options.items()}
    options.setdefault("seed", cfg.seed)
    if "total_steps" in hints:
        options.setdefault("total_steps", total_steps)
    return make_config(cfg.method, **options)


def resolve(options: dict[str, Any]) -> TrainConfig:
    """The run's config from explicit ``options`` (config file + flags); with ``resume``, the saved
    config of ``out``, which explicit options may repeat but not change.

    Raises:
        ConfigError: bad options, ``resume`` without a saved run, or options that differ from it.
    """
    cfg = apply_method_spec(TrainConfig.from_dict(options))
    if cfg.out is None:
        cfg.out = f"runs/{cfg.method}-seed{cfg.seed}"
    out = Path(cfg.out)
    if not cfg.resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(
                f"{out} already exists and is not empty; pass --resume to continue it or another --out"
            )
        return cfg
    saved_file = out / "config.json"
    if not saved_file.is_file():
        raise ConfigError(f"--resume: {out} holds no run (no config.json); drop --resume to start a new run")
    saved = json.loads(saved_file.read_text())["config"]
    given = cfg.to_dict()
    explicit = {k.replace("-", "_") for k in options}
    if "method" in explicit:
        explicit |= {"method_options"}
    diff = sorted(k for k in explicit - _RESUME_FREE if given[k] != saved.get(k))
    if diff:
        changes = ", ".join(f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}" for k in diff)
        raise ConfigError(
            f"--resume: {out} is a run with another configuration ({changes}); use another --out"
        )
    keep = {k: given[k] for k in _RESUME_FREE if k in explicit}
    return TrainConfig.from_dict({**saved, **keep, "out": str(out), "resume": True})


#: ``--lr-scheduler``: the factor of the peak lr at step s >= w of T (w warm-up steps), written as
#: Transformers writes the schedule of that name (``get_scheduler``; cosine: one half-wave)
DECAYS = {
    "linear": lambda s, w, t: max(0.0, (t - s) / max(1.0, t - w)),
    "cosine": lambda s, w, t: max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((s - w) / max(1.0, t - w))))),
    "constant": lambda s, w, t: 1.0,
}


def lr_scheduler(cfg: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    """The run's learning-rate schedule: a linear warm-up over ``w`` steps (``--warmup`` as a count, or
    a fraction of ``total_steps``), the factor (s + 1)/(w + 1) at step s, so no step trains at lr 0;
    then ``cfg.lr_scheduler``'s decay over the remaining ``total_steps - w`` steps: linear or cosine to 0
    at ``total_steps``, or constant. After the warm-up the curve is Transformers' schedule of the same
    name (the Trainer's ``lr_scheduler_type``; tested against ``transformers.get_scheduler``), whose
    own warm-up starts at lr 0 instead."""
    warmup = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total_steps
    decay = DECAYS[cfg.lr_scheduler]

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay(step, warmup, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
