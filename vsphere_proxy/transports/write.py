"""The write side of the data path, for restores into vCenter: write tiers mirror the read tiers (DESIGN §8).

Every write transport implements `WriteTransport`: `open(disk)` on the new VM's (empty) disk, `write_block`
for the blocks that hold data, in ascending order (a gap between two offsets is a hole: nothing is written
there), and `close(complete)`: with `complete` the disk is whole and made durable; without it everything the
transport holds is released and nothing pretends the disk is whole. `FileWriter` (san, direct-nfs) is here;
`nbd` and `hotadd` talk to vCenter and live in `adapters/`.
"""

from __future__ import annotations

from typing import Protocol, Self

from vsphere_proxy.transports.base import DiskSource, TransportError
from vsphere_proxy.transports.file import LocalDisk, MountedDatastores, local_flat


class WriteTransport(Protocol):
    """Writes one disk at a time. It moves bytes; it neither creates the VM nor reads the repository."""

    mode: str  # san | direct-nfs | hotadd | nbd

    def open(self, disk: DiskSource) -> None: ...

    def write_block(self, offset: int, data: bytes) -> None: ...

    def close(self, complete: bool = True) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class FileWriter(MountedDatastores):
    """`san` and `direct-nfs`: the proxy writes the new disk's flat extent itself, through its datastore -> path
    map (vCenter created the file, empty; it is sized to the disk without writing, so holes stay holes)."""

    def open(self, disk: DiskSource) -> None:
        self.close(False)
        path = local_flat(self._paths, disk, self.mode)
        if not path.is_file() or path.is_symlink():
            raise TransportError(f"{disk}: {self.mode}: {path} is not the disk's flat file (vCenter creates it)")
        self._file = LocalDisk(path, disk, self.mode, writable=True)
        try:
            self._file.size_for_writing()
        except BaseException:
            self.close(False)
            raise

    def write_block(self, offset: int, data: bytes) -> None:
        if self._file is None:
            raise TransportError(f"{self.mode}: write before open")
        self._file.write(offset, data)

    def close(self, complete: bool = True) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            if complete:
                file.sync()
        finally:
            file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(False)
