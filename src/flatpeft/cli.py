"""The ``flatpeft`` command line (also ``python -m flatpeft``).

    flatpeft methods                                   # every method, its options and defaults
    flatpeft train --method flat_lora --opt sigma=0.1  # one run folder (MiniLM + tweets by default)
    torchrun --nproc_per_node 2 -m flatpeft train ...  # the same run, data-parallel (one run folder)
    torchrun --nproc_per_node 2 -m flatpeft train --fsdp --precision bf16 --gradient-checkpointing ...
    flatpeft compare --methods lora flat_lora:sigma=0.1 --seeds 0 1 2
    flatpeft sharpness --adapter runs/flat_lora-seed0  # flatness of a trained adapter, full vs LoRA space

Each subcommand is a function ``run(args) -> exit code`` plus a function that adds its arguments,
registered in :data:`COMMANDS` with :func:`command`; a new subcommand is one more registered pair.
Options come from flags or a YAML/JSON file (``--config``; flags win). The keys of a config file are
the fields of :class:`flatpeft.train.TrainConfig` (and ``methods``/``seeds`` for ``compare``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import data as data_lib
from . import models as model_lib
from . import train as train_lib
from .registry import get_method, list_methods

__all__ = ["COMMANDS", "command", "compare", "main"]

Configure = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], int]

#: name -> (one-line help, function adding the arguments, function running the command)
COMMANDS: dict[str, tuple[str, Configure, Handler]] = {}


def command(name: str, help: str, configure: Configure) -> Callable[[Handler], Handler]:
    """Register ``flatpeft <name>``: ``configure(parser)`` adds its arguments, the decorated
    function runs it and returns the exit code."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = (help, configure, handler)
        return handler

    return register


# -- options shared by train and compare -------------------------------------------------------------


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys with dashes or underscores).

    Raises:
        ValueError: missing file, bad syntax, or not a mapping.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file not found: {file}")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"{file}: cannot parse it ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{file}: a config file must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


