"""``flatpeft sharpness``: the flatness of a saved adapter or a ``flatpeft train`` run, measured with
:mod:`flatpeft.sharpness` in the full and the LoRA weight space, written as JSON, a table and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .sharpness import (
    Landscape,
    SharpnessResult,
    _count,
    _dump,
    _positive,
    expected_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    loss_landscape,
    plot_landscape,
    worst_case_sharpness,
)

__all__ = ["DEFAULT_METRICS", "METRICS", "add_cli_arguments", "run_sharpness_cli"]


#: ``--metrics`` names and their row titles.
METRICS: dict[str, str] = {
    "expected": "expected sharpness",
    "worst_case": "worst-case sharpness",
    "hessian_eigenvalue": "Hessian top eigenvalue",
    "hessian_trace": "Hessian trace",
    "landscape_1d": "1-D landscape",
    "landscape_2d": "2-D landscape",
}
DEFAULT_METRICS = ("expected", "worst_case", "hessian_eigenvalue", "hessian_trace", "landscape_1d")

# option -> (default, type, help); the command-line flags and run_sharpness_cli share this table.
_CLI_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "adapter": (None, str, "a saved PEFT adapter folder, or a `flatpeft train` run folder (whose model, "
                "data and split then become the defaults)"),
    "model": (None, str, "base model: minilm, smollm2, tiny, a folder or a Hub name (default: the run's "
              "model, else the adapter's base_model_name_or_path)"),
    "data": (None, str, "data: tweets, a .csv/.jsonl/.parquet file or a datasets name (default: the run's)"),
    "task": (None, str, "classification or causal-lm (default: the run's, else from the adapter)"),
    "text_column": (None, str, "text column (default: the run's)"),
    "label_column": (None, str, "label column (default: the run's)"),
    "prompt_column": (None, str, "causal-lm prompt column (default: the run's)"),
    "response_column": (None, str, "causal-lm response column (default: the run's)"),
    "chat_template": (None, str, "causal-lm: auto (the tokenizer's chat template when it has one) or none "
                      "(default: the run's, else auto)"),
    "split": ("test", str, "which split of the data to measure on: test, val or train"),
    "max_examples": (64, int, "examples measured (cut to a multiple of --batch-size)"),
    "batch_size": (16, int, "examples per batch"),
    "max_length": (None, int, "maximum tokens per example (default: the run's, else 128)"),
    "metrics": (list(DEFAULT_METRICS), list, f"what to measure, any of: {', '.join(METRICS)}"),
    "spaces": (["full", "lora"], list, "full (effective weights) and/or lora (adapter factors)"),
    "sigma": (0.05, float, "expected sharpness: relative noise std σ"),
    "samples": (8, int, "expected sharpness: noise draws (antithetic pairs)"),
    "rho": (0.05, float, "worst-case sharpness: radius ρ of the L2 ball"),
    "steps": (5, int, "worst-case sharpness: gradient-ascent steps"),
    "iters": (10, int, "Hessian top eigenvalue: power iterations at most"),
    "tol": (1e-3, float, "Hessian top eigenvalue: relative tolerance"),
    "probes": (8, int, "Hessian trace: Hutchinson probes"),
    "radius": (1.0, float, "landscapes: half-width of the grid, in filter norms"),
    "points": (21, int, "1-D landscape: grid points"),
    "points_2d": (11, int, "2-D landscape: grid points per axis"),
    "seed": (0, int, "seed of every random draw"),
    "device": ("auto", str, "auto, cpu, cuda or cuda:N"),
    "out": (None, str, "output folder (default: <run folder>/sharpness, else ./sharpness)"),
    "progress": (True, bool, "show progress bars"),
}  # fmt: skip


def add_cli_arguments(parser: Any) -> None:
    """Add the ``flatpeft sharpness`` flags to an ``argparse`` parser (see :func:`run_sharpness_cli`)."""
    import argparse

    for name, (default, kind, help_text) in _CLI_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": default,
            "help": f"{help_text} (default: {default})",
        }
        if name == "adapter":
            kwargs.update(required=True, metavar="DIR", help=help_text)
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            choices = list(METRICS) if name == "metrics" else ["full", "lora"]
            kwargs.update(nargs="+", choices=choices, metavar=name[:-1].upper())
        else:
            kwargs["type"] = kind
        if name == "task":
            kwargs["choices"] = ["classification", "causal-lm"]
        if name == "split":
            kwargs["choices"] = ["test", "val", "train"]
        if name == "chat_template":
            kwargs["choices"] = ["auto", "none"]
        parser.add_argument(flag, **kwargs)


def _cli_options(options: Any) -> dict[str, Any]:
    given = (
        dict(vars(options))
        if hasattr(options, "__dict__") and not isinstance(options, dict)
        else dict(options)
    )
    given = {k.replace("-", "_"): v for k, v in given.items() if k not in ("command", "handler")}
    unknown = sorted(set(given) - set(_CLI_OPTIONS))
    if unknown:
        raise ValueError(f"unknown sharpness option(s) {unknown}; known: {', '.join(_CLI_OPTIONS)}")
    opts = {k: default for k, (default, _, _) in _CLI_OPTIONS.items()}
    opts.update({k: v for k, v in given.items() if v is not None})
    if not opts["adapter"]:
        raise ValueError("pass --adapter DIR: a saved PEFT adapter folder or a `flatpeft train` run folder")
    for name in ("metrics", "spaces"):
        if isinstance(opts[name], str):
            opts[name] = opts[name].replace(",", " ").split()
    bad = [m for m in opts["metrics"] if m not in METRICS]
    if bad or not opts["metrics"]:
        raise ValueError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    if not opts["spaces"] or any(s not in ("full", "lora") for s in opts["spaces"]):
        raise ValueError(f"spaces must be full and/or lora, got {opts['spaces']}")
    if opts["split"] not in ("test", "val", "train"):
        raise ValueError(f"split must be test, val or train, got {opts['split']!r}")
    for name in ("max_examples", "batch_size", "samples", "steps", "iters", "probes"):
        _count(name, opts[name])
    for name in ("points", "points_2d"):
        _count(name, opts[name], minimum=2)
    _positive("sigma", opts["sigma"], allow_zero=True)
    _positive("rho", opts["rho"], allow_zero=True)
    _positive("tol", opts["tol"], allow_zero=True)
    _positive("radius", opts["radius"])
    return opts


def _find_adapter(path: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """``(adapter folder, run folder or None, the run's training options)``."""
    if (path / "adapter_config.json").is_file():
        adapter, run = path, path.parent if (path.parent / "config.json").is_file() else None
    elif (path / "adapter" / "adapter_config.json").is_file():
        adapter, run = path / "adapter", path
    else:
        raise ValueError(
            f"{path} is neither a PEFT adapter folder (no adapter_config.json) nor a `flatpeft train` run "
            "folder (no adapter/ inside); pass the folder that save_pretrained wrote"
        )
    run_config: dict[str, Any] = {}
    if run is not None:
        try:
            run_config = json.loads((run / "config.json").read_text()).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            run_config = {}
        if not isinstance(run_config, dict):
            run_config = {}
    return adapter, run if run_config else None, run_config


def _load_for_cli(opts: dict[str, Any], adapter: Path, run_cfg: dict[str, Any]):
    """Resolve the options against the run's, load the data and the adapted model; write nothing."""
    import peft

    from . import data as data_lib
    from . import models as model_lib

    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    task_types = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}
    task = (
        opts["task"] or run_cfg.get("task") or task_types.get(adapter_cfg.get("task_type"), "classification")
    )
    model_name = opts["model"] or run_cfg.get("model") or adapter_cfg.get("base_model_name_or_path")
    if not model_name:
        raise ValueError(f"{adapter}: the adapter does not name its base model; pass --model")
    data_name = opts["data"] or run_cfg.get("data")
    if not data_name:
        raise ValueError("pass --data (the adapter is not inside a `flatpeft train` run folder)")
    max_length = opts["max_length"] or run_cfg.get("max_length") or 128
    columns = {k: opts[k] or run_cfg.get(k) for k in ("text_column", "label_column")}
    columns |= {k: opts[k] or run_cfg.get(k) or k.split("_")[0] for k in ("prompt_column", "response_column")}
    model_lib.resolve_model(model_name, task)  # cheap checks before reading anything large
    splits = data_lib.load_splits(
        data_name, task=task, **columns, val_size=run_cfg.get("val_size", 0.1),
        test_size=run_cfg.get("test_size", 0.1), train_size=run_cfg.get("train_size"),
        seed=run_cfg.get("data_seed", 0),
    )  # fmt: skip
    examples = getattr(splits, opts["split"])[: opts["max_examples"]]
    if not examples:
        raise ValueError(f"the {opts['split']} split of {data_name} is empty; choose another --split")
    size = min(opts["batch_size"], len(examples))
    examples = examples[: len(examples) // size * size]  # equal batches: L is the mean over examples
    base, tokenizer = model_lib.load_model(
        model_name, task, max(len(splits.labels), 2), seed=int(run_cfg.get("seed", 0))
    )
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=True)  # for space="lora"
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"the adapter in {adapter} does not fit model {model_name!r} ({first}); pass the --model and "
            "--data (same labels) it was trained with"
        ) from e
    device = opts["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    model.to(device).eval()
    chat = opts["chat_template"] or run_cfg.get("chat_template", "auto")
    batches = [
        {
            k: v.to(device)
            for k, v in data_lib.make_batch(task, tokenizer, examples[i : i + size], max_length, chat).items()
        }
        for i in range(0, len(examples), size)
    ]
    info = {"model": model_name, "data": data_name, "task": task, "split": opts["split"]}
    info |= {"n_examples": len(examples), "batch_size": size, "max_length": max_length, "device": device}
    return model, batches, info


def _run_metric(metric: str, model: nn.Module, batches: list[Any], space: str, o: dict[str, Any]):
    common = {"space": space, "seed": o["seed"], "progress": o["progress"]}
    if metric == "expected":
        return expected_sharpness(model, None, batches, sigma=o["sigma"], n_samples=o["samples"], **common)
    if metric == "worst_case":
        return worst_case_sharpness(model, None, batches, rho=o["rho"], steps=o["steps"], **common)
    if metric == "hessian_eigenvalue":
        return hessian_top_eigenvalue(model, None, batches, iters=o["iters"], tol=o["tol"], **common)
    if metric == "hessian_trace":
        return hessian_trace(model, None, batches, n_probes=o["probes"], **common)
    dims, points = (1, o["points"]) if metric == "landscape_1d" else (2, o["points_2d"])
    return loss_landscape(model, None, batches, dims=dims, radius=o["radius"], points=points, **common)


def _cell(result: SharpnessResult | Landscape) -> str:
    if isinstance(result, Landscape):
        flat = result.losses if result.dims == 1 else [v for row in result.losses for v in row]
        return f"{max(flat) - result.base_loss:.4g}"
    text = f"{result.value:.4g}"
    if result.stderr is not None:
        text += f" ± {result.stderr:.2g}"
    if result.details.get("converged") is False:
        text += " (not converged)"
    return text


def _row_title(metric: str, o: dict[str, Any]) -> str:
    extra = {
        "expected": f"σ={o['sigma']}, {o['samples']} draws",
        "worst_case": f"ρ={o['rho']}, {o['steps']} steps",
        "hessian_eigenvalue": f"≤{o['iters']} iterations",
        "hessian_trace": f"{o['probes']} probes",
        "landscape_1d": f"max rise on ±{o['radius']}",
        "landscape_2d": f"max rise on ±{o['radius']}²",
    }[metric]
    return f"{METRICS[metric]} ({extra})"


def run_sharpness_cli(options: Any) -> dict[str, Any]:
    """``flatpeft sharpness``: measure a saved adapter and write ``sharpness.json``, ``sharpness.md``
    and the landscape PNGs.

    The adapter is loaded on its base model (a `flatpeft train` run folder supplies the model, data,
    split and seed it was trained with); the batches are the first ``max_examples`` of the chosen
    split. Every metric runs in every requested space. Everything is checked and loaded before
    anything is written.

    Args:
        options: An ``argparse.Namespace`` from :func:`add_cli_arguments` or a dict with the same keys
            (missing keys take their defaults).

    Returns:
        The report written to ``sharpness.json`` plus ``table`` (Markdown) and ``out``.

    Raises:
        ValueError: bad options, an adapter folder that does not match the model, unusable data.
    """
    import time

    opts = _cli_options(options)
    adapter, run, run_cfg = _find_adapter(Path(opts["adapter"]))
    model, batches, info = _load_for_cli(opts, adapter, run_cfg)
    out = Path(opts["out"]) if opts["out"] else (run / "sharpness" if run is not None else Path("sharpness"))
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for metric in opts["metrics"]:
        for space in opts["spaces"]:
            start = time.perf_counter()
            results.setdefault(metric, {})[space] = _run_metric(metric, model, batches, space, opts)
            seconds.setdefault(metric, {})[space] = round(time.perf_counter() - start, 3)
    clean = next(iter(next(iter(results.values())).values())).base_loss
    spaces = opts["spaces"]
    lines = ["| metric | " + " | ".join(spaces) + " |", "|---|" + "---|" * len(spaces)]
    lines.append(f"| clean loss | {clean:.4g} |" + " |" * (len(spaces) - 1))
    for metric, by_space in results.items():
        lines.append(
            f"| {_row_title(metric, opts)} | " + " | ".join(_cell(by_space[s]) for s in spaces) + " |"
        )
    table = "\n".join(lines)

    out.mkdir(parents=True, exist_ok=True)
    images = []
    if "landscape_1d" in results:
        images.append(plot_landscape(list(results["landscape_1d"].values()), out / "landscape_1d.png").name)
    for space, land in results.get("landscape_2d", {}).items():
        images.append(plot_landscape(land, out / f"landscape_2d_{space}.png").name)
    from . import __version__

    versions = {"flatpeft": __version__, "torch": torch.__version__}
    for name in ("peft", "transformers"):
        versions[name] = getattr(__import__(name), "__version__", "?")
    report = {
        "adapter": str(adapter),
        **info,
        "options": {k: v for k, v in opts.items() if k not in ("adapter", "out", "progress")},
        "clean_loss": clean,
        "results": {m: {s: r.to_dict() for s, r in by.items()} for m, by in results.items()},
        "seconds": seconds,
        "images": images,
        "versions": versions,
    }
    _dump(report, out / "sharpness.json")
    (out / "sharpness.md").write_text(table + "\n")
    return {**report, "table": table, "out": str(out)}
