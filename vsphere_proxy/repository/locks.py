"""Repository locks: shared for backup, restore and verify; exclusive for prune (`docs/repository.md`, "Locks").

A lock is a file in `locks/`. A locker creates its file first and looks second, so of two racing lockers at
least one sees the other. Locks left by dead processes of this host are stale and removed by whoever finds them.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from .files import remove_quietly, write_atomic
from .format import RepositoryError, one_line

Kind = Literal["shared", "exclusive"]


class Lock:
    """A held lock; `release` is idempotent. Use `Lock.take` to get one, or as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def take(cls, locks: Path, scratch: Path, kind: Kind, purpose: str) -> Lock:
        """Take a lock or fail at once with a one-line `RepositoryError` naming the holder."""
        body = {"kind": kind, "host": platform.node(), "pid": os.getpid(),
                "created": datetime.now(UTC).isoformat(), "purpose": purpose}
        path = locks / f"{kind}-{secrets.token_hex(8)}.json"
        try:
            write_atomic(path, json.dumps(body).encode(), scratch, stem="lock-")
        except OSError as exc:
            raise RepositoryError(f"cannot take a {kind} lock in {locks}: {one_line(exc)}") from None
        lock = cls(path)
        blocker = _first_blocker(locks, path, kind)
        if blocker is not None:
            lock.release()
            raise RepositoryError(f"repository is locked: {blocker}")
        return lock

    def release(self) -> None:
        remove_quietly(self.path)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _first_blocker(locks: Path, own: Path, kind: Kind) -> str | None:
    """Describe the first live lock that conflicts with ours; remove stale ones on the way."""
    for path in sorted(locks.glob("*.json")):
        if path == own:
            continue
        other_kind = "exclusive" if path.name.startswith("exclusive-") else "shared"
        if kind == "shared" and other_kind == "shared":
            continue
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            return f"{path.name} (unreadable lock file)"
        if is_stale(body):
            remove_quietly(path)
            continue
        return f"{body.get('kind', other_kind)} lock by pid {body.get('pid')} on {body.get('host')} " \
               f"({body.get('purpose', '?')}, since {body.get('created', '?')})"
    return None


def is_stale(body: object) -> bool:
    """A lock of this host whose process is gone. Locks of other hosts are never stale."""
    if not isinstance(body, dict) or body.get("host") != platform.node():
        return False
    pid = body.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
