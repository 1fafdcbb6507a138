"""``flatpeft compare``: several methods × seeds on the same data split, answered as paired differences.

    flatpeft compare --methods lora flat_lora:sigma=0.05,0.1,0.2 bi_lora --seeds 0-4

Each method spec is ``name`` or ``name:key=value,...``; a key followed by several values
(``flat_lora:sigma=0.05,0.1,0.2``) is a strength sweep that expands to one row per value. Every row
trains once per seed, each run in its own process, into ``<out>/runs/<row>-seed<k>/``; finished runs
are reused with ``--resume``. Every run must have trained and been tested on exactly the same
examples (the split fingerprint in its ``config.json``), so differences can be paired by seed.
The summary (:mod:`flatpeft._compare_report`) and the charts (:mod:`flatpeft._compare_plot`) are
written as ``compare.md``, ``compare.csv``, ``compare.json`` and ``compare*.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _compare_plot, _compare_report, _lmeval, _runfolder, eval_cli
from . import data as data_lib
from . import models as model_lib
from . import train as train_lib
from ._strict_json import dumps, write_json
from ._train_config import check_model_limits
from .registry import list_methods

__all__ = ["Row", "compare", "expand_specs", "parse_seeds", "run_compare"]

MARKER = "compare-config.json"
SKIP = {"method", "method_options", "resume", "out", "seed"}  # per-run options compare sets itself
#: the expected full-space sharpness probe is on unless switched off (see docs/sharpness.md for why
#: these numbers: with common noise across runs their standard error is well below the differences)
DEFAULTS = {"sharpness_samples": 8, "sharpness_sigma": 0.05}


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a single method spec, and the sweep it belongs to, if any.

    Attributes:
        spec: ``name`` or ``name:key=value,...`` with one value per key.
        label: ``"name key=value ..."``, the row's name in every output.
        sweep: ``{"group", "method", "key", "value"}`` when the row is one value of a sweep.
    """

    spec: str
    label: str
    sweep: dict[str, Any] | None = None


def label_of(spec: str) -> str:
    """``"flat_lora:sigma=0.1"`` -> ``"flat_lora sigma=0.1"``."""
    name, options = train_lib.parse_method_spec(spec)
    return name + "".join(f" {k}={v}" for k, v in options.items())


def folder_name(row: Row, seed: int) -> str:
    """The run folder of ``row`` and ``seed`` under ``<out>/runs``: the label made file-name safe
    (``flat_lora sigma=0.1`` -> ``flat_lora-sigma0.1-seed0``). A label with other characters than
    letters, digits, ``_``, ``.``, spaces and ``=`` (``lr=1e-3`` and ``lr=1e+3`` would both become
    ``lr1e-3``) also gets the first 8 hex digits of its SHA-256, so distinct labels get distinct
    folders; :func:`compare` still refuses two rows that share a folder."""
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", row.label).replace("=", "")
    if re.search(r"[^A-Za-z0-9_. =]", row.label):
        name += "-" + hashlib.sha256(row.label.encode()).hexdigest()[:8]
    return name + f"-seed{seed}"


def expand_specs(specs: Sequence[str]) -> list[Row]:
    """Expand sweeps: ``flat_lora:sigma=0.02,0.05`` -> rows ``flat_lora:sigma=0.02``, ``...=0.05``.

    After ``name:``, items are separated by commas; an item without ``=`` is one more value of the
    key before it. One key per spec may have several values.

    Raises:
        ValueError: a value before any key, several swept keys in one spec, a repeated row.
    """
    rows: list[Row] = []
    for spec in specs:
        name, _, rest = str(spec).partition(":")
        options: dict[str, list[str]] = {}
        key = None
        for item in filter(None, (s.strip() for s in rest.split(","))):
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip()
                options[key] = [value.strip()]
            elif key is None:
                raise ValueError(f"method spec {spec!r}: {item!r} comes before any key=value")
            else:
                options[key].append(item)
        swept = [k for k, values in options.items() if len(values) > 1]
        if len(swept) > 1:
            raise ValueError(
                f"method spec {spec!r} sweeps {', '.join(swept)}: sweep one option per spec "
                "(write one spec per value of the others)"
            )
        for values in itertools.product(*options.values()):
            chosen = dict(zip(options, values, strict=True))
            single = name.strip() + (":" + ",".join(f"{k}={v}" for k, v in chosen.items()) if chosen else "")
            sweep = None
            if swept:
                value = chosen[swept[0]]
                sweep = {"group": str(spec), "method": name.strip(), "key": swept[0], "value": value}
            rows.append(Row(single, label_of(single), sweep))
    labels = [row.label for row in rows]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"--methods lists {', '.join(repeated)} more than once")
    return rows


