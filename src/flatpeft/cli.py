"""The ``flatpeft`` command line (also ``python -m flatpeft``).

    flatpeft methods                                   # every method, its options and defaults
    flatpeft train --method flat_lora --opt sigma=0.1  # one run folder (MiniLM + tweets by default)
    torchrun --nproc_per_node 2 -m flatpeft train ...  # the same run, data-parallel (one run folder)
    torchrun --nproc_per_node 2 -m flatpeft train --fsdp --precision bf16 --gradient-checkpointing ...
    flatpeft compare --methods lora flat_lora:sigma=0.05,0.1 --seeds 0-4  # paired differences, a sweep
    flatpeft sharpness --adapter runs/flat_lora-seed0  # flatness of a trained adapter, full vs LoRA space
    flatpeft eval runs/lora-seed0 --tasks arith --limit 100  # LM Evaluation Harness scores of a run

Each subcommand is a function ``run(args) -> exit code`` plus a function that adds its arguments,
registered in :data:`COMMANDS` with :func:`command`; a new subcommand is one more registered pair.
Options come from flags or a YAML/JSON file (``--config``; flags win). The keys of a config file are
the fields of :class:`flatpeft.train.TrainConfig` (and ``methods``/``seeds`` for ``compare``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import compare as compare_lib
from . import train as train_lib
from .compare import compare
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
        help="methods to compare, each name or name:key=value,...; key=v1,v2,... sweeps key, one row "
        "per value (default: every registered method)",
    )
    parser.add_argument(
        "--seeds", nargs="+", default=argparse.SUPPRESS, help="seeds and ranges, e.g. 0-4 (default: 0 1 2)"
    )
    parser.add_argument(
        "--reference",
        metavar="SPEC",
        default=argparse.SUPPRESS,
        help="the row every other is paired against (default: lora, else the first row)",
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
    _add_run_options(parser, skip=compare_lib.SKIP)
    from . import eval_cli

    eval_cli.add_compare_arguments(parser)


@command("compare", "train several methods x seeds on the same split; paired differences", _configure_compare)
def run_compare(args: argparse.Namespace) -> int:
    """Run :func:`flatpeft.compare.compare` with the options of ``args``; print the table."""
    options = _options(args)
    for key in ("methods", "seeds", "nproc"):  # flags over the config file
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return compare_lib.run_compare(options, overwrite=args.overwrite)


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


# -- flatpeft llamafactory --------------------------------------------------------------------------


def _configure_llamafactory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config_file", metavar="CONFIG.yaml", help="a LLaMA-Factory training config")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="KEY=VALUE",
        help="overrides, as llamafactory-cli takes",
    )


@command(
    "llamafactory",
    "run LLaMA-Factory's training with the config's flatpeft_method / flatpeft_config",
    _configure_llamafactory,
)
def run_llamafactory(args: argparse.Namespace) -> int:
    """Run :func:`flatpeft.integrations.llamafactory.run` on the config file and its overrides."""
    from .integrations import llamafactory

    llamafactory.run([args.config_file, *args.overrides])
    return 0


# -- flatpeft eval --------------------------------------------------------------------------------


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    from . import eval_cli

    eval_cli.add_cli_arguments(parser)


@command("eval", "score a run with the LM Evaluation Harness (arith, gsm8k, task.yaml ...)", _configure_eval)
def run_eval(args: argparse.Namespace) -> int:
    """Run :func:`flatpeft.eval_cli.evaluate_run` on ``args.run_dir``; print each task's headline."""
    from . import eval_cli

    return eval_cli.run_eval_cli(args)


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

    Bad input prints one ``error:`` line and returns 2; a diverged run returns 1; a run stopped by
    Ctrl-C returns 130, by SIGTERM 143 (128 + the signal). Set ``FLATPEFT_DEBUG=1`` to get tracebacks
    instead (see :func:`debug_enabled`).
    """
    args = build_parser().parse_args(argv)
    if debug_enabled():
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
        return 128 + getattr(e, "signum", 2)


def debug_enabled() -> bool:
    """Whether ``FLATPEFT_DEBUG`` asks for tracebacks: ``1``, ``true``, ``yes`` or ``on`` (any case);
    unset, empty, ``0``, ``false``, ``no`` and ``off`` do not. The one place that reads the variable."""
    return os.environ.get("FLATPEFT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


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
