"""Bad input fails early and clearly: every option is type-checked and the model's limits are checked
before the run folder is written; data files in odd encodings, huge fields or mixed numeric labels
load or give an error that names the file and the fix; empty held-out sets skip the sharpness probe
with a recorded reason instead of crashing after training."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import flatpeft
from flatpeft import cli
from flatpeft import data as data_lib
from flatpeft import train as train_lib
from helpers import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def write_rows(path: Path, rows: list[dict]) -> str:
    """A CSV file of ``rows`` (the header from the first row's keys)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([list(rows[0]), *(row.values() for row in rows)])
    return str(path)


@pytest.fixture
def small_csv(tmp_path):
    """30 rows, three classes told apart by their words."""
    words = {"pos": "good great love", "neg": "bad awful hate", "neu": "car road the"}
    return write_rows(tmp_path / "small.csv", [{"text": words[k], "label": k} for k in [*words] * 10])


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# -- options: types, model limits, --nproc ----------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
        ("max_steps", "2.5", "max_steps: cannot read '2.5' as int"),
        ("progress", 1, "progress must be true or false"),
        ("lr", True, "lr must be a number"),
        ("model", 5, "model must be a string (quote it"),
        ("target_modules", [1, 2], "target_modules must be a string or a list of strings"),
        ("method_options", "sigma=1", "method_options must be a mapping"),
    ],
)
def test_config_file_values_are_type_checked_before_the_run_folder(
    tmp_path, capsys, small_csv, key, value, words
):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    base = {"model": "tiny", "data": small_csv, "max_steps": 2, "out": str(out), "progress": False}
    config.write_text(yaml.safe_dump(base | {key: value}))
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and words in err, err
    assert not out.exists()


def test_max_length_beyond_the_models_positions_is_refused_before_writing(tmp_path, capsys, small_csv):
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--data", small_csv, "--max-steps", "1", "--no-progress"]
    code, err = run_cli([*argv, "--max-length", "100000", "--out", str(out)], capsys)
    assert code == 2 and "max_length=100000 is more than the model's max_position_embeddings (512)" in err
    assert "--max-length 512 or less" in err and not out.exists()


def test_tokenizer_model_max_length_is_a_limit_and_its_sentinel_is_not():
    from flatpeft._train_config import TrainConfig, check_model_limits

    cfg = TrainConfig(max_length=300)
    model = tiny_bert()  # 64 positions
    with pytest.raises(ValueError, match="max_position_embeddings"):
        check_model_limits(cfg, model.config, None)

    class Tokenizer:
        model_max_length = 256

    small = TrainConfig(max_length=32)
    check_model_limits(small, model.config, Tokenizer())  # within both
    with pytest.raises(ValueError, match=r"tokenizer's model_max_length \(256\)"):
        check_model_limits(cfg, None, Tokenizer())
    Tokenizer.model_max_length = int(1e30)  # "no limit" as transformers reports it
    check_model_limits(cfg, None, Tokenizer())


def test_causal_lm_max_length_must_hold_a_prompt_and_a_response_token(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--task", "causal-lm", "--data", str(data), "--max-steps", "1"]
    code, err = run_cli([*argv, "--max-length", "1", "--no-progress", "--out", str(out)], capsys)
    assert code == 2 and "max_length=1 cannot hold a prompt token and a response token" in err
    assert "lower --lr" not in err and not out.exists()


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_compare_nproc_below_one_is_an_error_not_one(tmp_path, capsys, small_csv, nproc):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "tiny", "--data", small_csv, "--methods", "lora", "--seeds", "0"]
    code, err = run_cli([*argv, "--max-steps", "1", "--nproc", nproc, "--out", str(out)], capsys)
    assert code == 2 and f"--nproc must be >= 1 (processes per run; 1 without torchrun), got {nproc}" in err
    assert not out.exists()


def test_compare_nproc_from_a_config_file_is_type_checked(tmp_path, capsys, small_csv):
    out, config = tmp_path / "cmp", tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "data": small_csv, "nproc": 1.5, "out": str(out)}))
    code, err = run_cli(["compare", "--config", str(config), "--methods", "lora"], capsys)
    assert code == 2 and "nproc must be an integer, got 1.5" in err and not out.exists()


# -- empty held-out sets ----------------------------------------------------------------------------


def test_empty_test_and_validation_sets_skip_the_probe_with_a_reason(tmp_path, small_csv):
    out = tmp_path / "run"
    options = {"model": "tiny", "data": small_csv, "out": str(out), "max_steps": 2, "batch_size": 8}
    options |= {"test_size": 0, "val_size": 0, "sharpness_samples": 2, "progress": False}
    metrics = train_lib.train(options)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert metrics["test"] == {} and metrics["val"] == {} and "sharpness" not in metrics
    assert "no test or validation examples" in metrics["sharpness_skipped"]
    with_test = train_lib.train({**options, "out": str(tmp_path / "run2"), "test_size": 6})
    assert with_test["sharpness"]["n_examples"] == 6 and "sharpness_skipped" not in with_test


