"""The run folder of ``flatpeft train``: its metadata, checkpoints (``checkpoints/step-<n>/``) and
their loading. Moved out of :mod:`flatpeft.train`, which keeps the loop."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _scale
from ._train_config import ConfigError

if TYPE_CHECKING:
    from .train import Run

CHECKPOINTS = "checkpoints"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__

    out = {
        "flatpeft": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def _git_revision() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if (p / "state.pt").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(run: Run, out: Path, step: int, rng: dict[str, Any], history: dict[str, list]) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and prune old checkpoints. Rank 0 writes
    ``state.pt`` (the weights, optimizer and method states are the same on every rank, the RNG states
    are not); under ``--fsdp`` every rank also writes its shards of the weights and optimizer state."""
    final, tmp = out / CHECKPOINTS / f"step-{step}", out / CHECKPOINTS / f".tmp-step-{step}"
    method_state = run.method.state_dict()  # on every rank: a sharded method gathers its tensors
    rng_ranks = run.ranks.gather(rng)
    if run.ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    run.ranks.barrier()
    if run.cfg.fsdp or run.ranks.main:
        weights = _scale.save_weights(tmp, run.model, run.optimizer, sharded=run.cfg.fsdp, method=run.method)
    if run.ranks.main:
        state = {
            "step": step,
            **weights,
            "scheduler": run.scheduler.state_dict(),
            "method": method_state,
            "scaler": run.precision.state_dict(),
            "rng": rng,
            "world_size": run.ranks.world,
            "rng_ranks": rng_ranks,
            "history": history,
        }
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[: -run.cfg.keep_checkpoints]:
            shutil.rmtree(old)
    run.ranks.barrier()
    return final


def _load_checkpoint(run: Run, path: Path) -> tuple[int, dict[str, list]]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    world = state.get("world_size", 1)
    if world != run.ranks.world:
        raise ConfigError(
            f"{path} was written by {world} process(es); resume with the same number "
            f"({'torchrun --nproc_per_node ' + str(world) if world > 1 else 'without torchrun'})"
        )
    rng = state["rng_ranks"][run.ranks.rank] if "rng_ranks" in state else state["rng"]
    _scale.load_weights(path, state, run.model, run.optimizer, sharded=run.cfg.fsdp, method=run.method)
    run.scheduler.load_state_dict(state["scheduler"])
    run.method.load_state_dict(state["method"])  # after the optimizer (see _scale.save_weights)
    run.precision.load_state_dict(state.get("scaler"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), state["history"]
