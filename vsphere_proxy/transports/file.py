"""`san` and `direct-nfs`: the proxy reads the disk's flat extent itself, through its datastore -> path map.

A physical proxy zoned to the LUN (or a VM proxy with the HBA passed through) mounts the VMFS volume read-only,
and an NFS datastore's export is mounted directly; either way the datastore is a directory on the proxy and the
flat extent a file in it. Which directory is the proxy's configuration (`paths: {datastore: mountpoint}`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from vsphere_proxy.transports.base import DiskSource, TransportError


class LocalDisk:
    """An open local file or block device holding a disk, read with pread (or, `writable`, written with pwrite);
    errors name the disk and the mode."""

    def __init__(self, path: Path, disk: DiskSource, mode: str, *, writable: bool = False) -> None:
        self.path, self.disk, self.mode = path, disk, mode
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_NOFOLLOW if writable else os.O_RDONLY)
        except OSError as e:
            raise TransportError(f"{disk}: {mode}: cannot open {path}: {e.strerror}") from None

    def size_for_writing(self) -> None:
        """Before a disk is written: a regular file is sized to the disk's capacity without writing (what is
        never written stays a hole); a block device must be at least as large. Anything else is refused."""
        assert self._fd is not None
        st = os.fstat(self._fd)
        try:
            if stat.S_ISREG(st.st_mode):
                os.ftruncate(self._fd, self.disk.capacity)
                return
            if stat.S_ISBLK(st.st_mode):
                size = os.lseek(self._fd, 0, os.SEEK_END)
                if size < self.disk.capacity:
                    raise TransportError(f"{self.disk}: {self.mode}: {self.path} holds {size} bytes, the disk "
                                         f"{self.disk.capacity}")
                return
        except OSError as e:
            raise TransportError(f"{self.disk}: {self.mode}: cannot size {self.path}: {e.strerror}") from None
        raise TransportError(f"{self.disk}: {self.mode}: {self.path} is neither a file nor a block device")

    def write(self, offset: int, data: bytes) -> None:
        if self._fd is None:
            raise TransportError(f"{self.mode}: write after close")
        try:
            written = os.pwrite(self._fd, data, offset)
        except OSError as e:
            raise TransportError(f"{self.disk}: {self.mode}: write at {offset}: {e.strerror}") from None
        if written != len(data):
            raise TransportError(f"{self.disk}: {self.mode}: short write at {offset}: {written} of {len(data)}")

    def sync(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise TransportError(f"{self.disk}: {self.mode}: fsync of {self.path}: {e.strerror}") from None

    def size(self) -> int:
        """Bytes in a regular file (a block device reports 0)."""
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            raise TransportError(f"{self.mode}: read after close")
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise TransportError(f"{self.disk}: {self.mode}: read at {offset}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None


def local_flat(paths: Mapping[str, Path], disk: DiskSource, mode: str) -> Path:
    """The disk's flat extent under the proxy's mount of its datastore (`paths`: datastore -> mount point)."""
    root = paths.get(disk.datastore)
    if root is None:
        raise TransportError(f"{disk}: {mode}: datastore {disk.datastore} is not mounted on this proxy")
    return Path(root) / disk.flat


class MountedDatastores:
    """What the san and direct-nfs transports share: the mode, the proxy's datastore mounts, the open disk."""

    def __init__(self, mode: str, paths: Mapping[str, Path]) -> None:
        if mode not in ("san", "direct-nfs"):
            raise ValueError(f"mode: must be san or direct-nfs (got {mode!r})")
        self.mode = mode
        self._paths = dict(paths)
        self._file: LocalDisk | None = None


class FileTransport(MountedDatastores):

    def open(self, disk: DiskSource) -> None:
        self.close()
        path = local_flat(self._paths, disk, self.mode)
        self._file = LocalDisk(path, disk, self.mode)
        size = self._file.size()
        if size < disk.capacity:
            self.close()
            raise TransportError(f"{disk}: {self.mode}: {path} holds {size} bytes, the disk {disk.capacity}")

    def read_block(self, offset: int, length: int) -> bytes:
        if self._file is None:
            raise TransportError(f"{self.mode}: read before open")
        return self._file.read(offset, length)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