class _KeyValue(argparse.Action):
    """``--opt key=value`` (repeatable) into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, eq, value = str(values).partition("=")
        if not eq:
            parser.error(f"{option_string} takes key=value, got {values!r}")
        current = dict(getattr(namespace, self.dest, None) or {})
        current[key.strip().replace("-", "_")] = value.strip()
        setattr(namespace, self.dest, current)


_SKIP_FOR_COMPARE = {"method", "method_options", "resume", "out", "seed"}
_COMPARE_DEFAULTS = {"sharpness_samples": 4}  # the sharpness column, when flatpeft.sharpness is there


def _add_run_options(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """One flag per :class:`~flatpeft.train.TrainConfig` field; unset flags stay out of the namespace."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
    hints = typing.get_type_hints(train_lib.TrainConfig)
    for f in dataclasses.fields(train_lib.TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        text = f.metadata["help"]
        kwargs["help"] = text if "default" in text else f"{text} (default: {default})"
        hint = hints[f.name]
        plain = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        if plain in (int, float):
            kwargs["metavar"] = "N" if plain is int else "X"
        if f.name == "method_options":
            parser.add_argument("--opt", action=_KeyValue, metavar="KEY=VALUE", **kwargs)
            continue
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "eval_data":
            kwargs.update(action="append", metavar="FILE_OR_NAME")
        elif f.name == "target_modules":
            kwargs.update(nargs="+", metavar="MODULE")
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        parser.add_argument(flag, **kwargs)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file options overridden by the flags given on the command line."""
    given = {
        k: v
        for k, v in vars(args).items()
        if k not in ("config", "command", "handler", "methods", "seeds", "nproc")
    }
    given = {k: v for k, v in given.items() if k not in ("overwrite",)}
    options = load_config_file(args.config) if getattr(args, "config", None) else {}
    if "method_options" in given and isinstance(options.get("method_options"), dict):
        given["method_options"] = {**options["method_options"], **given["method_options"]}
    return {**options, **given}


# -- flatpeft methods -----------------------------------------------------------------------------


def _configure_methods(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


@command("methods", "list the registered methods with their options and defaults", _configure_methods)
def run_methods(args: argparse.Namespace) -> int:
    """Print every registered method, its paper, passes per step and options."""
    listing = []
    for name in list_methods():
        cls = get_method(name)
        options = [{"name": n, "default": d, "help": h} for n, d, h in cls.config_class.describe()]
        listing.append({"name": name, "paper": cls.paper, "passes": cls.passes, "options": options})
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for entry in listing:
        print(f"{entry['name']}  ({entry['passes']} pass{'es' if entry['passes'] > 1 else ''} per step)")
        if entry["paper"]:
            print(f"    {entry['paper']}")
        for opt in entry["options"]:
            print(f"    --opt {opt['name']}={opt['default']!s:<10} {opt['help']}")
        print()
    print(
        f"{train_lib.FULL}  (CLI only) full fine-tuning of every weight without adapters, the reference row"
    )
    return 0


# -- flatpeft train -------------------------------------------------------------------------------


def _configure_train(parser: argparse.ArgumentParser) -> None:
    _add_run_options(parser)


@command(
    "train",
    "fine-tune one model with one method and write a run folder (data-parallel under torchrun -m flatpeft)",
    _configure_train,
)
def run_train(args: argparse.Namespace) -> int:
    """Run :func:`flatpeft.train.train` with the options of ``args`` and print the held-out metrics."""
    metrics = train_lib.train(_options(args))
    if int(os.environ.get("RANK", "0")):
        return 0  # under torchrun every rank returns the same metrics; rank 0 reports them
    test = metrics.get("test", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "n")
    print(
        f"{metrics['method']} seed {metrics['seed']}: test {shown}; {metrics['seconds_per_step']:.3f} s/step"
    )
    return 0


# -- flatpeft compare -----------------------------------------------------------------------------


def _configure_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="SPEC",
        default=argparse.SUPPRESS,
        help="methods to compare, each name or name:key=value,... (default: every registered method)",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=argparse.SUPPRESS, help="seeds (default: 0 1 2)"
    )
    parser.add_argument("--out", default=argparse.SUPPRESS, help="output folder (default: runs/compare)")
    parser.add_argument(
        "--resume", action="store_true", default=argparse.SUPPRESS, help="reuse finished runs in --out"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an earlier comparison in --out first"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="processes per run, started with torchrun --standalone (needed for --fsdp; default: 1)",
    )
    _add_run_options(parser, skip=_SKIP_FOR_COMPARE)


def _label(spec: str) -> str:
    name, options = train_lib.parse_method_spec(spec)
    return name + "".join(f" {k}={v}" for k, v in options.items())


def _folder_name(spec: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", _label(spec)).replace("=", "") + f"-seed{seed}"


_MARKER = "compare-config.json"


def compare(
    options: dict[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    out: str,
    resume: bool = False,
    nproc: int = 1,
) -> dict[str, Any]:
    """Train every method spec with every seed on the same data and split, then summarise.

    Each run is a ``flatpeft train`` in its own process (so peak memory is per run), or in ``nproc``
    processes started by ``torchrun`` (DDP, or FSDP2 with ``fsdp``), writing
    ``<out>/runs/<method>-seed<k>/``; the summary goes to ``compare.md``, ``compare.csv``,
    ``compare.json`` and ``compare.png`` in ``out``. Everything is checked before anything is written.

    Raises:
        ValueError: bad options, methods, data or model; ``out`` in use without ``resume``.
    """
    from . import _scale

    options = _COMPARE_DEFAULTS | {k: v for k, v in options.items() if k not in _SKIP_FOR_COMPARE}
    base = train_lib.TrainConfig.from_dict(options)
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    _scale.check_environment(base, nproc)
    plan = []
    for spec in methods:
        for seed in seeds:
            cfg = train_lib.apply_method_spec(dataclasses.replace(base, seed=seed), spec)
            train_lib._method_config(cfg, 1)  # validates the method options
            plan.append((_label(spec), seed, cfg))
    model_lib.resolve_model(base.model, base.task)
    data_lib.load_splits(  # validates the data and the split once, for every run
        base.data, task=base.task, text_column=base.text_column, label_column=base.label_column,
        prompt_column=base.prompt_column, response_column=base.response_column, val_size=base.val_size,
        test_size=base.test_size, train_size=base.train_size, seed=base.data_seed, eval_data=base.eval_data,
    )  # fmt: skip
    root = Path(out)
    record = {"options": options, "methods": list(methods), "seeds": list(seeds)}
    if nproc > 1:
        record["nproc"] = nproc
    if root.exists() and any(root.iterdir()):
        marker = root / _MARKER
        if not resume:
            raise ValueError(
                f"{root} is not empty; pass --resume to reuse its finished runs or another --out"
            )
        if not marker.is_file() or json.loads(marker.read_text()) != json.loads(json.dumps(record)):
            raise ValueError(f"--resume: {root} holds another comparison; use another --out")
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / _MARKER).write_text(json.dumps(record, indent=2) + "\n")

    results, failed = [], []
    for i, (label, seed, cfg) in enumerate(plan, 1):
        folder = root / "runs" / _folder_name(methods[(i - 1) // len(seeds)], seed)
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            run_config = cfg.to_dict() | {
                "out": str(folder),
                "resume": folder.is_dir() and any(folder.iterdir()),
            }
            config_file = root / "runs" / f"{folder.name}.json"
            config_file.write_text(json.dumps(run_config, indent=2) + "\n")
            print(f"[{i}/{len(plan)}] {label}, seed {seed}", file=sys.stderr, flush=True)
            code = _launch(config_file) if nproc == 1 else _launch_torchrun(config_file, nproc)
            if code != 0 or not metrics_file.is_file():
                failed.append(f"{label} seed {seed}")
                continue
        results.append(
            {"label": label, "seed": seed, "dir": str(folder), **json.loads(metrics_file.read_text())}
        )
    summary = _summarise(results, base.task)
    report = {
        **record,
        "runs": results,
        "summary": summary,
        "failed": failed,
        "versions": train_lib._versions(),
    }
    (root / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _markdown(summary, base)
    (root / "compare.md").write_text(table + "\n")
    _write_csv(root / "compare.csv", summary)
    _plot(root / "compare.png", summary, base.task)
    report["table"] = table
    return report


def _launch(config_file: Path) -> int:
    """Run ``flatpeft train --config <file>`` in a fresh process (its own peak memory); the exit code."""
    return subprocess.run(
        [sys.executable, "-m", "flatpeft", "train", "--config", str(config_file)]
    ).returncode


def _launch_torchrun(config_file: Path, nproc: int) -> int:
    """Run ``torchrun --standalone --nproc_per_node <nproc> -m flatpeft train --config <file>``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, "-m", "flatpeft", "train", "--config", str(config_file)]).returncode