def parse_seeds(values: Sequence[Any] | str) -> list[int]:
    """Seeds from ``[0, 1, 2]``, ``["0-9"]``, ``"0-4 7"`` or ``"1,2"``: ranges are inclusive, order kept.

    Raises:
        ValueError: anything but non-negative integers and ``a-b`` ranges with ``a <= b``, or a seed
            listed twice.
    """
    tokens = str(values).replace(",", " ").split() if isinstance(values, str) else values
    seeds: list[int] = []
    for token in tokens:
        text = str(token).replace(",", " ").strip()
        if " " in text:
            seeds += parse_seeds(text)
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if isinstance(token, bool) or not match:
            raise ValueError(f"--seeds takes integers and ranges like 0-9, got {token!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ValueError(f"--seeds range {token!r} runs backwards; write {last}-{first}")
        seeds += range(first, last + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds lists {repeated} more than once")
    return seeds


def _fingerprint(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text())["data"].get("fingerprint") or None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _check_split(folder: Path, expected: str) -> None:
    """Refuse a run folder whose split is not ``expected`` (the data changed, or an older flatpeft)."""
    found = _fingerprint(folder)
    if found != expected:
        what = f"split fingerprint {found}" if found else "no split fingerprint (an older flatpeft)"
        raise ValueError(
            f"{folder} records {what}, not this comparison's {expected}: its differences could not be "
            "paired; delete that run folder to train it again, or use another --out"
        )


def compare(
    options: dict[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int] | str,
    out: str,
    resume: bool = False,
    nproc: int = 1,
    reference: str | None = None,
    overwrite: bool = False,
    lm_eval: eval_cli.EvalOptions | None = None,
) -> dict[str, Any]:
    """Train every method spec (sweeps expanded) with every seed on the same split, then summarise.

    Each run is a ``flatpeft train`` in its own process (so peak memory is per run), or in ``nproc``
    processes started by ``torchrun`` (DDP, or FSDP2 with ``fsdp``). Everything is checked before
    anything is written; with ``resume``, finished runs in ``out`` are reused (the run options must
    be the same; methods and seeds may be added) once their split fingerprint is checked.

    Args:
        options: Run options (fields of :class:`~flatpeft.train.TrainConfig`).
        methods: Method specs; ``name:key=v1,v2`` sweeps ``key``.
        seeds: Seeds, or ranges such as ``"0-9"``.
        out: Output folder.
        resume: Reuse the finished runs in ``out``.
        nproc: Processes per run.
        reference: Label or spec of the reference row (default: ``lora`` when it is a row, else the
            first row).
        overwrite: Delete an earlier comparison in ``out`` once everything is checked (not with
            ``resume``; a folder that is not a comparison is never deleted).
        lm_eval: Also score every run with the LM Evaluation Harness (``flatpeft eval``); each task's
            headline metric is a set of the summary (``lm-eval:<task>``), paired by seed.

    Returns:
        The report written to ``compare.json``, plus ``table`` (Markdown) and ``lines`` (one plain
        summary line per method).

    Raises:
        ValueError: bad options, methods, seeds, data or model; ``out`` in use without ``resume``;
            a reused run trained on another split; another comparison running in ``out``.
    """
    lock = _runfolder.RunLock(out)  # taken once everything is checked (see _compare), held to the end
    try:
        return _compare(options, methods, seeds, out, resume, nproc, reference, overwrite, lock, lm_eval)
    finally:
        lock.release()


def _compare(
    options: dict[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int] | str,
    out: str,
    resume: bool,
    nproc: int,
    reference: str | None,
    overwrite: bool,
    lock: _runfolder.RunLock,
    lm_eval: eval_cli.EvalOptions | None,
) -> dict[str, Any]:
    """:func:`compare`, with ``out`` claimed by ``lock`` once every input is checked."""
    from . import _scale

    if overwrite and resume:
        raise ValueError("--overwrite deletes the runs that --resume would reuse: pass one of them")
    options = _runfolder.absolute_data(DEFAULTS | {k: v for k, v in options.items() if k not in SKIP})
    base = train_lib.TrainConfig.from_dict(options)
    rows, seeds = expand_specs(methods), parse_seeds(seeds)
    if not rows or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    ref = _reference_row(rows, reference)
    tasks = _lmeval.resolve_tasks(lm_eval.tasks, lm_eval.allow_code_execution) if lm_eval else None
    _scale.check_environment(base, nproc)
    plan = []
    for row in rows:
        for seed in seeds:
            cfg = train_lib.apply_method_spec(dataclasses.replace(base, seed=seed), row.spec)
            train_lib._method_config(cfg, 1)  # validates the method options
            plan.append((row, seed, cfg))
    _check_folder_names(rows, seeds[0])
    config, tokenizer = model_lib.model_limits(base.model, base.task)
    check_model_limits(base, config, tokenizer)  # before the folder
    splits = data_lib.load_splits(  # validates the data and the split once, for every run
        base.data, task=base.task, text_column=base.text_column, label_column=base.label_column,
        prompt_column=base.prompt_column, response_column=base.response_column, val_size=base.val_size,
        test_size=base.test_size, train_size=base.train_size, seed=base.data_seed, eval_data=base.eval_data,
    )  # fmt: skip
    if not (splits.test or splits.val or splits.eval_sets):
        raise ValueError(
            "compare scores every run on held-out data and this split has none (--test-size 0 --val-size 0): "
            "set --test-size (e.g. 0.2) or --val-size, or pass --eval-data"
        )
    root = Path(out)
    record: dict[str, Any] = {"options": options, "methods": list(methods), "seeds": seeds}
    if nproc > 1:
        record["nproc"] = nproc
    if lm_eval:
        record["lm_eval"] = eval_cli.describe(lm_eval)
    if overwrite and root.is_dir():  # only now, after every check, and with the folder claimed
        if not (root / MARKER).is_file():
            raise ValueError(f"--overwrite: {out} is not a flatpeft comparison folder; remove it yourself")
        lock.acquire()
        for old in root.iterdir():
            if old.is_dir():
                shutil.rmtree(old)
            elif old.name != lock.NAME:
                old.unlink()
    if root.exists() and any(p.name != lock.NAME for p in root.iterdir()):
        if not resume:
            raise ValueError(
                f"{root} is not empty; pass --resume to reuse its finished runs or another --out"
            )
        marker = root / MARKER
        saved = json.loads(marker.read_text()) if marker.is_file() else None
        free = ("methods", "seeds", "lm_eval")  # may change on --resume
        same = {k: v for k, v in json.loads(dumps(record)).items() if k not in free}
        if saved is None or {k: v for k, v in saved.items() if k not in free} != same:
            raise ValueError(f"--resume: {root} holds a comparison with other run options; use another --out")
        for row, seed, cfg in plan:
            if (root / "runs" / folder_name(row, seed) / "metrics.json").is_file():
                _check_split(root / "runs" / folder_name(row, seed), splits.fingerprint)
                _check_run(root / "runs" / folder_name(row, seed), cfg)
    lock.acquire()  # one comparison at a time in out (a second one gets a clear error)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    write_json(root / MARKER, record)

    results, failed = [], []
    for i, (row, seed, cfg) in enumerate(plan, 1):
        folder = root / "runs" / folder_name(row, seed)
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            started = (folder / "config.json").is_file()  # a run that started and stopped
            run_config = cfg.to_dict() | {"out": str(folder), "resume": started}
            config_file = root / "runs" / f"{folder.name}.json"
            write_json(config_file, run_config)
            print(f"[{i}/{len(plan)}] {row.label}, seed {seed}", file=sys.stderr, flush=True)
            code = _launch(config_file) if nproc == 1 else _launch_torchrun(config_file, nproc)
            if code in _STOPPED:  # Ctrl-C / SIGTERM: the run checkpointed and stopped; so does compare
                raise train_lib.Interrupted(
                    f"{row.label} seed {seed} stopped with a checkpoint in {folder}; continue the "
                    f"comparison with --resume --out {out}",
                    code - 128,
                )
            if code != 0 or not metrics_file.is_file():
                failed.append(f"{row.label} seed {seed}")
                continue
            _check_split(folder, splits.fingerprint)
        _check_run(folder, cfg)
        metrics = json.loads(metrics_file.read_text())
        if tasks is not None:  # scored with these settings (reused when already), only these tasks
            scored = eval_cli.ensure_scored(folder, lm_eval, tasks)[eval_cli.KEY]
            metrics[eval_cli.KEY] = {name: scored[name] for name in tasks.names}
        else:
            metrics.pop(eval_cli.KEY, None)  # scores made elsewhere, with settings not checked here
        results.append({"label": row.label, "seed": seed, "dir": str(folder), **metrics})
    summary = _compare_report.summarise(results, rows, base.task, ref.label)
    report = {
        **record,
        "reference": ref.label,
        "split_fingerprint": splits.fingerprint,
        "runs": results,
        "summary": summary,
        "failed": failed,
        "versions": train_lib._versions(),
    }
    write_json(root / "compare.json", report)
    table = _compare_report.markdown(summary, base)
    (root / "compare.md").write_text(table + "\n")
    _compare_report.write_csv(root / "compare.csv", summary)
    _compare_plot.plot_all(root, summary)
    return report | {"table": table, "lines": _compare_report.console_lines(summary)}


def _reference_row(rows: list[Row], reference: str | None) -> Row:
    if reference is None:
        return next((row for row in rows if row.label == "lora"), rows[0])
    wanted = label_of(reference)
    found = next((row for row in rows if row.label == wanted), None)
    if found is None:
        raise ValueError(
            f"--reference {reference!r} is not one of the rows ({', '.join(r.label for r in rows)}); "
            "add it to --methods or name one of them"
        )
    return found


def _check_folder_names(rows: list[Row], seed: int) -> None:
    """Refuse two rows whose runs would share a folder (see :func:`folder_name`)."""
    seen: dict[str, Row] = {}
    for row in rows:
        other = seen.setdefault(folder_name(row, seed), row)
        if other is not row:
            raise ValueError(
                f"--methods {other.spec!r} and {row.spec!r} would share the run folder "
                f"{folder_name(row, seed)!r}; write one of them differently"
            )


def _check_run(folder: Path, cfg: train_lib.TrainConfig) -> None:
    """Refuse a finished run folder that trained another method or options than its row asks for."""
    try:
        saved = json.loads((folder / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{folder} holds no readable config.json ({e}); delete that run folder") from e
    wanted = cfg.to_dict()
    if any(saved.get(k) != wanted[k] for k in ("method", "method_options", "seed")):
        raise ValueError(
            f"{folder} holds a run of {saved.get('method')} {saved.get('method_options')} seed "
            f"{saved.get('seed')}, not {wanted['method']} {wanted['method_options']} seed {wanted['seed']}; "
            "delete that run folder or use another --out"
        )


#: the signals compare passes on to a run, and the exit codes of a run they stopped (128 + signal)
_STOP_SIGNALS = train_lib.STOP_SIGNALS
_STOPPED = {128 + int(s) for s in _STOP_SIGNALS}


def _launch(config_file: Path) -> int:
    """Run ``flatpeft train --config <file>`` in a fresh process (its own peak memory); the exit code."""
    return _run_child([sys.executable, "-m", "flatpeft", "train", "--config", str(config_file)])


def _launch_torchrun(config_file: Path, nproc: int) -> int:
    """Run ``torchrun --standalone --nproc_per_node <nproc> -m flatpeft train --config <file>``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return _run_child([*launcher, "-m", "flatpeft", "train", "--config", str(config_file)])


def _run_child(argv: list[str]) -> int:
    """Run ``argv`` to its end, passing Ctrl-C and SIGTERM on to it; its exit code, or 128 + the
    signal when one was passed on (or killed it).

    The child runs in its own session, so the terminal's Ctrl-C reaches compare only, which sends it
    on exactly once (a second Ctrl-C sends a second one: the child then stops at once). The child
    finishes its step and writes a checkpoint (torchrun hands the signal to its workers); compare
    waits for it instead of killing it as ``subprocess.run`` does 0.25 s after a Ctrl-C.
    """
    import threading

    child = subprocess.Popen(argv, start_new_session=True)
    forwarded: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():

        def forward(signum, frame):
            forwarded.append(signum)
            child.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in _STOP_SIGNALS}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # compare itself failed: do not leave the child running
            child.kill()
            child.wait()
    if forwarded:
        return 128 + forwarded[0]
    return 128 - code if code < 0 else code


def _nproc(value: Any) -> int:
    """``--nproc`` (default 1) checked before anything is written: an integer >= 1."""
    from ._train_config import check_type, coerce

    nproc = 1 if value is None else check_type(int, coerce(int, value, "nproc"), "nproc")
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1 (processes per run; 1 without torchrun), got {nproc}")
    return nproc


def run_compare(options: dict[str, Any], overwrite: bool = False) -> int:
    """``flatpeft compare`` with resolved options (flags over the config file): run, print, exit code.

    ``options`` holds the run options plus ``methods``, ``seeds``, ``nproc``, ``out``, ``resume`` and
    ``reference``; missing ones default to every registered method (``lora`` first), seeds 0 1 2, one
    process, ``runs/compare``.
    """
    options = dict(options)
    registered = sorted(list_methods(), key=lambda name: name != "lora")  # the reference row first
    methods = options.pop("methods", None) or registered
    seeds = options.pop("seeds", None)
    seeds = [0, 1, 2] if seeds is None or seeds == [] else seeds
    nproc = _nproc(options.pop("nproc", None))
    reference = options.pop("reference", None)
    out = str(options.pop("out", None) or "runs/compare")
    resume = bool(options.pop("resume", False))
    lm_eval = eval_cli.pop_compare_options(options)
    if isinstance(methods, str):
        methods = methods.split()
    report = compare(
        options,
        list(methods),
        seeds,
        out,
        resume=resume,
        nproc=nproc,
        reference=reference,
        overwrite=overwrite,
        lm_eval=lm_eval,
    )
    print(report["table"])
    print()
    print("\n".join(report["lines"]))
    print(f"\nwritten to {out}/compare.md, .csv, .json and charts")
    if report["failed"]:
        print(f"failed runs: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    return 0
