"""The run folder of ``flatpeft train``: its metadata, checkpoints (``checkpoints/step-<n>/``) and
their loading, and the rules that keep it trustworthy (SPEC §6):

- one writer: the run holds an exclusive ``fcntl.flock`` on ``<out>/.lock`` for its whole life (rank 0
  under torchrun; the OS releases it when the process dies), and a second writer gets a clear error;
- checkpoints load with ``torch.load(weights_only=True)``: a ``state.pt`` that holds anything but
  tensors and plain containers is refused, naming the file, and nothing in it runs;
- ``--resume`` checks the data: the split fingerprint recorded in ``config.json`` must match the data
  read now, else the run is refused, naming the data;
- a local ``--data`` path is recorded absolute, so a run resumes from any working directory;
- JSON is strict and written atomically (:mod:`flatpeft._strict_json`).
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _scale
from ._filelock import FileLock
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
    state = load_state(path / "state.pt")
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


def load_state(file: str | Path) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU: tensors, numbers, strings and containers only.

    Raises:
        ConfigError: ``file`` holds anything else (a pickled object, which is not run) or is not a
            readable PyTorch file; the message names it.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{file} is not a flatpeft checkpoint that loads safely (weights_only=True refused it: {first}); "
            "it was not loaded. Use a checkpoint flatpeft wrote, or start a new --out"
        ) from e


def _absolute(name: Any) -> Any:
    if isinstance(name, str) and name and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def absolute_data(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``data`` and each ``eval_data`` source that names a local file or folder made
    absolute (a Hub name or ``tweets`` stays as it is), so that the run folder records where the data
    is, whatever the cwd of a later ``--resume`` or ``flatpeft eval``."""
    out = dict(options)
    if "data" in out:
        out["data"] = _absolute(out["data"])
    extra = out.get("eval_data")
    if isinstance(extra, str):
        out["eval_data"] = _absolute(extra)
    elif isinstance(extra, list | tuple):
        out["eval_data"] = [_absolute(e) for e in extra]
    return out


class RunLock:
    """The exclusive claim on a run folder: a :class:`~flatpeft._filelock.FileLock` on
    ``<folder>/.lock``, held until :meth:`release` or until the process dies."""

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = FileLock(self.folder / self.NAME)

    def acquire(self) -> None:
        """Claim the folder (creating it).

        Raises:
            ConfigError: another process holds it.
        """
        if not self._lock.acquire(blocking=False):
            raise ConfigError(
                f"{self.folder} is in use by another flatpeft process (pid {self._lock.holder()}); wait "
                "for it to finish or stop it, or use another --out"
            )

    def release(self) -> None:
        self._lock.release()


def claim(lock: RunLock, out: Path, ranks: Any, resume: bool, data: str, fingerprint: str) -> None:
    """Rank 0 takes ``lock`` on ``out`` and checks the folder: a new run finds no ``config.json`` (another
    run did not start there meanwhile), a resumed one finds its recorded split fingerprint equal to
    ``fingerprint``. Every rank raises the same error.

    Raises:
        ConfigError: the folder is in use, holds another run, or the data changed since it started.
    """
    problem = None
    if ranks.main:
        try:
            lock.acquire()
            _check_folder(out, resume, data, fingerprint)
        except ConfigError as e:
            lock.release()
            problem = str(e)
    problem = ranks.broadcast(problem)
    if problem:
        raise ConfigError(problem)


def _check_folder(out: Path, resume: bool, data: str, fingerprint: str) -> None:
    config = out / "config.json"
    if not resume:
        if config.exists():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or another --out")
        return
    try:
        recorded = json.loads(config.read_text())["data"].get("fingerprint")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"--resume: cannot read {config} ({e}); start a new --out") from e
    if recorded and recorded != fingerprint:
        raise ConfigError(
            f"--resume: the data {data} changed since {out} started (split fingerprint {fingerprint}, "
            f"recorded {recorded}); nothing was changed. Restore the data, or train on it in a new --out"
        )
