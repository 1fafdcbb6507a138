"""An advisory, exclusive file lock (``fcntl.flock``) that the OS drops when its process dies, so a
crash never leaves a stale lock behind. It guards run folders (one writer per run) and the model cache
(one conversion at a time). Where ``fcntl`` does not exist (Windows) nothing is locked."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FileLock"]


class FileLock:
    """An exclusive lock on ``path`` (created, with its folder, on first use; never deleted, since
    deleting a lock file races with the next process that opens it). The holder's pid is written
    into the file, for the message a second process shows."""

    def __init__(self, path: str | Path) -> None:
        self.path, self._fd = Path(path), None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return ``False`` at once if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return True
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the process that holds (or last held) the lock, or ``?``."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
