"""Writes to the testbed's flat disk images that Changed Block Tracking sees.

Beside each flat file `<dir>/<name>-flat.vmdk` lies its change journal `<dir>/<name>-ctk.log` (the counterpart of
ESXi's `-ctk.vmdk`): one text line `"<offset> <length>\\n"` per write, appended and fsynced. The launcher answers
QueryChangedDiskAreas from it. Writing the initial images (testbed/images.py) does not journal: they are the
disks' state before tracking began.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from testbed.images import BLOCK, sha256_file
from testbed.topology import DiskImage

FLAT_SUFFIX = "-flat.vmdk"
JOURNAL_SUFFIX = "-ctk.log"


def journal_path(flat: Path) -> Path:
    """The change journal of the flat file `<dir>/<name>-flat.vmdk`: `<dir>/<name>-ctk.log`."""
    flat = Path(flat)
    if not flat.name.endswith(FLAT_SUFFIX):
        raise ValueError(f"{flat}: not a flat disk file (*{FLAT_SUFFIX})")
    return flat.with_name(flat.name[: -len(FLAT_SUFFIX)] + JOURNAL_SUFFIX)


def journal(flat: Path) -> list[tuple[int, int]]:
    """The (offset, length) of every write journaled for `flat`, oldest first; none when there is no journal."""
    try:
        text = journal_path(flat).read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a line still being written
        offset, length = line.split()
        out.append((int(offset), int(length)))
    return out


def rewrite(disk: DiskImage, extents: Sequence[tuple[int, int]], seed: str | int = "rewrite") -> str:
    """Overwrite each (offset, length) of `disk.path` with deterministic PRNG bytes and journal the writes.

    The bytes of an extent depend on (seed, vm, disk index, offset) only. The data is written and fsynced before
    the journal lines are appended and fsynced, so a changeId taken between the two still reports the extents
    later (over-reporting a write is harmless; missing one would not be). Returns the SHA-256 hex of the whole
    flat file afterwards.
    """
    checked = []
    for offset, length in extents:
        offset, length = int(offset), int(length)
        if offset < 0 or length <= 0 or offset + length > disk.capacity:
            raise ValueError(f"{disk.vm} disk {disk.index}: extent ({offset}, {length}) is not inside "
                             f"[0, {disk.capacity})")
        checked.append((offset, length))
    if not disk.path.is_file():
        raise FileNotFoundError(f"{disk.path}: no flat disk file to rewrite")
    with open(disk.path, "r+b") as f:
        for offset, length in checked:
            rng = random.Random(f"rewrite/{seed}/{disk.vm}/{disk.index}/{offset}")
            f.seek(offset)
            while length > 0:
                n = min(length, BLOCK)
                f.write(rng.randbytes(n))
                length -= n
        f.flush()
        os.fsync(f.fileno())
    path = journal_path(disk.path)
    created = not path.exists()
    with open(path, "a", encoding="ascii") as log:
        log.write("".join(f"{offset} {length}\n" for offset, length in checked))
        log.flush()
        os.fsync(log.fileno())
    if created:  # make the new journal's directory entry durable too
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return sha256_file(disk.path)
