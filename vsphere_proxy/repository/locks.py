"""Repository locks: shared for backup, restore and verify; exclusive for prune (`docs/repository.md`, "Locks").

A lock is `flock(2)` on `locks/lock`, through a file descriptor of its own: taking a shared lock writes nothing (so
it works on a full file system), and a lock goes away with the process that held it. The exclusive holder writes a
one-line record of itself into the file, for the messages of those it keeps out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from .files import remove_quietly
from .format import RepositoryError, RepositoryLocked, one_line

Kind = Literal["shared", "exclusive"]

LOCK_FILE = "lock"
_RECORD_MAX = 4096


class Lock:
    """A held lock; `release` is idempotent. Use `Lock.take` to get one, or as a context manager.

    A lock without a file descriptor is a shared lock on a repository whose lock file cannot exist (a read-only
    file system on which nobody can take the exclusive lock either): it locks nothing.
    """

    def __init__(self, path: Path, kind: Kind, fd: int | None, recorded: bool = False) -> None:
        self.path = path
        self.kind = kind
        self._fd = fd
        self._recorded = recorded
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def take(cls, locks: Path, kind: Kind, purpose: str) -> Lock:
        """Take a lock or fail at once: `RepositoryLocked` naming the holder(s) when another holder conflicts, a
        one-line `RepositoryError` when the lock file cannot be used."""
        path = locks / LOCK_FILE
        fd = _open(path, kind)
        if fd is None:
            return cls(path, kind, None)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if kind == "shared" else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = describe_holders(path, fd)
            os.close(fd)
            raise RepositoryLocked(f"repository is locked: {holders}") from None
        except OSError as exc:
            os.close(fd)
            raise RepositoryError(f"cannot take a {kind} lock on {path}: {one_line(exc)}") from None
        recorded = False
        if kind == "exclusive":
            recorded = _write_record(fd, purpose)
            for old in locks.glob("*.json"):  # files of the earlier one-file-per-holder scheme: meaningless now
                with contextlib.suppress(OSError):
                    remove_quietly(old)
        return cls(path, kind, fd, recorded)

    def release(self) -> None:
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._recorded:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)  # for a child forked meanwhile that shares this open file too
        finally:
            os.close(fd)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:  # a lock dropped without release: free it rather than hold it until the process ends
            with contextlib.suppress(OSError):
                os.close(fd)


def ensure_lock_file(locks: Path) -> OSError | None:
    """Create `locks/lock` if it is missing; the error if it cannot be created, else None."""
    try:
        os.close(os.open(locks / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644))
    except OSError as exc:
        return exc
    return None


def _open(path: Path, kind: Kind) -> int | None:
    """A new file descriptor on the lock file, created if missing; None for a shared lock where the file is
    missing and cannot be created (a read-only or full file system, no permission): that lock locks nothing."""
    flags = (os.O_RDONLY if kind == "shared" else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if kind == "exclusive" and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            try:  # flock needs no write access; only the holder record cannot be written
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        raise RepositoryError(f"cannot take a {kind} lock on {path}: {one_line(exc)}") from None
    try:
        return os.open(path, flags | os.O_CREAT, 0o644)
    except FileNotFoundError:
        raise RepositoryError(f"cannot take a {kind} lock: {path.parent} is missing") from None
    except OSError as exc:
        if kind == "shared" and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM):
            return None
        raise RepositoryError(f"cannot take a {kind} lock: {path} is missing and cannot be created: "
                              f"{one_line(exc)}") from None


def _write_record(fd: int, purpose: str) -> bool:
    record = {"kind": "exclusive", "host": platform.node(), "pid": os.getpid(),
              "created": datetime.now(UTC).isoformat(timespec="seconds"), "purpose": purpose}
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        return os.pwrite(fd, data, 0) == len(data)
    except OSError:  # read-only or full: the record is only informative
        return False


def describe_holders(path: Path, fd: int) -> str:
    """Who holds `path` locked, in one line: the kind of lock and the pids from `/proc/locks`, with the exclusive
    holder's record or each pid's command line; "another process" where nothing tells."""
    holders = _proc_holders(path)
    record = _read_record(fd)
    if not holders:
        if record is not None and record.get("host") != platform.node():
            return f"exclusive lock by pid {record.get('pid')} on {record.get('host')} " \
                   f"({record.get('purpose', '?')}, since {record.get('created', '?')})"
        return f"a conflicting lock on {path} is held by another process"
    kinds = {kind for kind, _ in holders}
    kind = "exclusive" if "exclusive" in kinds else "shared"
    pids = sorted({pid for k, pid in holders if k == kind})
    if kind == "exclusive" and record is not None and record.get("pid") in pids:
        return f"exclusive lock by pid {record['pid']} ({record.get('purpose', '?')}, " \
               f"since {record.get('created', '?')})"
    described = ", ".join(f"pid {pid} ({_command(pid)})" for pid in pids[:5])
    more = f" and {len(pids) - 5} more" if len(pids) > 5 else ""
    return f"{kind} lock by {described}{more}"


def _proc_holders(path: Path) -> list[tuple[Kind, int]]:
    """(kind, pid) of every lock `/proc/locks` lists on `path`; empty where it cannot tell."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: list[tuple[Kind, int]] = []
    for entry in lines:
        fields = entry.split()
        if len(fields) < 6 or fields[1] == "->":  # "->": a waiter, not a holder
            continue
        _, _, _, mode, pid, where = fields[:6]
        if where == wanted and pid.isdigit():
            found.append(("exclusive" if mode == "WRITE" else "shared", int(pid)))
    return found


def _read_record(fd: int) -> dict[str, object] | None:
    try:
        raw = os.pread(fd, _RECORD_MAX, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _command(pid: int) -> str:
    if pid == os.getpid():
        return "this process"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    text = " ".join(text.split())
    return (text[:77] + "...") if len(text) > 80 else (text or "?")


FORGET_LOCK_FILE = "forget"
FORGET_WAIT_SECONDS = 60.0


@contextlib.contextmanager
def forget_lock(locks: Path, purpose: str, wait: float = FORGET_WAIT_SECONDS) -> Iterator[None]:
    """The forget lock (`docs/repository.md`, "Locks"): an exclusive flock on `locks/forget` serialising forget,
    holds and key-slot changes with each other only. Waited for at most `wait` seconds, then `RepositoryLocked`."""
    path = locks / FORGET_LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RepositoryError(f"cannot take the forget lock {path}: {one_line(exc)}") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RepositoryLocked(f"repository is locked: {purpose} waited {wait:g} s for the forget lock "
                                           f"({describe_holders(path, fd)})") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
