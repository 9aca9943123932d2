"""Atomic file writes: a fresh file in a scratch directory, fsync, `os.replace` into place; what a full file
system looks like to the repository."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from .format import RepositoryFull

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def scratch_name(directory: Path, stem: str = "") -> Path:
    """A file name in `directory` no other writer (thread, process or host) will pick."""
    return directory / f"{stem}{os.getpid()}-{secrets.token_hex(8)}.tmp"


def write_atomic(final: Path, data: bytes, scratch_dir: Path, *, sync_dir: bool = False, stem: str = "",
                 repository: Path | None = None) -> None:
    """Write `data` to `final` so readers see either nothing or the whole file.

    With `sync_dir`, `final`'s directory is fsynced too, making the rename itself durable. `stem` prefixes the
    scratch file's name, to tell leftovers apart. With `repository`, a write that fails for want of space raises
    `RepositoryFull` for it (the free space counted before the scratch file is removed).
    """
    tmp = scratch_name(scratch_dir, stem)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        full = full_error(repository) if repository is not None and is_full(exc) else None
        remove_quietly(tmp)
        if full is not None:
            raise full from None
        raise
    if sync_dir:
        fsync_dir(final.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def is_full(exc: BaseException) -> bool:
    """True for the errors of a file system without room: no space left, quota exceeded."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def full_error(repository: Path) -> RepositoryFull:
    """`RepositoryFull` for the repository at `repository`, with the bytes its file system has free right now."""
    try:
        st = os.statvfs(repository)
        free = str(st.f_bavail * st.f_frsize)
    except OSError:
        free = "an unknown number of"
    return RepositoryFull(f"repository full: {free} bytes free on {repository}")
