"""What an engine needs from one VM attempt: the disks to read, a transport for the assigned mode, where each
disk's blocks go, and a `finish` that always cleans up (snapshot removed, hot-added disks detached)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.transports import DiskSource, Transport


class DiskSink(Protocol):
    """Where the blocks of one disk go (the repository's disk writer, or a restore's write transport)."""

    def offsets(self) -> Sequence[int] | None:
        """The block offsets to read, ascending (an incremental read, or a restore's blocks that are not
        holes); None reads every block."""

    def write(self, offset: int, data: bytes) -> None: ...

    def close(self, ok: bool) -> None:
        """Called once when the stream's disk is read (`ok`) or its stream failed; a restore's sink closes its
        write transport (a disk whole only when `ok`)."""


@dataclass(frozen=True)
class Finished:
    point_id: str | None
    bytes_written: int
    notes: tuple[str, ...] = ()
    stats: Mapping[str, int] = field(default_factory=dict)  # the repository's counts (new chunks, dedup, ...)
    read: str = ""  # how the disks were read: "full", "incremental (CBT)", "full: <why not incremental>"
    left_behind: tuple[str, ...] = ()  # what cleanup could not remove ("snapshot NAME of VM: why")


class VmSession(Protocol):
    """One attempt of one VM on one proxy, prepared (snapshot taken) and not yet finished."""

    def source(self, disk: int) -> DiskSource: ...

    def transport(self) -> Transport: ...

    def sink(self, disk: int) -> DiskSink: ...

    def finish(self, ok: bool) -> Finished:
        """Commit the restore point when ok; in every case remove the snapshot and detach what was attached.
        Idempotent."""


class Preparer(Protocol):
    def prepare(self, assignment: Assignment) -> VmSession: ...
