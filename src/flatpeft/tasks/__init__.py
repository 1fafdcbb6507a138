"""Task files for the LM Evaluation Harness shipped with flatpeft (see :mod:`flatpeft.eval_cli`).

- ``arith`` (``arith.yaml`` + ``arith.py``): arithmetic word problems with GSM8K-style ``#### N``
  answers from a seeded generator, scored by exact match of the final number; its training data is
  the built-in data source ``arith`` of ``flatpeft train --task causal-lm``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUILTIN_TASKS", "TASK_DIR"]

TASK_DIR = Path(__file__).parent
#: Names of the harness tasks in :data:`TASK_DIR`.
BUILTIN_TASKS = tuple(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))
