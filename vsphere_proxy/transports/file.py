"""`san` and `direct-nfs`: the proxy reads the disk's flat extent itself, through its datastore -> path map.

A physical proxy zoned to the LUN (or a VM proxy with the HBA passed through) mounts the VMFS volume read-only,
and an NFS datastore's export is mounted directly; either way the datastore is a directory on the proxy and the
flat extent a file in it. Which directory is the proxy's configuration (`paths: {datastore: mountpoint}`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Self

from vsphere_proxy.transports.base import DiskSource, TransportError


class FileTransport:
    def __init__(self, mode: str, paths: Mapping[str, Path]) -> None:
        if mode not in ("san", "direct-nfs"):
            raise ValueError(f"mode: must be san or direct-nfs (got {mode!r})")
        self.mode = mode
        self._paths = dict(paths)
        self._file: BinaryIO | None = None
        self._disk: DiskSource | None = None

    def open(self, disk: DiskSource) -> None:
        self.close()
        root = self._paths.get(disk.datastore)
        if root is None:
            raise TransportError(f"{disk}: {self.mode}: datastore {disk.datastore} is not mounted on this proxy")
        path = Path(root) / disk.flat
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - held until close()
        except OSError as e:
            raise TransportError(f"{disk}: {self.mode}: cannot open {path}: {e.strerror}") from None
        size = os.fstat(self._file.fileno()).st_size
        if size < disk.capacity:
            self.close()
            raise TransportError(f"{disk}: {self.mode}: {path} holds {size} bytes, the disk {disk.capacity}")
        self._disk = disk

    def read_block(self, offset: int, length: int) -> bytes:
        if self._file is None:
            raise TransportError(f"{self.mode}: read before open")
        try:
            return os.pread(self._file.fileno(), length, offset)
        except OSError as e:
            raise TransportError(f"{self._disk}: {self.mode}: read at {offset}: {e.strerror}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
