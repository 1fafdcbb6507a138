"""Strict JSON for every file flatpeft writes (``config.json``, ``metrics.json``, ``log.jsonl``, the
``compare`` outputs, probe reports): ``NaN`` and ``±Infinity`` are not JSON, so a non-finite float is
written as ``null`` and ``json.dumps`` runs with ``allow_nan=False``. Whole files are written atomically
(a temporary file beside the target, then a rename), so a crash never leaves half a file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["dumps", "json_safe", "write_json", "write_text"]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists, tuples and sets) replaced by
    ``None``, numpy/torch scalars by their Python number and dict keys that are not strings by their
    ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # numpy/torch scalar
        return json_safe(value.item())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)`` with ``allow_nan=False``; objects JSON does not
    know (paths, dtypes) are written as their ``str``."""
    return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` to ``path`` as indented strict JSON (see :func:`dumps`), atomically."""
    write_text(path, dumps(value, indent=2) + "\n")
