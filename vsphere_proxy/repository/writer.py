"""Writing one restore point: `PointWriter` (the point) and `DiskWriter` (one disk's blocks).

A writer holds a shared repository lock from `Repository.begin` until `commit` or `abort`. Disks of one point,
and points of one repository, may be written from many threads at once; the heavy work (hash, compress, write)
runs outside any lock. A repository that runs out of space ends the point: it is aborted (no manifest, lock
released) and every later call on it raises the same `RepositoryFull`.

A point begun with the VM's configuration (`vm_config`) is written as a version-2 manifest; its NVRAM file, if
given, is stored first, as a chunk like any block, and named in `vm_config.nvram`. A point begun without one is
a version-1 manifest (disks only).
"""

from __future__ import annotations

import json
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from .chunks import ChunkStore
from .files import fsync_dir, write_atomic
from .format import (
    MANIFEST_VERSION,
    BaseDamaged,
    DiskRecord,
    DiskStats,
    Manifest,
    NvramRecord,
    RepositoryError,
    RepositoryFull,
    VmConfig,
    VmIdentity,
    block_count,
    block_length,
    dump_record,
    one_line,
    zeros,
)
from .locks import Lock

_UNSET = ""  # a block not yet written; never a valid chunk id


class DiskWriter:
    """The blocks of one disk. `write` a block's bytes, or `keep` the base point's entry for an unchanged block."""

    def __init__(self, point: PointWriter, index: int, label: str, capacity: int, block_size: int,
                 base: DiskRecord | None, change_id: str | None) -> None:
        self._point = point
        self.index = index
        self.label = label
        self.capacity = capacity
        self.block_size = block_size
        self.change_id = change_id
        self._base = base
        self._blocks: list[str | None] = [_UNSET] * block_count(capacity, block_size)
        self._stats = dict.fromkeys(DiskStats.model_fields, 0)
        self._lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        """Store the block starting at `offset` (a multiple of the block size); `data` is the whole block.

        All-zero data is recorded as a hole; other data is hashed and stored unless the chunk exists.
        """
        self._point._check_open()
        block = self._block_at(offset)
        expected = block_length(self.capacity, self.block_size, block)
        if len(data) != expected:
            raise RepositoryError(f"disk {self.index}: block at offset {offset} is {len(data)} bytes, "
                                  f"expected {expected}")
        if data == zeros(expected):
            entry, counts = None, {"zero_blocks": 1}
        else:
            try:
                stored = self._point._store.put(data)
            except RepositoryFull as exc:
                self._point._fail(exc)
                raise
            entry = stored.chunk
            if stored.new:
                self._point._touched(self._point._store.path(stored.chunk).parent)
                counts = {"new_chunks": 1, "new_bytes_stored": stored.written}
            else:
                counts = {"dedup_chunks": 1}
        with self._lock:
            self._blocks[block] = entry
            self._stats["bytes_in"] += expected
            for key, n in counts.items():
                self._stats[key] += n

    def keep(self, block: int, count: int = 1) -> None:
        """Reuse the base point's entries for `count` blocks from `block` (unchanged since the base point)."""
        self._point._check_open()
        if self._base is None:
            raise RepositoryError(f"disk {self.index}: keep needs a base restore point with disk {self.index}")
        if count < 1 or block < 0 or block + count > len(self._blocks):
            raise RepositoryError(f"disk {self.index}: blocks {block}..{block + count - 1} outside the disk's "
                                  f"{len(self._blocks)} blocks")
        base = self._base
        entries = []
        for b in range(block, block + count):
            if b >= len(base.blocks) or base.block_length(b) != block_length(self.capacity, self.block_size, b):
                raise RepositoryError(f"disk {self.index}: block {b} has a different length in the base point; "
                                      "write it instead")
            entries.append(base.blocks[b])
        with self._lock:
            self._blocks[block:block + count] = entries
            self._stats["kept_blocks"] += count

    def holes(self, block: int, count: int = 1) -> None:
        """Record `count` blocks from `block` as holes without reading them: areas the disk never allocated
        (changed-block tracking's `*` query), which read as zeros."""
        self._point._check_open()
        if count < 1 or block < 0 or block + count > len(self._blocks):
            raise RepositoryError(f"disk {self.index}: blocks {block}..{block + count - 1} outside the disk's "
                                  f"{len(self._blocks)} blocks")
        with self._lock:
            self._blocks[block:block + count] = [None] * count
            self._stats["zero_blocks"] += count

    @property
    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(**self._stats)

    def _block_at(self, offset: int) -> int:
        if offset < 0 or offset % self.block_size:
            raise RepositoryError(f"disk {self.index}: offset {offset} is not a multiple of the block size "
                                  f"{self.block_size}")
        if offset >= self.capacity:
            raise RepositoryError(f"disk {self.index}: offset {offset} is beyond the capacity {self.capacity}")
        return offset // self.block_size

    def record(self) -> DiskRecord:
        with self._lock:
            missing = [i for i, e in enumerate(self._blocks) if e == _UNSET]
            if missing:
                raise RepositoryError(f"disk {self.index} ({self.label}): {len(missing)} of {len(self._blocks)} "
                                      f"blocks not written: {_ranges(missing)}")
            return DiskRecord(index=self.index, label=self.label, capacity=self.capacity,
                              block_size=self.block_size, change_id=self.change_id, blocks=tuple(self._blocks),
                              stats=DiskStats(**self._stats))


