"""``flatpeft eval``: score a ``flatpeft train`` run with the LM Evaluation Harness (``lm-eval`` 0.4).

    flatpeft eval runs/lora-seed0 --tasks arith --limit 100        # built in, offline
    flatpeft eval runs/lora-seed0 --tasks gsm8k --num-fewshot 5    # any harness task (Hub data)
    flatpeft eval runs/lora-seed0 --tasks my_task.yaml             # a local task file, offline
    flatpeft eval runs/lora-seed0 --tasks humaneval --allow-code-execution
    flatpeft eval runs/lora-seed0 --tasks arith --base             # the untuned base model: zero-shot row

The base model is loaded as the run recorded it in ``config.json`` (built-in ``smollm2``/``tiny``, a
folder or a Hub name, with the run's seed, precision and quantization), the run's adapter from its
``adapter/`` folder (``model/`` for ``--method full``) with ``PeftModel.from_pretrained``, and the
model object is handed to the harness's ``hf`` model (``HFLM``) and ``simple_evaluate``. Prompts use
the tokenizer's chat template when the run was trained with it. (The harness's own
``pretrained=...,peft=...`` loader cannot rebuild ``tiny``, which exists only in code, nor the run's
quantization; one loader for every run keeps the tested path the used one.)

Written into the run folder, only after every task has been scored: ``eval/<task>.json`` (the
harness's results, configs and versions, strict JSON), ``eval/<task>.samples.jsonl`` (every scored
example: prompt, generations, filtered answer, score) and the headline number of each task in
``metrics.json`` under ``lm_eval`` (metric, filter, value, standard error, examples, settings), which
``flatpeft compare --eval-tasks`` pairs by seed like accuracy. With ``--base`` the run's base model is
scored without the adapter (the zero-shot row of a table), into ``eval/base/`` and ``lm_eval_base``.
Every check (lm-eval installed, tasks known, code tasks allowed, a finished run with an adapter)
runs before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _lmeval
from ._runfolder import RunLock
from ._strict_json import dumps, write_json, write_text

__all__ = ["EvalOptions", "add_cli_arguments", "add_compare_arguments", "evaluate_run", "pop_compare_options"]

KEY = "lm_eval"  # the block of metrics.json
BASE_KEY = "lm_eval_base"  # ... for the base model without the adapter (--base)


@dataclass(frozen=True)
class EvalOptions:
    """What a harness score depends on, plus how it is computed.

    Attributes:
        tasks: Harness task names, task YAML paths or built-in names (``arith``).
        limit: Score only the first ``limit`` examples of each task (default: all).
        num_fewshot: Few-shot examples per prompt (default: the task's own).
        max_gen_toks: Cap on generated tokens (default: the task's own).
        allow_code_execution: Run tasks that execute model-written code (HumanEval).
        batch_size: Prompts per batch (default: the run's ``eval_batch_size``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        base: Score the run's base model without its adapter (the untuned model).
    """

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    max_gen_toks: int | None = None
    allow_code_execution: bool = False
    batch_size: int | None = None
    device: str = "auto"
    base: bool = False

    def __post_init__(self) -> None:
        for name in ("limit", "max_gen_toks", "batch_size"):
            _count(name, getattr(self, name), minimum=1)
        _count("num_fewshot", self.num_fewshot, minimum=0)

    def settings(self) -> dict[str, Any]:
        """The options a recorded score was made with (a score with other settings is not reused)."""
        return {"limit": self.limit, "num_fewshot": self.num_fewshot, "max_gen_toks": self.max_gen_toks}


def _count(name: str, value: Any, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} takes an integer >= {minimum}, got {value!r}")


def parse_tasks(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"gsm8k,arith"``, ``["gsm8k", "arith"]`` or ``["gsm8k,arith"]`` -> ``("gsm8k", "arith")``."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(t.strip() for item in items for t in str(item).split(",") if t.strip())


# -- command-line arguments -------------------------------------------------------------------------


def _add_shared(parser: argparse.ArgumentParser, prefix: str, default: Any) -> None:
    kw = {"type": int, "default": default, "metavar": "N"}
    parser.add_argument(f"--{prefix}limit", dest=f"{prefix.replace('-', '_')}limit",
                        help="score only the first N examples of each task (default: all)", **kw)  # fmt: skip
    parser.add_argument(f"--{prefix}num-fewshot", dest=f"{prefix.replace('-', '_')}num_fewshot",
                        help="few-shot examples per prompt (default: the task's own)", **kw)  # fmt: skip
    parser.add_argument(f"--{prefix}max-gen-toks", dest=f"{prefix.replace('-', '_')}max_gen_toks",
                        help="most tokens generated per answer (default: the task's own)", **kw)  # fmt: skip
    parser.add_argument(
        "--allow-code-execution",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="run tasks that execute the code the model writes (HumanEval, MBPP): only in a sandbox",
    )


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``flatpeft eval``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished `flatpeft train` run folder")
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="TASK",
        help="harness task names, task YAML files or built-in tasks (arith), comma- or space-separated",
    )
    _add_shared(parser, "", None)
    parser.add_argument("--batch-size", type=int, metavar="N", help="prompts per batch (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--base",
        action="store_true",
        help="score the run's base model without its adapter (zero-shot; into eval/base/, lm_eval_base)",
    )


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--eval-*`` flags of ``flatpeft compare``: score every run with the harness too."""
    parser.add_argument(
        "--eval-tasks",
        nargs="+",
        default=argparse.SUPPRESS,
        metavar="TASK",
        help="also score every run with the LM Evaluation Harness on these tasks (see flatpeft eval); "
        "their headline metrics are paired by seed like accuracy",
    )
    _add_shared(parser, "eval-", argparse.SUPPRESS)


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """:class:`EvalOptions` from the parsed ``flatpeft eval`` flags."""
    return EvalOptions(
        tasks=parse_tasks(args.tasks), limit=args.limit, num_fewshot=args.num_fewshot,
        max_gen_toks=args.max_gen_toks, allow_code_execution=args.allow_code_execution,
        batch_size=args.batch_size, device=args.device, base=args.base,
    )  # fmt: skip


def pop_compare_options(options: dict[str, Any]) -> EvalOptions | None:
    """Take the ``eval_*`` keys (flags or config file) out of ``compare``'s ``options``; ``None`` when
    no ``eval_tasks`` are given.

    Raises:
        ValueError: ``--eval-limit`` and the like without ``--eval-tasks``, or bad values.
    """
    keys = ("eval_tasks", "eval_limit", "eval_num_fewshot", "eval_max_gen_toks", "allow_code_execution")
    given = {k: options.pop(k) for k in keys if k in options}
    tasks = parse_tasks(given.pop("eval_tasks", None) or [])
    if not tasks:
        extra = sorted(k for k, v in given.items() if v not in (None, False))
        if extra:
            raise ValueError(f"{', '.join(extra)} given without eval_tasks; add --eval-tasks TASK,...")
        return None
    return EvalOptions(
        tasks=tasks, limit=given.get("eval_limit"), num_fewshot=given.get("eval_num_fewshot"),
        max_gen_toks=given.get("eval_max_gen_toks"),
        allow_code_execution=bool(given.get("allow_code_execution", False)),
    )  # fmt: skip


# -- the run folder ---------------------------------------------------------------------------------


def _check_run(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The run's saved training options and its weights folder; every check, nothing read large.

    Raises:
        ValueError: not a run folder, an unfinished run, not causal-LM, no adapter.
    """
    from ._train_config import FULL

    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{run_dir} is not a `flatpeft train` run folder (no config.json); pass one")
    try:
        cfg = json.loads(config_file.read_text())["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{config_file} is not a flatpeft run config ({e}); pass a run folder") from e
    if not (run_dir / "metrics.json").is_file():
        raise ValueError(f"{run_dir} has not finished (no metrics.json); finish it: flatpeft train --resume")
    if cfg.get("task") != "causal-lm":
        raise ValueError(
            f"{run_dir} is a {cfg.get('task')} run; the LM Evaluation Harness scores causal-LM runs "
            "(train with --task causal-lm)"
        )
    weights = run_dir / ("model" if cfg.get("method") == FULL else "adapter")
    marker = "config.json" if cfg.get("method") == FULL else "adapter_config.json"
    if not (weights / marker).is_file():
        raise ValueError(
            f"{run_dir} has no trained weights ({weights.name}/{marker} is missing); pass the run folder "
            "that `flatpeft train` wrote, or train it again"
        )
    return cfg, weights


def _load(cfg: dict[str, Any], weights: Path, device_name: str, base_only: bool) -> tuple[Any, Any, Any]:
    """``(model in eval mode, tokenizer, precision)`` as the run trained them (``base_only``: the
    base model without the adapter)."""
    import peft

    from . import _scale
    from . import models as model_lib
    from ._train_config import FULL, TrainConfig

    train_cfg = TrainConfig.from_dict(cfg)
    device = _scale.device_for(device_name)
    if train_cfg.method == FULL:  # every weight trained: the saved model is the run's model
        source, options = (train_cfg.model, {}) if base_only else (str(weights), {})
    else:
        source, options = train_cfg.model, _scale.load_options(train_cfg, device)
    base, tokenizer = model_lib.load_model(source, "causal-lm", seed=train_cfg.seed, **options)
    model = base
    if train_cfg.method != FULL and not base_only:
        try:
            model = peft.PeftModel.from_pretrained(base, str(weights))
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the adapter in {weights} does not fit {train_cfg.model!r} ({first})") from e
    if not _scale.is_quantized(base):
        model.to(device)
    model.eval()
    return model, tokenizer, _scale.Precision(train_cfg.precision, device, sharded=False)


def _file_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", task)


def evaluate_run(
    run_dir: str | Path, options: EvalOptions, tasks: _lmeval.Tasks | None = None
) -> dict[str, Any]:
    """Score a finished run on ``options.tasks`` with the harness and write the results (see the module
    docstring).

    Args:
        run_dir: A ``flatpeft train`` run folder.
        options: Tasks and settings.
        tasks: Already resolved tasks (``compare`` resolves them once for every run).

    Returns:
        ``{task: headline}`` as written to ``metrics.json`` (``None`` for a group without a number).

    Raises:
        ValueError: see :func:`_check_run` and :func:`flatpeft._lmeval.resolve_tasks`.
    """

    run_dir = Path(run_dir)
    cfg, weights = _check_run(run_dir)
    if tasks is None:
        tasks = _lmeval.resolve_tasks(options.tasks, options.allow_code_execution)
    lock = RunLock(run_dir)  # one writer per run folder (a training run still going, another eval)
    lock.acquire()
    try:
        return _score_and_write(run_dir, cfg, weights, options, tasks)
    finally:
        lock.release()


def _score_and_write(
    run_dir: Path, cfg: dict[str, Any], weights: Path, options: EvalOptions, tasks: _lmeval.Tasks
) -> dict[str, Any]:
    """:func:`evaluate_run` with the run folder claimed."""
    from . import data as data_lib

    model, tokenizer, precision = _load(cfg, weights, options.device, options.base)
    chat = data_lib.uses_chat_template(tokenizer, cfg.get("chat_template", "auto"))
    outputs = {}
    with precision.autocast():
        for name in tasks.names:
            outputs[name] = _lmeval.run_harness(
                model, tokenizer, tasks, name, limit=options.limit, num_fewshot=options.num_fewshot,
                chat=chat, batch_size=options.batch_size or int(cfg.get("eval_batch_size", 8)),
                max_gen_toks=options.max_gen_toks, allow_code_execution=options.allow_code_execution,
            )  # fmt: skip
    # Every task scored: now write, each file atomically, metrics.json last.
    folder = run_dir / "eval" / ("base" if options.base else "")
    folder.mkdir(parents=True, exist_ok=True)
    scores: dict[str, Any] = {}
    for name, output in outputs.items():
        samples = output.pop("samples", None) or {}
        file = folder / f"{_file_name(name)}.json"
        write_json(file, output)
        lines = [dumps(s) for rows in samples.values() for s in rows]
        write_text(folder / f"{_file_name(name)}.samples.jsonl", "".join(line + "\n" for line in lines))
        top = _lmeval.headline(output, name)
        scores[name] = None if top is None else top | {"file": str(file.relative_to(run_dir))}
        if scores[name] is not None:
            scores[name] |= {"settings": options.settings(), "chat_template": chat}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    key = BASE_KEY if options.base else KEY
    metrics[key] = {**metrics.get(key, {}), **scores}
    write_json(run_dir / "metrics.json", metrics)
    return scores


def ensure_scored(run_dir: Path, options: EvalOptions, tasks: _lmeval.Tasks) -> dict[str, Any]:
    """``metrics.json`` of ``run_dir`` with every task of ``tasks`` scored with ``options``' settings:
    tasks already scored so are reused, the others scored now (``flatpeft compare --eval-tasks``)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    done = metrics.get(KEY, {})
    missing = [n for n in tasks.names if (done.get(n) or {}).get("settings") != options.settings()]
    if missing:
        evaluate_run(run_dir, options, _lmeval.Tasks(missing, tasks.manager, tasks.unsafe))
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics


def run_eval_cli(args: argparse.Namespace) -> int:
    """``flatpeft eval``: score, print one line per task, return the exit code."""
    options = options_from_args(args)
    scores = evaluate_run(args.run_dir, options)
    for name, s in scores.items():
        if s is None:
            print(f"{name}: no headline number (a group without aggregate); see eval/{_file_name(name)}.json")
            continue
        se = f" ± {s['stderr']:.4f}" if s["stderr"] is not None else ""
        print(f"{name}: {s['metric']} ({s['filter']}) {s['value']:.4f}{se} over {s['n']} examples")
    print(f"\nwritten to {Path(args.run_dir) / 'eval'}/ and {Path(args.run_dir) / 'metrics.json'}")
    return 0


def describe(options: EvalOptions) -> dict[str, Any]:
    """``options`` as JSON (for ``compare-config.json``)."""
    return asdict(options) | {"tasks": list(options.tasks)}