def test_compare_without_held_out_data_is_refused_before_training(tmp_path, capsys, small_csv):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "tiny", "--data", small_csv, "--methods", "lora", "--seeds", "0"]
    code, err = run_cli([*argv, "--test-size", "0", "--val-size", "0", "--out", str(out)], capsys)
    assert code == 2 and "compare scores every run on held-out data" in err and "--eval-data" in err
    assert not out.exists()


# -- data files -------------------------------------------------------------------------------------


def test_a_csv_field_longer_than_131072_characters_loads(tmp_path):
    long = "word " * 40_000  # 200k characters, over csv's default field limit
    path = write_rows(tmp_path / "long.csv", [{"text": long, "label": "a"}, {"text": "short", "label": "b"}])
    rows = data_lib.load_rows(path)
    assert rows[0]["text"] == long and rows[1] == {"text": "short", "label": "b"}
    assert csv.field_size_limit() == 131072  # the process-wide limit is put back


def test_a_non_utf8_jsonl_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "café", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(data_lib.DataError) as e:
        data_lib.load_rows(str(path))
    assert (
        str(path) in str(e.value)
        and "not valid UTF-8" in str(e.value)
        and "re-save it as UTF-8" in str(e.value)
    )


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_a_csv_with_a_byte_order_mark_is_read_in_its_encoding(tmp_path, encoding):
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\ncafé crème,pos\nbad,neg\n".encode(encoding))  # Python writes the BOM
    rows = data_lib.load_rows(str(path))
    assert rows == [{"text": "café crème", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_utf16_without_a_byte_order_mark_is_an_error_not_garbled_columns(tmp_path):
    path = tmp_path / "nobom.csv"
    path.write_bytes("text,label\nhello,pos\n".encode("utf-16-le"))
    with pytest.raises(data_lib.DataError, match=r"NUL bytes.*UTF-16/UTF-32 without a byte-order mark"):
        data_lib.load_rows(str(path))


def test_numeric_labels_1_and_1_0_are_one_class(tmp_path):
    path = tmp_path / "mixed.jsonl"
    values = [1, 1.0, "1", "1.00", 0, 0.0, "0.5", 0.5]
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n" for i, v in enumerate(values)))
    examples, labels = data_lib.load_examples(str(path))
    assert labels == ["0", "0.5", "1"]
    assert [e.label for e in examples] == [2, 2, 2, 2, 0, 0, 1, 1]
    assert [data_lib.label_name(v) for v in ["pos", True, "nan", " 2 "]] == ["pos", "True", "nan", "2"]


def test_hub_datasets_never_run_a_loading_script(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def load_dataset(*args, **kwargs):
        seen.update(kwargs)
        return {"train": [{"text": "a", "label": 0}, {"text": "b", "label": 1}]}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(data_lib.load_rows("someone/some_dataset")) == 2
    assert seen["trust_remote_code"] is False


# -- the method API ---------------------------------------------------------------------------------


def test_backward_given_a_tensor_names_the_closure_fix():
    model = tiny_bert()
    method = flatpeft.attach(model, "lora")
    batch = {"input_ids": torch.randint(0, 64, (2, 5)), "labels": torch.tensor([0, 1])}
    with pytest.raises(TypeError, match=r"lambda: model\(\*\*batch\)\.loss") as e:
        method.backward(model(**batch).loss)
    assert "loss_fn is a Tensor" in str(e.value)
    upper = flatpeft.attach(tiny_bert(), "bilevel_lora")
    with pytest.raises(TypeError, match="upper_loss_fn is a Tensor"):
        upper.backward(lambda: model(**batch).loss, upper_loss_fn=torch.tensor(1.0))


# -- no bitsandbytes warning when nothing is quantized ------------------------------------------------


def test_importing_and_a_tiny_train_print_no_bitsandbytes_kernel_warning(tmp_path, small_csv):
    src = str(Path(flatpeft.__file__).resolve().parents[1])  # the flatpeft under test
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = ["--model", "tiny", "--data", small_csv, "--max-steps", "1", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "flatpeft", "train", *argv, "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stderr and "gemm_4bit" not in proc.stderr, proc.stderr


def test_compare_max_length_beyond_the_model_is_refused_before_writing(tmp_path, capsys, small_csv):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "tiny", "--data", small_csv, "--methods", "lora", "--seeds", "0"]
    code, err = run_cli([*argv, "--max-length", "100000", "--out", str(out)], capsys)
    assert code == 2 and "max_length=100000 is more than the model's max_position_embeddings (512)" in err
    assert "--max-length 512 or less" in err and not out.exists()
