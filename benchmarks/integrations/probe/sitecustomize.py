"""Test-only probe for ``benchmarks/integrations/check_hosts.py`` (never installed or imported by flatpeft).

A host's CLI (``axolotl train``, ``flatpeft llamafactory``) runs with this folder on ``PYTHONPATH`` and
``FLATPEFT_PROBE=FILE``; Python imports ``sitecustomize`` at start-up, which wraps
``transformers.Trainer.train`` and ``Trainer.log`` once ``transformers.trainer`` is imported. It writes
to FILE (JSON): the trainer class, the flatpeft config, every dict the Trainer logged, and a SHA-256
over the frozen parameters (``requires_grad`` false, by name) when ``train`` starts and when it returns,
so the driver can check from outside that the host ran the method and left the frozen weights
bit-identical.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import json
import os
import sys

TARGET = "transformers.trainer"


def _frozen_digest(model) -> dict:
    digest, count = hashlib.sha256(), 0
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            continue
        t = p.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
        count += 1
    return {"sha256": digest.hexdigest(), "tensors": count}


def _patch(module) -> None:
    trainer_cls = module.Trainer
    path = os.environ["FLATPEFT_PROBE"]
    record: dict = {"logs": []}

    def write() -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            with open(path, "w") as f:
                json.dump(record, f, indent=1, default=str)

    real_train, real_log = trainer_cls.train, trainer_cls.log

    def train(self, *args, **kwargs):
        record["trainer"] = type(self).__name__
        record["frozen_before"] = _frozen_digest(self.model)
        write()
        result = real_train(self, *args, **kwargs)
        config = getattr(self, "flat_config", None)
        record["flat_config"] = config.to_dict() if config is not None else None
        record["frozen_after"] = _frozen_digest(self.model)
        write()
        return result

    def log(self, logs, *args, **kwargs):
        record["logs"].append(dict(logs))
        return real_log(self, logs, *args, **kwargs)

    trainer_cls.train, trainer_cls.log = train, log


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("FLATPEFT_PROBE"):
    sys.meta_path.insert(0, _Finder())
