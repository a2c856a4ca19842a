"""One command at a time per run folder: ``OUT/.lock`` holds the owner's pid, host and start time.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic: of two processes, exactly one creates it). A lock whose
owner is a process that no longer exists on this host is stale (a killed command): it is taken over. A lock held
by a live process, or by a process on another host (whose liveness cannot be checked from here), is refused with
one line naming the owner. Taking over renames the stale file away first and checks that it renamed the stale one
(not a lock another process created meanwhile), so two processes taking over the same stale lock cannot both win.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

from .layout import StageError

__all__ = ["RunLock", "LOCK_FILE"]

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (being written, or garbage): treated as held, see acquire


class RunLock:
    """``with RunLock(out):`` holds ``out/.lock`` for the block; StageError (one line) when another live command
    holds it."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_FILE)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> None:
        for _ in range(5):
            if self._create():
                self.held = True
                return
            holder = _read(self.path)
            if holder is None:  # released meanwhile
                continue
            pid, host = holder.get("pid"), holder.get("host")
            if not isinstance(pid, int) or host != self.owner["host"] or _alive(pid):
                who = f"process {pid} on {host}" if isinstance(pid, int) else "another process (unreadable lock)"
                raise StageError(f"{os.path.dirname(self.path) or '.'} is in use by {who} since "
                                 f"{holder.get('started', '?')} ({self.path}); wait for it to finish, or delete "
                                 f"the lock file if that process is gone")
            self._take_over(holder)
        raise StageError(f"{self.path}: could not take the lock (other processes keep taking it); retry")

    def _take_over(self, stale: dict) -> None:
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else took it over or released it: retry the create
        if _read(aside) == stale:
            os.unlink(aside)
            return
        try:  # we moved a fresh lock of another process: put it back (link fails if a new one is there)
            os.link(aside, self.path)
        except FileExistsError:
            pass
        os.unlink(aside)

    def release(self) -> None:
        if self.held:
            if _read(self.path) == self.owner:
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
