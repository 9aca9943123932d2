"""`FakeTransport`: an in-memory transport for tests, which reads disks from a mapping of descriptor file to
bytes instead of a datastore, and fails or hangs where the test says.

It implements the `Transport` protocol like the real transports (`open`, `read_block`, an idempotent `close`,
the context-manager protocol) and serves any access mode, so a test can run the whole data path (engine,
repository, restore) with no vCenter and no disk image on a file system. A disk whose bytes are shorter than its
capacity reads zeros beyond them (a thin disk never written at its end).

Faults, each optional:
- `fail(vm, offset) -> bool`: the read of that block raises `TransportError` naming the disk, mode and offset;
- `hang`: a `threading.Event` the reads `hang_on(vm, offset)` picks (every read without it) block on until it
  is set — a disk that stopped answering. `ReadLog.waiting` is set when a read starts blocking.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Self

from vsphere_proxy.transports.base import DiskSource, TransportError

__all__ = ["MODES", "FakeTransport", "ReadLog", "Rule"]

MODES = ("san", "direct-nfs", "hotadd", "nbd")

Rule = Callable[[str, int], bool]  # (vm, block offset) -> whether the fault applies to this read


class ReadLog:
    """What the reads of some fake transports did, shared between them and safe across threads: every read
    asked (vm, mode, offset), the VMs whose read was failed (vm -> mode of its first failure), and an event set
    when a read starts blocking on a hang."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads: list[tuple[str, str, int]] = []
        self.failed: dict[str, str] = {}
        self.waiting = threading.Event()

    def read(self, vm: str, mode: str, offset: int) -> None:
        with self.lock:
            self.reads.append((vm, mode, offset))

    def fail(self, vm: str, mode: str) -> None:
        with self.lock:
            self.failed.setdefault(vm, mode)

    def offsets(self, vm: str) -> list[int]:
        """The block offsets read of `vm`, in the order they were asked (every disk, every attempt)."""
        with self.lock:
            return [offset for v, _, offset in self.reads if v == vm]


class FakeTransport:
    """Reads disks from `contents` ({"[datastore] vm/vm.vmdk": bytes}), in any access mode, for tests."""

    def __init__(self, mode: str, contents: Mapping[str, bytes], *, fail: Rule | None = None,
                 hang: threading.Event | None = None, hang_on: Rule | None = None,
                 log: ReadLog | None = None) -> None:
        if mode not in MODES:
            raise TransportError(f"unknown access mode {mode!r}")
        self.mode = mode
        self.contents = contents
        self.fail = fail
        self.hang = hang
        self.hang_on = hang_on
        self.log = log
        self._disk: DiskSource | None = None
        self._data = b""

    def open(self, disk: DiskSource) -> None:
        self.close()
        data = self.contents.get(disk.file)
        if data is None:
            raise TransportError(f"{disk}: {self.mode}: no such disk file {disk.file}")
        if len(data) > disk.capacity:
            raise TransportError(f"{disk}: {self.mode}: {disk.file} holds {len(data)} bytes, more than the disk's "
                                 f"capacity {disk.capacity}")
        self._disk, self._data = disk, data

    def read_block(self, offset: int, length: int) -> bytes:
        disk = self._disk
        if disk is None:
            raise TransportError(f"{self.mode}: read before open (or after close)")
        if offset < 0 or length < 0 or offset + length > disk.capacity:
            raise TransportError(f"{disk}: {self.mode}: read of {length} bytes at offset {offset} is outside the "
                                 f"disk's {disk.capacity} bytes")
        if self.log is not None:
            self.log.read(disk.vm, self.mode, offset)
        if self.hang is not None and (self.hang_on is None or self.hang_on(disk.vm, offset)):
            if self.log is not None:
                self.log.waiting.set()
            self.hang.wait()
        if self.fail is not None and self.fail(disk.vm, offset):
            if self.log is not None:
                self.log.fail(disk.vm, self.mode)
            raise TransportError(f"{disk}: {self.mode}: injected read failure of {disk.vm} at offset {offset}")
        block = self._data[offset:offset + length]
        return block + bytes(length - len(block))

    def close(self) -> None:
        self._disk, self._data = None, b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeWriter:
    """Writes disks into `disks` ({"[datastore] vm/vm.vmdk": bytearray of the disk's capacity}), in any write
    mode, for tests; `fail(vm, offset)` makes a write raise. `written` lists the offsets written, per disk file."""

    def __init__(self, mode: str, disks: dict[str, bytearray], *, fail: Rule | None = None) -> None:
        if mode not in MODES:
            raise TransportError(f"unknown write mode {mode!r}")
        self.mode = mode
        self.disks = disks
        self.fail = fail
        self.written: dict[str, list[int]] = {}
        self._disk: DiskSource | None = None

    def open(self, disk: DiskSource) -> None:
        if disk.file not in self.disks:
            raise TransportError(f"{disk}: {self.mode}: no such disk file {disk.file} (the VM was not created)")
        self._disk = disk

    def write_block(self, offset: int, data: bytes) -> None:
        disk = self._disk
        if disk is None:
            raise TransportError(f"{self.mode}: write before open (or after close)")
        if offset < 0 or offset + len(data) > disk.capacity:
            raise TransportError(f"{disk}: {self.mode}: write of {len(data)} bytes at {offset} is outside the disk")
        if self.fail is not None and self.fail(disk.vm, offset):
            raise TransportError(f"{disk}: {self.mode}: injected write failure of {disk.vm} at offset {offset}")
        self.disks[disk.file][offset:offset + len(data)] = data
        self.written.setdefault(disk.file, []).append(offset)

    def close(self, complete: bool = True) -> None:
        self._disk = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(False)