class PointWriter:
    """One restore point being written. `commit` publishes it; `abort` (or leaving a `with` block) drops it."""

    def __init__(self, *, store: ChunkStore, points: Path, scratch: Path, lock: Lock, block_size: int,
                 job_id: str, vm: VmIdentity, config: dict[str, Any], started: datetime,
                 vm_config: VmConfig | None = None) -> None:
        self._store = store
        self._points = points
        self._scratch = scratch
        self._lock = lock
        self._block_size = block_size
        self.id = f"{started.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
        self.job_id = job_id
        self.vm = vm
        self.config = config
        self.vm_config = vm_config
        self.started = started
        self._disks: dict[int, DiskWriter] = {}
        self._dirs: set[Path] = set()
        self._state_lock = threading.Lock()
        self._state = "open"
        self._fault: RepositoryFull | None = None

    def store_nvram(self, data: bytes) -> NvramRecord:
        """Store the VM's NVRAM file as a chunk (deduplicated like a block) and name it in `vm_config.nvram`, keeping
        the `file` an earlier record gave. Raises `RepositoryFull` (the point is then dropped) when out of space."""
        self._check_open()
        if self.vm_config is None:
            raise RepositoryError(f"restore point {self.id}: an NVRAM file needs the VM's configuration (vm_config)")
        try:
            stored = self._store.put(data)
        except RepositoryFull as exc:
            self._fail(exc)
            raise
        if stored.new:
            self._touched(self._store.path(stored.chunk).parent)
        before = self.vm_config.nvram
        record = NvramRecord(chunk=stored.chunk, size=len(data), file=before.file if before is not None else "")
        with self._state_lock:
            self.vm_config = self.vm_config.model_copy(update={"nvram": record})
        return record

    def disk(self, index: int, label: str, capacity: int, base: Manifest | None = None,
             change_id: str | None = None) -> DiskWriter:
        """Add a disk of `capacity` bytes. With `base` (an earlier point of the same VM), `keep` may reuse its
        entries for the disk with the same index; `BaseDamaged` if that disk of `base` lost chunks (quarantined or
        missing): the disk must then be added without a base and written in full."""
        self._check_open()
        if index < 0 or capacity < 0:
            raise RepositoryError(f"disk {index}: index and capacity must not be negative")
        base_disk = None
        if base is not None:
            if not base.vm.same_vm(self.vm):
                raise RepositoryError(f"base restore point {base.id} belongs to VM {base.vm.name}, not {self.vm.name}")
            if not (self._points / f"{base.id}.json").exists():
                # checked under our shared lock: once seen here, prune cannot remove the base's chunks until commit
                raise RepositoryError(f"base restore point {base.id} is no longer in the repository")
            base_disk = next((d for d in base.disks if d.index == index), None)
            if base_disk is not None and base_disk.block_size != self._block_size:
                raise RepositoryError(f"base restore point {base.id} disk {index} uses another block size")
            if base_disk is not None:
                lost = sorted(c for c in set(base_disk.blocks) if c is not None and not self._store.present(c))
                if lost:
                    raise BaseDamaged(f"base restore point {base.id} disk {index} lost {len(lost)} chunk(s) "
                                      f"(quarantined or missing, first {lost[0]}); write the disk in full")
        with self._state_lock:
            if index in self._disks:
                raise RepositoryError(f"disk {index} added twice to restore point {self.id}")
            writer = DiskWriter(self, index, label, capacity, self._block_size, base_disk, change_id)
            self._disks[index] = writer
        return writer

    def commit(self, ended: datetime | None = None) -> Manifest:
        """Publish the point: make its new chunks durable, then write its manifest atomically."""
        self._check_open()
        ended = ended or datetime.now(UTC)
        with self._state_lock:
            disks = tuple(self._disks[i].record() for i in sorted(self._disks))
            version = MANIFEST_VERSION if self.vm_config is not None else 1
            manifest = Manifest(version=version, id=self.id, job_id=self.job_id, vm=self.vm, config=self.config,
                                started=self.started, ended=ended, disks=disks, vm_config=self.vm_config)
            try:
                for directory in sorted(self._dirs):
                    fsync_dir(directory)
                record = self._store.codec.seal_record("point", self.id, dump_record(manifest))
                write_atomic(self._points / f"{self.id}.json", record, self._scratch, sync_dir=True,
                             stem="point-", repository=self._store.repository)
            except RepositoryFull as exc:
                self._fault = exc
                self._close("aborted")
                raise
            self._close("committed")
        return manifest

    def abort(self) -> None:
        """Drop the point; no manifest is written. Idempotent; a no-op after `commit`."""
        with self._state_lock:
            if self._state == "open":
                self._close("aborted")

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()

    def _close(self, state: str) -> None:
        self._state = state
        self._lock.release()

    def _check_open(self) -> None:
        if self._state != "open":
            if self._fault is not None:
                raise RepositoryFull(str(self._fault))
            raise RepositoryError(f"restore point {self.id} is already {self._state}")

    def _fail(self, fault: RepositoryFull) -> None:
        """The repository is full: drop the point (no manifest, lock released); later calls raise `fault` again."""
        with self._state_lock:
            if self._state == "open":
                self._fault = fault
                self._close("aborted")

    def _touched(self, directory: Path) -> None:
        with self._state_lock:
            self._dirs.add(directory)


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"VM config summary is not JSON: {one_line(exc)}") from None


def _ranges(indexes: list[int]) -> str:
    """`[3, 4, 5, 9]` -> "3-5, 9" (at most five ranges)."""
    spans: list[list[int]] = []
    for i in indexes:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans[:5])
    return text + (", ..." if len(spans) > 5 else "")
