"""`san` and `direct-nfs`: the proxy reads the disk's flat extent itself, through its datastore -> path map.

A physical proxy zoned to the LUN (or a VM proxy with the HBA passed through) mounts the VMFS volume read-only,
and an NFS datastore's export is mounted directly; either way the datastore is a directory on the proxy and the
flat extent a file in it. Which directory is the proxy's configuration (`paths: {datastore: mountpoint}`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from vsphere_proxy.transports.base import DiskSource, TransportError


class LocalDisk:
    """An open local file or block device holding a disk, read with pread; errors name the disk and the mode."""

    def __init__(self, path: Path, disk: DiskSource, mode: str) -> None:
        self.path, self.disk, self.mode = path, disk, mode
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise TransportError(f"{disk}: {mode}: cannot open {path}: {e.strerror}") from None

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


class FileTransport:
    def __init__(self, mode: str, paths: Mapping[str, Path]) -> None:
        if mode not in ("san", "direct-nfs"):
            raise ValueError(f"mode: must be san or direct-nfs (got {mode!r})")
        self.mode = mode
        self._paths = dict(paths)
        self._file: LocalDisk | None = None

    def open(self, disk: DiskSource) -> None:
        self.close()
        root = self._paths.get(disk.datastore)
        if root is None:
            raise TransportError(f"{disk}: {self.mode}: datastore {disk.datastore} is not mounted on this proxy")
        path = Path(root) / disk.flat
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
