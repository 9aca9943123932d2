"""Atomic file writes: a fresh file in a scratch directory, fsync, `os.replace` into place."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def scratch_name(directory: Path, stem: str = "") -> Path:
    """A file name in `directory` no other writer (thread, process or host) will pick."""
    return directory / f"{stem}{os.getpid()}-{secrets.token_hex(8)}.tmp"


def write_atomic(final: Path, data: bytes, scratch_dir: Path, *, sync_dir: bool = False, stem: str = "") -> None:
    """Write `data` to `final` so readers see either nothing or the whole file.

    With `sync_dir`, `final`'s directory is fsynced too, making the rename itself durable. `stem` prefixes the
    scratch file's name, to tell leftovers apart.
    """
    tmp = scratch_name(scratch_dir, stem)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        remove_quietly(tmp)
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
