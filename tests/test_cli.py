"""The ``flatpeft`` command line: methods, train, compare, config files and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flatpeft
from flatpeft import cli
from flatpeft import compare as compare_lib
from flatpeft import train as train_lib

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def small_csv(tmp_path):
    words = {"pos": "good great love", "neg": "bad awful hate", "neu": "car road the"}
    rows = [{"text": words[k], "label": k} for k in ["pos", "neg", "neu"] * 20]
    return write_csv(tmp_path / "small.csv", rows)


TINY = ["--model", "tiny", "--max-steps", "2", "--batch-size", "8", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_methods_lists_every_registered_method_with_its_options(capsys):
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in flatpeft.list_methods():
        assert f"\n{name}  (" in "\n" + text
        for option, default, _ in flatpeft.get_method(name).config_class.describe():
            assert f"--opt {option}={default}" in text
    assert cli.main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing] == flatpeft.list_methods()


def test_python_dash_m_is_the_same_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "flatpeft", "methods", "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert [m["name"] for m in json.loads(result.stdout)] == flatpeft.list_methods()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_flags_override_the_config_file(small_csv, in_tmp, capsys):
    config = in_tmp / "run.yaml"
    options = {
        "data": small_csv,
        "lr": 0.5,
        "method": "flat_lora",
        "method_options": {"sigma": 0.2},
        "rank": 2,
    }
    config.write_text(yaml.safe_dump(options))
    code = cli.main(["train", "--config", str(config), *TINY, "--lr", "0.01", "--opt", "schedule=constant"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((in_tmp / "runs" / "flat_lora-seed0" / "config.json").read_text())  # the default --out
    assert saved["config"]["lr"] == 0.01 and saved["config"]["rank"] == 2
    assert saved["method_config"]["sigma"] == 0.2 and saved["method_config"]["schedule"] == "constant"
    assert "flat_lora seed 0: test loss" in capsys.readouterr().out


def test_method_spec_and_typed_options(small_csv, in_tmp):
    code = cli.main(
        ["train", "--data", small_csv, *TINY, "--method", "flat_lora:sigma=0.1,lr=0.02", "--out", "r"]
    )
    assert code == 0
    saved = json.loads((in_tmp / "r" / "config.json").read_text())
    assert saved["method_config"]["sigma"] == 0.1 and saved["config"]["lr"] == 0.02
    assert saved["config"]["method_options"] == {"sigma": 0.1}  # typed, not the string "0.1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.csv"], "data file not found"),
        (["--label-column", "sentiment"], "no column 'sentiment'; available columns: text, label"),
        (["--data", "one_class.csv"], "single class"),
        (["--data", "empty.csv"], "the data is empty"),
        (["--model", "nobody/no-such-model"], "not in the Hugging Face cache"),
        (["--method", "no_such_method"], "unknown method 'no_such_method'; known methods: bi_lora"),
        (["--method", "flat_lora", "--opt", "sigma=-1"], "sigma must be in [0.0, inf], got -1.0"),
        (["--method", "flat_lora", "--opt", "colour=red"], "unknown option(s) ['colour']"),
        (["--method", "lora:sigma=0.1"], "unknown option 'sigma' for method 'lora'"),
        (["--lr", "fast"], "lr: cannot read 'fast' as float"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--train-size", "1000"], "train_size=1000 but only"),
        (["--resume"], "holds no run (no config.json)"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(args, message, small_csv, in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_csv(in_tmp / "one_class.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    write_csv(in_tmp / "empty.csv", [])
    before = sorted(p.name for p in in_tmp.iterdir())
    assert cli.main(["train", "--data", small_csv, *TINY, "--out", "out", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatpeft train: error: ") and message in err, err
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # nothing written, not even the folder


def test_resume_with_another_config_or_into_a_used_folder_changes_nothing(small_csv, in_tmp, capsys):
    assert cli.main(["train", "--data", small_csv, *TINY, "--out", "run", "--checkpoint-every", "1"]) == 0
    before = snapshot(in_tmp / "run")
    assert cli.main(["train", "--resume", "--out", "run", "--method", "flat_lora", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a run with another configuration (method: saved 'lora', given 'flat_lora'" in err
    assert cli.main(["train", "--data", small_csv, *TINY, "--out", "run"]) == 2
    assert "already exists and is not empty; pass --resume" in capsys.readouterr().err
    assert snapshot(in_tmp / "run") == before
    # Resuming a finished run with the same options is a no-op that reports its metrics.
    assert cli.main(["train", "--resume", "--out", "run", "--data", small_csv, "--no-progress"]) == 0
    assert snapshot(in_tmp / "run") == before


def test_diverged_run_exits_1_with_a_message(small_csv, in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(train_lib, "_forward_loss", lambda model, batch: model(**batch).loss * float("inf"))
    assert cli.main(["train", "--data", small_csv, *TINY, "--out", "run"]) == 1
    assert "the loss is inf at step 1" in capsys.readouterr().err
    assert not (in_tmp / "run" / "metrics.json").exists()


def in_process(config_file: Path) -> int:
    return cli.main(["train", "--config", str(config_file)])


def test_compare_tabulates_methods_and_seeds(small_csv, in_tmp, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(compare_lib, "_launch", lambda f: launched.append(f) or in_process(f))
    specs = ["lora", "flat_lora:sigma=0.1"]
    args = ["compare", "--data", small_csv, *TINY, "--methods", *specs, "--seeds", "0-1", "--out", "cmp"]
    sharp = ["--sharpness-samples", "2"]
    assert cli.main([*args, *sharp]) == 0
    printed = capsys.readouterr().out
    root = in_tmp / "cmp"
    assert {p.name for p in root.iterdir()} >= {
        "compare.md",
        "compare.csv",
        "compare.json",
        "compare.png",
        "runs",
    }
    assert len(launched) == 4
    report = json.loads((root / "compare.json").read_text())
    assert [r["label"] for r in report["summary"]["rows"]] == ["lora", "flat_lora sigma=0.1"]
    assert [(r["label"], r["seed"]) for r in report["runs"]] == [
        ("lora", 0), ("lora", 1), ("flat_lora sigma=0.1", 0), ("flat_lora sigma=0.1", 1)
    ]  # fmt: skip
    # The same split for every run; the seed changes the training.
    configs = [json.loads((Path(r["dir"]) / "config.json").read_text()) for r in report["runs"]]
    assert all(c["data"] == configs[0]["data"] for c in configs)
    assert configs[2]["method_config"]["sigma"] == 0.1 and configs[1]["config"]["seed"] == 1
    lora, flat = report["summary"]["rows"]
    accs = [r["test"]["accuracy"] for r in report["runs"][:2]]
    assert lora["stats"]["test"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert lora["diff"]["test"]["accuracy"] is None and flat["diff"]["test"]["loss"]["seeds"] == [0, 1]
    table = (root / "compare.md").read_text()
    assert table.strip() in printed and "| lora | 2 |" in table and "Δ accuracy (pt) (test)" in table
    assert "flat_lora sigma=0.1: accuracy " in printed and " in-domain" in printed
    if importlib.util.find_spec("flatpeft.sharpness") is not None:
        assert all(r["sharpness"]["n_samples"] == 2 for r in report["runs"])
        assert "sharpness ×10⁻³ (full, expected)" in table and "probe SE" in table

    # --resume reuses the finished runs; another comparison in the same folder is refused.
    assert cli.main([*args, *sharp, "--resume"]) == 0 and len(launched) == 4
    assert cli.main([*args, "--resume"]) == 2
    assert "holds a comparison with other run options" in capsys.readouterr().err


def test_compare_runs_each_training_in_its_own_process(small_csv, in_tmp, capsys):
    args = ["compare", "--data", small_csv, *TINY, "--methods", "lora", "--seeds", "3", "--out", "cmp"]
    assert cli.main(args) == 0
    metrics = json.loads((in_tmp / "cmp" / "runs" / "lora-seed3" / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["peak_memory_mb"] > 0
    assert "| lora | 1 |" in capsys.readouterr().out


def test_compare_checks_everything_before_writing(small_csv, in_tmp, capsys):
    args = ["compare", "--data", small_csv, *TINY, "--seeds", "0", "--out", "cmp"]
    assert cli.main([*args, "--methods", "lora", "flat_lora:sigma=-1"]) == 2
    assert "sigma must be in" in capsys.readouterr().err
    assert cli.main([*args, "--methods", "lora", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (in_tmp / "cmp").exists()


def shipped_configs() -> list[Path]:
    found = [
        p for d in ("benchmarks", "examples") for p in (ROOT / d).rglob("*") if p.suffix in (".yaml", ".yml")
    ]
    return sorted(p for p in found if "results" not in p.parts)


def test_there_are_shipped_configs():
    names = {p.name for p in shipped_configs()}
    assert {"demo.yaml", "compare_tweets.yaml"} <= names


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_parses(path):
    options = cli.load_config_file(str(path))
    methods = options.pop("methods", None) or [options.pop("method", "lora")]
    assert compare_lib.parse_seeds(options.pop("seeds", [0]))
    from flatpeft import eval_cli

    eval_cli.pop_compare_options(options)  # compare's --eval-* keys, validated
    skip = ("out", "resume", "reference")
    base = train_lib.TrainConfig.from_dict({k: v for k, v in options.items() if k not in skip})
    for row in compare_lib.expand_specs(methods):
        cfg = train_lib.apply_method_spec(base, row.spec)
        train_lib._method_config(cfg, 10)
