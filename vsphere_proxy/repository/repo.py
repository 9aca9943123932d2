"""`Repository`: open or create a repository, write restore points, list them, restore a disk image.

The on-disk format and its rules are in `docs/repository.md`; verify and prune live in `check.py`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from .check import PruneResult, VerifyReport, prune, verify
from .chunks import ChunkStore
from .files import fsync_dir, remove_quietly, write_atomic
from .format import (
    DiskRecord,
    Manifest,
    RepoConfig,
    RepositoryError,
    VmIdentity,
    check_point_id,
    dump_record,
    one_line,
    read_record,
    zeros,
)
from .locks import Kind, Lock
from .writer import PointWriter, check_config

_DIRS = ("chunks", "points", "tmp", "locks")


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """A restored flat disk image: where, how many bytes, and the SHA-256 of its content."""

    path: Path
    bytes: int
    sha256: str


class Repository:
    """A backup repository on a local (or mounted) filesystem. Thread-safe; many processes may share it."""

    def __init__(self, path: Path, config: RepoConfig) -> None:
        self.path = path
        self.config = config
        self.scratch = path / "tmp"
        self.points_dir = path / "points"
        self.locks_dir = path / "locks"
        self.chunks = ChunkStore(path / "chunks", self.scratch)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @classmethod
    def init(cls, path: Path | str) -> Repository:
        """Create a repository in `path` (created if absent, or an empty directory). An existing repository is
        opened instead; any other non-empty directory is refused."""
        path = Path(path)
        if (path / "config").exists():
            return cls.open(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RepositoryError(f"{path}: not empty and not a repository; refusing to initialise it")
        try:
            for name in _DIRS:
                (path / name).mkdir(parents=True, exist_ok=True)
            for i in range(256):
                (path / "chunks" / f"{i:02x}").mkdir(exist_ok=True)
            config = RepoConfig(id=secrets.token_hex(16), created=datetime.now(UTC))
            write_atomic(path / "config", dump_record(config), path / "tmp", sync_dir=True)
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot initialise a repository: {one_line(exc)}") from None
        return cls(path, config)

    @classmethod
    def open(cls, path: Path | str) -> Repository:
        """Open an existing repository; one-line `RepositoryError` if it is missing or of an unknown version."""
        path = Path(path)
        if not path.is_dir():
            raise RepositoryError(f"{path}: no such repository")
        config = read_record(path / "config", RepoConfig)
        for name in _DIRS:
            if not (path / name).is_dir():
                raise RepositoryError(f"{path}: not a complete repository (no {name}/)")
        return cls(path, config)

    def lock(self, kind: Kind, purpose: str) -> Lock:
        return Lock.take(self.locks_dir, self.scratch, kind, purpose)

    # -- writing --------------------------------------------------------------------------------------------------

    def begin(self, job_id: str, vm: VmIdentity, config: dict[str, Any],
              started: datetime | None = None) -> PointWriter:
        """Start a restore point of `vm` (its configuration summary in `config`); holds a shared lock until the
        point is committed or aborted."""
        if started is not None and started.tzinfo is None:
            raise RepositoryError("started must be a timezone-aware datetime")
        config = check_config(config)
        lock = self.lock("shared", f"backup {vm.name} ({job_id})")
        return PointWriter(store=self.chunks, points=self.points_dir, scratch=self.scratch, lock=lock,
                           block_size=self.block_size, job_id=job_id, vm=vm, config=config,
                           started=started or datetime.now(UTC))

    # -- reading --------------------------------------------------------------------------------------------------

    def manifest(self, point_id: str) -> Manifest:
        path = self.points_dir / f"{check_point_id(point_id)}.json"
        if not path.exists():
            raise RepositoryError(f"no restore point {point_id} in {self.path}")
        manifest = read_record(path, Manifest)
        if manifest.id != point_id:
            raise RepositoryError(f"{path}: holds restore point {manifest.id}, not {point_id}")
        return manifest

    def point_ids(self) -> list[str]:
        return sorted(p.name.removesuffix(".json") for p in self.points_dir.glob("*.json"))

    def points(self, vm: str | None = None) -> list[Manifest]:
        """Restore points, oldest first, optionally only those of the VM named `vm`."""
        found = [self.manifest(i) for i in self.point_ids()]
        return sorted((m for m in found if vm is None or m.vm.name == vm), key=lambda m: (m.started, m.id))

    def latest(self, vm: str) -> Manifest | None:
        """The VM's most recent restore point, or None."""
        points = self.points(vm)
        return points[-1] if points else None

    def restore(self, point_id: str, disk_index: int, out: Path | str) -> RestoreResult:
        """Write disk `disk_index` of a restore point to `out`, identical to the source disk; every chunk is
        checked against its SHA-256 on the way.

        A regular file, or a path that does not exist, becomes a flat image: streamed block by block into a
        temporary file next to `out`, holes left sparse, renamed onto `out` only when complete. A block device (a
        LUN, a loop device) is written into: no replace, no truncate, holes written as zeros (a device need not
        read zeros where nothing was written), bytes beyond the disk's capacity left as they are; it is refused
        when smaller than the disk or while it is mounted or held open, and a restore that fails part-way leaves it
        partly written. Anything else is refused.
        """
        out = Path(out)
        try:
            mode = out.stat().st_mode  # follows symbolic links, as /dev/disk/by-id/ names are
        except FileNotFoundError:
            mode = stat.S_IFREG
        except OSError as exc:
            raise RepositoryError(f"cannot restore to {out}: {one_line(exc)}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise RepositoryError(f"cannot restore to {out}: neither a regular file nor a block device")
        with self.lock("shared", f"restore {point_id} disk {disk_index}"):
            disk = self.manifest(point_id).disk(disk_index)
            if stat.S_ISBLK(mode):
                try:
                    with open(os.open(out, os.O_WRONLY | os.O_EXCL), "wb") as f:  # O_EXCL: not while mounted
                        size = f.seek(0, os.SEEK_END)
                        if size < disk.capacity:
                            raise RepositoryError(f"cannot restore to {out}: the device holds {size} bytes, "
                                                  f"disk {disk.index} needs {disk.capacity}")
                        f.seek(0)
                        digest = self._write_image(f, point_id, disk, sparse=False)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as exc:
                    raise RepositoryError(f"cannot restore to {out}: {one_line(exc)}") from None
                return RestoreResult(out, disk.capacity, digest)
            tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
            try:
                with open(tmp, "xb") as f:
                    digest = self._write_image(f, point_id, disk)
                    f.truncate(disk.capacity)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, out)
                fsync_dir(out.parent)
            except OSError as exc:
                raise RepositoryError(f"cannot restore to {out}: {one_line(exc)}") from None
            finally:
                remove_quietly(tmp)
        return RestoreResult(out, disk.capacity, digest)

    def _write_image(self, f: BinaryIO, point_id: str, disk: DiskRecord, *, sparse: bool = True) -> str:
        """Write the disk's blocks in order from the current position (holes as seeks when `sparse`, else as
        zeros); return the SHA-256 of the image."""
        digest = hashlib.sha256()
        for block, chunk in enumerate(disk.blocks):
            length = disk.block_length(block)
            if chunk is None:
                hole = zeros(length)
                if sparse:
                    f.seek(length, os.SEEK_CUR)
                else:
                    f.write(hole)
                digest.update(hole)
                continue
            try:
                data = self.chunks.get(chunk, length)
            except RepositoryError as exc:
                raise RepositoryError(f"cannot restore {point_id} disk {disk.index} block {block}: {exc}") from None
            f.write(data)
            digest.update(data)
        return digest.hexdigest()

    # -- maintenance ----------------------------------------------------------------------------------------------

    def verify(self, workers: int = 4) -> VerifyReport:
        """Re-read, decompress and re-hash every referenced chunk; report missing and corrupt ones and what they
        break."""
        return verify(self, workers)

    def prune(self, forget: Collection[str] = ()) -> PruneResult:
        """Under the exclusive lock: delete the restore points in `forget`, every chunk no remaining point
        references, and stale files in `tmp/`."""
        return prune(self, forget)

