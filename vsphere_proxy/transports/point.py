"""A restore stream's source: one disk of a restore point, read block by block from the repository.

`PointReader` is a `Transport` whose disks are the restore point's: `open(disk)` takes the point's disk
`disk.index`; `read_block` returns a block's checked chunk (a corrupt chunk is quarantined and the read fails,
naming the point, the disk and the block), or zeros for a hole. `written_offsets(disk)` are the offsets of the
blocks that are not holes: a restore reads and writes only those, so holes stay holes on the target.
"""

from __future__ import annotations

from typing import Self

from vsphere_proxy.repository import DiskRecord, Manifest, Repository, RepositoryError
from vsphere_proxy.transports.base import DiskSource, TransportError


def written_offsets(disk: DiskRecord) -> list[int]:
    """The byte offsets of the disk's blocks that hold data (not holes), ascending."""
    return [i * disk.block_size for i, chunk in enumerate(disk.blocks) if chunk is not None]


class PointReader:
    mode = "repository"

    def __init__(self, repository: Repository, point: Manifest) -> None:
        self.repository = repository
        self.point = point
        self._disk: DiskRecord | None = None

    def open(self, disk: DiskSource) -> None:
        try:
            self._disk = self.point.disk(disk.index)
        except RepositoryError as e:
            raise TransportError(str(e)) from None

    def read_block(self, offset: int, length: int) -> bytes:
        disk = self._disk
        if disk is None:
            raise TransportError("repository: read before open")
        block, rest = divmod(offset, disk.block_size)
        if rest or not 0 <= block < len(disk.blocks) or length != disk.block_length(block):
            raise TransportError(f"restore point {self.point.id} disk {disk.index}: no block of {length} bytes "
                                 f"at offset {offset}")
        chunk = disk.blocks[block]
        if chunk is None:
            return bytes(length)
        try:
            return self.repository.chunks.get(chunk, length)
        except RepositoryError as e:
            raise TransportError(f"restore point {self.point.id} disk {disk.index} block {block}: {e}") from None

    def close(self) -> None:
        self._disk = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
