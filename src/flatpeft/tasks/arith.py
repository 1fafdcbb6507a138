"""``arith``: two-step arithmetic word problems with GSM8K-style answers, made by a seeded generator.

Each problem is drawn by ``random.Random(f"{split}-{index}")`` from a handful of templates (shopping,
sharing, saving, filling boxes ...) with small numbers, and answered the way GSM8K answers: the steps,
then ``#### N`` with the final number. The ``test`` split (what the LM Evaluation Harness task
``arith`` in ``arith.yaml`` scores) and the ``train`` split (``flatpeft train --data arith``) use
disjoint seeds, and no training question repeats a test question.

This file is read both as ``flatpeft.tasks.arith`` and by the harness's ``!function`` loader (which
imports it by its path), so it uses the standard library only.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["PROMPT", "SIZES", "make_dataset", "problem", "rows"]

#: Problems per split. The test split is the harness task; training data is drawn from ``train``.
SIZES = {"train": 4000, "test": 500}
#: The prompt the harness task asks (``doc_to_text`` in ``arith.yaml``) and training uses.
PROMPT = "Question: {question}\nAnswer:"

_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kim", "Leo"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "books"]


def _shopping(r: random.Random, name: str, item: str) -> tuple[str, str, int]:
    a, packs, each = r.randint(2, 30), r.randint(2, 9), r.randint(2, 12)
    bought, total = packs * each, a + packs * each
    question = (
        f"{name} has {a} {item}. {name} buys {packs} packs with {each} {item} in each pack. "
        f"How many {item} does {name} have now?"
    )
    steps = f"{name} buys {packs} * {each} = {bought} {item}. {name} has {a} + {bought} = {total} {item}."
    return question, steps, total


def _sharing(r: random.Random, name: str, item: str) -> tuple[str, str, int]:
    friends, each = r.randint(2, 9), r.randint(2, 12)
    kept = r.randint(1, 20)
    total = friends * each + kept
    question = (
        f"{name} had {total} {item}. {name} gave {each} {item} to each of {friends} friends. "
        f"How many {item} does {name} have left?"
    )
    given = friends * each
    steps = f"{name} gave away {friends} * {each} = {given} {item}. {total} - {given} = {kept}."
    return question, steps, kept


def _boxes(r: random.Random, name: str, item: str) -> tuple[str, str, int]:
    per_box, boxes = r.randint(3, 15), r.randint(2, 9)
    lost = r.randint(1, per_box * boxes - 1)
    filled, left = per_box * boxes, per_box * boxes - lost
    question = (
        f"A box holds {per_box} {item}. {name} fills {boxes} boxes, then loses {lost} {item}. "
        f"How many {item} are left?"
    )
    steps = f"{boxes} boxes hold {boxes} * {per_box} = {filled} {item}. {filled} - {lost} = {left}."
    return question, steps, left


def _saving(r: random.Random, name: str, item: str) -> tuple[str, str, int]:
    per_day, days, spent = r.randint(2, 20), r.randint(2, 9), r.randint(1, 30)
    earned = per_day * days
    spent = min(spent, earned - 1)
    left = earned - spent
    question = (
        f"{name} saves {per_day} dollars a day for {days} days and then spends {spent} dollars. "
        f"How many dollars does {name} have left?"
    )
    steps = f"{name} saves {per_day} * {days} = {earned} dollars. {earned} - {spent} = {left}."
    return question, steps, left


def _together(r: random.Random, name: str, item: str) -> tuple[str, str, int]:
    other = r.choice([n for n in _NAMES if n != name])
    a, times = r.randint(2, 25), r.randint(2, 5)
    b, total = a * times, a + a * times
    question = (
        f"{name} has {a} {item}. {other} has {times} times as many {item} as {name}. "
        f"How many {item} do they have together?"
    )
    steps = f"{other} has {a} * {times} = {b} {item}. Together they have {a} + {b} = {total}."
    return question, steps, total


_TEMPLATES = [_shopping, _sharing, _boxes, _saving, _together]


def problem(split: str, index: int) -> dict[str, Any]:
    """Problem ``index`` of ``split``: ``{"question", "answer" ("steps\\n#### N"), "number"}``."""
    r = random.Random(f"arith-{split}-{index}")  # str seeds are hashed (SHA-512): stable everywhere
    template = r.choice(_TEMPLATES)
    question, steps, number = template(r, r.choice(_NAMES), r.choice(_ITEMS))
    return {"question": question, "answer": f"{steps}\n#### {number}", "number": number}


def rows(split: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` problems of ``split`` (default: :data:`SIZES`); ``train`` skips any question of
    the test split, so the two never share a problem.

    Raises:
        ValueError: an unknown split.
    """
    if split not in SIZES:
        raise ValueError(f"arith has the splits {list(SIZES)}, not {split!r}")
    n = SIZES[split] if n is None else n
    if split == "test":
        return [problem("test", i) for i in range(n)]
    test = {p["question"] for p in rows("test")}
    out, i = [], 0
    while len(out) < n:
        p = problem("train", i)
        i += 1
        if p["question"] not in test:
            out.append(p)
    return out


def make_dataset(**kwargs: Any) -> Any:
    """The harness's ``custom_dataset``: a ``datasets.DatasetDict`` with ``train`` (few-shot examples)
    and ``test`` splits (keyword arguments, the task's metadata, are ignored)."""
    import datasets

    return datasets.DatasetDict({s: datasets.Dataset.from_list(rows(s)) for s in SIZES})