def _metric_names(task: str) -> list[str]:
    return (
        ["accuracy", "macro_f1", "loss"]
        if task == "classification"
        else ["loss", "token_accuracy", "perplexity"]
    )


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summarise(results: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Mean and std over seeds per method label, with seconds per step relative to ``lora``."""
    labels = list(dict.fromkeys(r["label"] for r in results))
    rows = []
    for label in labels:
        runs = [r for r in results if r["label"] == label]
        row: dict[str, Any] = {"label": label, "n": len(runs)}
        for name in _metric_names(task):
            row[name] = _stats([r["test"][name] for r in runs])
        row["train_loss"] = _stats([r["train_loss"] for r in runs])
        if all("sharpness" in r for r in runs):
            row["sharpness"] = _stats([r["sharpness"]["expected_full"] for r in runs])
        row["seconds_per_step"] = _stats([r["seconds_per_step"] for r in runs])
        row["peak_memory_mb"] = _stats([r["peak_memory_mb"] for r in runs])
        key = _metric_names(task)[0]
        for name in runs[0].get("eval", {}):
            row[f"eval:{name}"] = _stats([r["eval"][name][key] for r in runs])
        rows.append(row)
    ref = next((r for r in rows if r["label"] == "lora"), rows[0] if rows else None)
    for row in rows:
        row["time_ratio"] = row["seconds_per_step"]["mean"] / ref["seconds_per_step"]["mean"]
        row["time_reference"] = ref["label"]
    return rows


def _fmt(stat: dict[str, float], n: int, spec: str = ".4f") -> str:
    return f"{stat['mean']:{spec}}" + (f" ± {stat['std']:{spec}}" if n > 1 else "")


def _columns(summary: list[dict[str, Any]], task: str) -> list[tuple[str, str]]:
    names = {"accuracy": "accuracy", "macro_f1": "macro-F1", "loss": "test loss"}
    names |= {"token_accuracy": "token acc.", "perplexity": "perplexity"}
    cols = [(k, names[k]) for k in _metric_names(task)] + [("train_loss", "train loss")]
    if summary and all("sharpness" in row for row in summary):
        cols.append(("sharpness", "sharpness (full, expected)"))
    cols += [
        (k, f"{_metric_names(task)[0]} on {k[5:]}")
        for k in (summary[0] if summary else {})
        if k.startswith("eval:")
    ]
    return cols


def _markdown(summary: list[dict[str, Any]], base: train_lib.TrainConfig) -> str:
    if not summary:
        return "(no finished runs)"
    cols = _columns(summary, base.task)
    ref = summary[0]["time_reference"]
    header = ["method", "seeds", *(title for _, title in cols), "s/step", f"× {ref}", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["label"], str(row["n"])]
        cells += [_fmt(row[k], row["n"], ".3g" if k == "sharpness" else ".4f") for k, _ in cols]
        cells += [f"{row['seconds_per_step']['mean']:.3f}", f"{row['time_ratio']:.2f}"]
        cells.append(f"{row['peak_memory_mb']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    n_train = f"{base.train_size} training examples" if base.train_size else "all training examples"
    lines.append("")
    lines.append(
        f"Model {base.model}, data {base.data} ({n_train}), held-out test split; mean ± std over seeds."
    )
    return "\n".join(lines)


def _write_csv(path: Path, summary: list[dict[str, Any]]) -> None:
    rows = []
    for row in summary:
        flat: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict):
                flat[f"{key}_mean"], flat[f"{key}_std"] = value["mean"], value["std"]
            else:
                flat[key] = value
        rows.append(flat)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, summary: list[dict[str, Any]], task: str) -> None:
    """Bar chart of the main held-out metric (± std) and of the time ratio; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no chart (pip install 'flatpeft[plot]')", file=sys.stderr)
        return
    if not summary:
        return
    key = _metric_names(task)[0]
    labels = [row["label"] for row in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(labels), 4))
    left.bar(labels, [r[key]["mean"] for r in summary], yerr=[r[key]["std"] for r in summary], capsize=4)
    low = min(r[key]["mean"] - r[key]["std"] for r in summary)
    left.set_ylim(max(0.0, low - 0.05) if key != "loss" else 0.0, None)
    left.set_title(f"held-out {key} (mean ± std)")
    right.bar(labels, [r["time_ratio"] for r in summary], color="tab:orange")
    right.axhline(1.0, color="gray", lw=0.8)
    right.set_title(f"seconds per step (× {summary[0]['time_reference']})")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@command("compare", "train several methods x seeds on the same data and tabulate them", _configure_compare)
