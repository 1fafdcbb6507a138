"""The LM Evaluation Harness (EleutherAI's ``lm-eval`` 0.4, the ``eval`` extra) as flatpeft uses it:
finding tasks, refusing code tasks without consent, running a loaded model through the harness's
Python API and reading the headline number of its results.

Tasks are named as the harness names them (``gsm8k``, ``humaneval``, ``mmlu``; those need their data
from the Hub or its cache), as a path to a task YAML file (read offline), or as one of flatpeft's
built-in tasks in :mod:`flatpeft.tasks` (``arith``: offline). Only when a name is neither built in nor
a file does the harness index its own ~15k task files (about 15 s).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tasks import BUILTIN_TASKS, TASK_DIR

__all__ = ["EXTRA", "Tasks", "headline", "require_lm_eval", "resolve_tasks", "run_harness"]

EXTRA = "pip install 'flatpeft[eval]' (or pip install 'lm-eval>=0.4,<0.5')"
_YAML = (".yaml", ".yml")


def require_lm_eval() -> None:
    """Raise a clear error when the harness is not installed.

    Raises:
        ValueError: ``lm_eval`` cannot be imported; the message names the install command.
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"scoring with the LM Evaluation Harness needs lm-eval: {EXTRA}")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on our model object are expected


@dataclass
class Tasks:
    """Requested tasks, resolved against a harness ``TaskManager``.

    Attributes:
        names: The harness names of the requested tasks, in order.
        manager: The ``lm_eval.tasks.TaskManager`` that knows them.
        unsafe: The names whose tasks execute model-written code.
    """

    names: list[str]
    manager: Any
    unsafe: list[str] = field(default_factory=list)


def _yaml_task_name(path: Path) -> str:
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise ValueError(f"task file not found: {path}; check the path (relative to {Path.cwd()})")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # yaml errors, missing includes
        raise ValueError(f"{path}: not a readable harness task file ({e})") from e
    name = cfg.get("task") if isinstance(cfg, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{path}: a harness task file names its task (a top-level 'task: NAME' key)")
    return name


def _is_unsafe(index: dict[str, Any], name: str, seen: set[str] | None = None) -> bool:
    """Whether task, group or tag ``name`` (recursively) holds a task marked ``unsafe_code``."""
    seen = set() if seen is None else seen
    if name in seen or name not in index:
        return False
    seen.add(name)
    cfg = index[name].cfg or {}
    if cfg.get("unsafe_code"):
        return True
    members = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    members = [m if isinstance(m, str) else m.get("task") for m in members if isinstance(m, (str, dict))]
    members += [k for k, e in index.items() if name in e.tags]  # a tag: every task carrying it
    return any(isinstance(m, str) and _is_unsafe(index, m, seen) for m in members)


def resolve_tasks(requested: Sequence[str], allow_code_execution: bool = False) -> Tasks:
    """Resolve ``requested`` (harness names, task YAML paths, built-in names); refuse code tasks
    unless ``allow_code_execution``.

    Raises:
        ValueError: lm-eval missing, no task, a missing or malformed task file, an unknown task (with
            the closest names), a code-executing task without ``allow_code_execution``.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not requested:
        raise ValueError("name at least one task: --tasks arith (built in), gsm8k, or path/to/task.yaml")
    include, names, harness_names = [TASK_DIR], [], False
    for item in requested:
        if item.lower().endswith(_YAML):
            path = Path(item).expanduser()
            names.append(_yaml_task_name(path))
            include.append(path.resolve().parent)
        else:
            names.append(item)
            harness_names |= item not in BUILTIN_TASKS
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--tasks lists {', '.join(repeated)} more than once")
    paths = [str(p) for p in dict.fromkeys(include)]
    manager = TaskManager(include_path=paths, include_defaults=harness_names)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"unknown task {name!r}{hint}: name a task the LM Evaluation Harness knows (lm-eval ls "
                f"tasks), a built-in task ({', '.join(BUILTIN_TASKS)}) or a task YAML file"
            )
    index = getattr(manager, "_index", {})  # lm-eval 0.4.x; the harness refuses unsafe tasks itself too
    unsafe = [n for n in names if _is_unsafe(index, n)]
    if unsafe and not allow_code_execution:
        raise ValueError(
            f"task {', '.join(unsafe)} executes the code the model writes; pass --allow-code-execution to "
            "run it (the harness's own switch: do it only in a sandbox you trust)"
        )
    return Tasks(names, manager, unsafe)


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: Tasks,
    name: str,
    *,
    limit: int | None,
    num_fewshot: int | None,
    chat: bool,
    batch_size: int,
    max_gen_toks: int | None,
    allow_code_execution: bool,
) -> dict[str, Any]:
    """Score ``model`` (a ``PeftModel`` or Transformers causal LM, in eval mode) on task ``name`` with
    ``lm_eval.simple_evaluate`` and return its output (``results``, ``configs``, ``samples`` ...).

    Generation is greedy as each task's YAML sets it; every seed the harness takes is fixed at 0, so
    the same adapter gives the same numbers. ``chat`` formats prompts (and few-shot turns) with the
    tokenizer's chat template, as the run was trained.
    """
    import os

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if allow_code_execution and name in tasks.unsafe:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the consent Hugging Face's code_eval metric asks for
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(
        model=lm,
        tasks=[name],
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tasks.manager,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        confirm_run_unsafe_code=allow_code_execution,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        bootstrap_iters=1000,
    )


def headline(output: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The first metric the harness reports for ``name`` (the task's first metric under its first
    filter, e.g. ``exact_match`` with ``final-number`` for ``arith``, ``exact_match`` with
    ``strict-match`` for ``gsm8k``), its standard error, the number of examples scored and of
    few-shot examples per prompt (``n_shot``); ``None``
    when the results have no number for ``name`` (a group without an aggregate)."""
    block = output.get("results", {}).get(name, {})
    for key, value in block.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = block.get(f"{metric}_stderr,{filt}")
        n = output.get("n-samples", {}).get(name, {}).get("effective")
        return {
            "metric": metric,
            "filter": filt,
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": n,
            "n_shot": output.get("n-shot", {}).get(name),
        }
    return None
