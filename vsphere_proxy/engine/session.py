"""What an engine needs from one VM attempt: the disks to read, a transport for the assigned mode, where each
disk's blocks go, and a `finish` that always cleans up (snapshot removed, hot-added disks detached)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.transports import DiskSource, Transport


class DiskSink(Protocol):
    """Where the blocks of one disk go (the repository's disk writer)."""

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Finished:
    point_id: str | None
    bytes_written: int
    notes: tuple[str, ...] = ()


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