def run_compare(args: argparse.Namespace) -> int:
    """Run :func:`compare` with the options of ``args``; print the table."""
    options = _options(args)
    registered = sorted(list_methods(), key=lambda name: name != "lora")  # the reference row first
    methods = getattr(args, "methods", None) or options.pop("methods", None) or registered
    seeds = getattr(args, "seeds", None) or options.pop("seeds", None) or [0, 1, 2]
    nproc = int(getattr(args, "nproc", None) or options.pop("nproc", None) or 1)
    options.pop("methods", None)
    options.pop("seeds", None)
    options.pop("nproc", None)
    out = str(options.pop("out", None) or "runs/compare")
    resume = bool(options.pop("resume", False))
    if isinstance(methods, str):
        methods = methods.split()
    if args.overwrite and Path(out).is_dir():
        if not (Path(out) / _MARKER).is_file():
            raise ValueError(f"--overwrite: {out} is not a flatpeft comparison folder; remove it yourself")
        shutil.rmtree(out)
    report = compare(options, list(methods), [int(s) for s in seeds], out, resume=resume, nproc=nproc)
    print(report["table"])
    print(f"\nwritten to {out}/compare.md, .csv, .json, .png")
    if report["failed"]:
        print(f"failed runs: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    return 0


# -- flatpeft sharpness ---------------------------------------------------------------------------


def _configure_sharpness(parser: argparse.ArgumentParser) -> None:
    from . import sharpness_cli

    sharpness_cli.add_cli_arguments(parser)


@command("sharpness", "measure the flatness of a saved adapter (full and LoRA spaces)", _configure_sharpness)
def run_sharpness(args: argparse.Namespace) -> int:
    """Run :func:`flatpeft.sharpness_cli.run_sharpness_cli` with the options of ``args``; print the table."""
    from . import sharpness_cli

    report = sharpness_cli.run_sharpness_cli(args)
    print(report["table"])
    files = ["sharpness.json", "sharpness.md", *report["images"]]
    print(f"\nwritten to {report['out']}/: {', '.join(files)}")
    return 0


# -- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``flatpeft`` parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="flatpeft", description="Flat-minima LoRA fine-tuning on top of PEFT."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flatpeft`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Bad input prints one ``error:`` line and returns 2; a diverged run returns 1; Ctrl-C returns 130.
    Set ``FLATPEFT_DEBUG=1`` to get tracebacks instead.
    """
    args = build_parser().parse_args(argv)
    if os.environ.get("FLATPEFT_DEBUG"):
        return args.handler(args)
    try:
        return args.handler(args)
    except (ValueError, TypeError) as e:
        print(f"flatpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except train_lib.Diverged as e:
        print(f"flatpeft {args.command}: {e}", file=sys.stderr)
        return 1
    except (train_lib.Interrupted, KeyboardInterrupt) as e:
        print(f"flatpeft {args.command}: interrupted. {e}", file=sys.stderr)
        return 130


def run() -> None:
    """The ``flatpeft`` program (console script, ``python -m flatpeft``, ``torchrun -m flatpeft``).

    A ``torchrun`` worker whose command has finished exits without the interpreter's teardown: on 2
    CPU ranks (gloo, bitsandbytes installed) that teardown aborted in a C++ destructor about once in
    twelve runs ("terminate called without an active exception", exit -6) after the run folder was
    complete, which torchrun reports as a failed run. Every file is closed by then; output is flushed.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
