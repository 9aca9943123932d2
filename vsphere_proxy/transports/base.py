"""The transport interface and what every transport shares: the disk to read, fixed blocks, errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, Self

BLOCK = 4 << 20  # every transport reads fixed 4 MiB blocks; the last block of a disk may be short


class TransportError(Exception):
    """A disk could not be read; the message names the disk, the transport and the cause. `left_behind`, when
    set, says what the failure left in vCenter (a disk still hot-added): the job's report lists it."""

    def __init__(self, message: str, *, left_behind: str = "") -> None:
        super().__init__(message)
        self.left_behind = left_behind


@dataclass(frozen=True, slots=True)
class DiskSource:
    """One disk of a VM as a backup reads it (from the snapshot's configuration)."""

    vm: str
    index: int
    file: str  # the descriptor, "[datastore] vm/vm.vmdk"
    datastore: str
    capacity: int  # bytes

    @property
    def path(self) -> str:
        """The descriptor's path inside its datastore: "vm/vm.vmdk"."""
        return self.file.split("] ", 1)[1] if self.file.startswith("[") else self.file

    @property
    def flat(self) -> str:
        """The flat extent beside the descriptor: "vm/vm-flat.vmdk"."""
        return flat_path(self.path)

    def __str__(self) -> str:
        return f"{self.vm} disk {self.index} ({self.file})"


def flat_path(descriptor: str) -> str:
    """`vm/vm.vmdk` -> `vm/vm-flat.vmdk` (a monolithic flat disk's data extent)."""
    if not descriptor.endswith(".vmdk"):
        raise TransportError(f"{descriptor}: not a .vmdk descriptor")
    return descriptor[: -len(".vmdk")] + "-flat.vmdk"


class Transport(Protocol):
    """Reads one disk at a time. Where this layer stops: it moves bytes; it neither snapshots nor stores."""

    mode: str  # san | direct-nfs | hotadd | nbd

    def open(self, disk: DiskSource) -> None: ...

    def read_block(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def read_blocks(transport: Transport, capacity: int, *, start: int = 0,
                progress: Callable[[int], None] | None = None,
                offsets: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, block) over [start, capacity) in fixed blocks, or over the given block `offsets` only (an
    incremental read); a short read is an error, never silent."""
    if start % BLOCK:
        raise TransportError(f"start offset {start} is not a multiple of {BLOCK}")
    for offset in range(start, capacity, BLOCK) if offsets is None else offsets:
        if offset % BLOCK or not 0 <= offset < capacity:
            raise TransportError(f"block offset {offset} is not a multiple of {BLOCK} inside the disk's {capacity}")
        length = min(BLOCK, capacity - offset)
        data = transport.read_block(offset, length)
        if len(data) != length:
            raise TransportError(f"{transport.mode}: short read at offset {offset}: {len(data)} of {length} bytes")
        if progress is not None:
            progress(length)
        yield offset, data
