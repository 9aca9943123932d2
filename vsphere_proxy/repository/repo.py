"""`Repository`: open or create a repository, write restore points, list them, restore a disk image.

The on-disk format and its rules are in `docs/repository.md`; verify and prune live in `check.py`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from . import lifecycle
from .check import PruneResult, Sample, VerifyReport, prune, verify
from .chunks import ChunkStore
from .crypto import CLEAR, Codec
from .files import fsync_dir, full_error, is_full, remove_quietly, scratch_name, write_atomic
from .format import (
    ENCRYPTED_VERSION,
    POINT_ID,
    BrokenPoint,
    DiskRecord,
    Encryption,
    Manifest,
    RepoConfig,
    RepositoryError,
    VmConfig,
    VmIdentity,
    check_point_id,
    dump_record,
    one_line,
    parse_record,
    read_record,
    zeros,
)
from .keys import DEFAULT_COST, KdfCost, KeyProblem, KeySlot, MasterKey, Secret, make_slot, unlock
from .locks import LOCK_FILE, Kind, Lock, ensure_lock_file, forget_lock
from .writer import PointWriter, check_config

_DIRS = ("chunks", "points", "tmp", "locks")
# What a directory may hold for `init` to make it a repository: what an interrupted (or concurrent) `init` leaves,
# and the `lost+found` of a file system's root.
_INIT_MAY_FIND = frozenset({*_DIRS, "keys", "holds", "config", "lost+found"})
_CONFIG_SETTLE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """A restored flat disk image: where, how many bytes, and the SHA-256 of its content."""

    path: Path
    bytes: int
    sha256: str


class Repository:
    """A backup repository on a local (or mounted) filesystem. Thread-safe; many processes may share it."""

    def __init__(self, path: Path, config: RepoConfig, master: MasterKey | None = None, slot: str = "") -> None:
        """`master`: an encrypted repository's master key (opened with the key slot `slot`)."""
        self.path = path
        self.config = config
        self._master_key = master
        self.codec: Codec = master.codec() if master is not None else CLEAR
        self.slot = slot
        self.scratch = path / "tmp"
        self.points_dir = path / "points"
        self.locks_dir = path / "locks"
        self.holds_dir = path / "holds"
        self.keys_dir = path / "keys"
        self.chunks = ChunkStore(path / "chunks", self.scratch, path, self.codec)

    @property
    def encrypted(self) -> bool:
        return self.config.encrypted

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @classmethod
    def init(cls, path: Path | str, secret: Secret | None = None, *, label: str = "",
             cost: KdfCost = DEFAULT_COST, repo_id: str | None = None) -> Repository:
        """Create a repository in `path` (created if absent, or an empty directory). An existing repository is
        opened instead (with `secret`, if it is encrypted); any other non-empty directory is refused.

        With `secret` (a passphrase or a key file) the repository is encrypted (version 2): a new master key,
        wrapped in a first key slot labelled `label` (argon2id at `cost` for a passphrase). `repo_id` (32 hex
        digits, default random) is the new repository's id, for a key file made for it beforehand.

        Safe to run from many processes (and threads) at once on the same path: all of them end up with the same
        repository (`docs/repository.md`, "Initialisation").
        """
        path = Path(path)
        if (path / "config").exists():
            return cls.open(path, secret)
        if path.exists() and not path.is_dir():
            raise RepositoryError(f"{path}: not a directory; refusing to initialise it")
        try:
            foreign = sorted(set(os.listdir(path)) - _INIT_MAY_FIND) if path.is_dir() else []
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot initialise a repository: {one_line(exc)}") from None
        if foreign:
            raise RepositoryError(f"{path}: not empty and not a repository (holds {foreign[0]!r}); "
                                  "refusing to initialise it")
        try:
            path.mkdir(parents=True, exist_ok=True)
            for name in _DIRS:
                (path / name).mkdir(exist_ok=True)
            for i in range(256):
                (path / "chunks" / f"{i:02x}").mkdir(exist_ok=True)
            problem = ensure_lock_file(path / "locks")
            if problem is not None:
                raise problem
            if repo_id is None and secret is not None and secret.kind == "keyfile" and secret.repository:
                repo_id = secret.repository  # a key file made for this repository by an init that did not finish
            repo_id = repo_id or secrets.token_hex(16)
            master: MasterKey | None = None
            slot: KeySlot | None = None
            if secret is None:
                config = RepoConfig(id=repo_id, created=datetime.now(UTC))
            else:
                master = MasterKey.new()
                config = RepoConfig(version=ENCRYPTED_VERSION, id=repo_id, chunk_hash="hmac-sha256",
                                    created=datetime.now(UTC), encryption=Encryption(key_check=master.check(repo_id)))
                slot = make_slot(repo_id, master, secret, label, cost)
                (path / "keys").mkdir(exist_ok=True)
                write_atomic(path / "keys" / f"{slot.id}.json", dump_record(slot), path / "tmp", sync_dir=True,
                             stem="key-")
            won = _publish_config(path, dump_record(config))
            if not won and slot is not None:
                remove_quietly(path / "keys" / f"{slot.id}.json")  # wraps a master key nobody uses
        except OSError as exc:
            if is_full(exc):
                raise full_error(path) from None
            raise RepositoryError(f"{path}: cannot initialise a repository: {one_line(exc)}") from None
        if won:
            return cls(path, config, master, slot.id if slot else "")
        return cls._open_settled(path, secret)

    @classmethod
    def _open_settled(cls, path: Path, secret: Secret | None) -> Repository:
        """Open a repository another process is initialising: its `config` may be seen before it is whole where it
        is written in place (file systems without hard links)."""
        deadline = time.monotonic() + _CONFIG_SETTLE_SECONDS
        while True:
            try:
                return cls.open(path, secret)
            except KeyProblem:
                raise
            except RepositoryError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @classmethod
    def open(cls, path: Path | str, secret: Secret | None = None) -> Repository:
        """Open an existing repository; one-line `RepositoryError` if it is missing or of an unknown version.
        An encrypted one needs `secret`: `KeyProblem` (`WrongKey`) when it is missing or opens no key slot. A clear
        one ignores `secret`.

        A repository made before the lock file existed gets one, where the file system allows it.
        """
        path = Path(path)
        if not path.is_dir():
            raise RepositoryError(f"{path}: no such repository")
        config = read_record(path / "config", RepoConfig)
        for name in _DIRS:
            if not (path / name).is_dir():
                raise RepositoryError(f"{path}: not a complete repository (no {name}/)")
        if not (path / "locks" / LOCK_FILE).exists():
            ensure_lock_file(path / "locks")  # where it cannot be created, shared locks lock nothing (read-only)
        if not config.encrypted:
            return cls(path, config)
        if secret is None:
            raise KeyProblem(f"{path}: the repository is encrypted: a passphrase or a key file is needed "
                            "(repository.encryption)")
        slots = _read_slots(path / "keys")
        if not slots:
            raise RepositoryError(f"{path}: an encrypted repository without any key slot (keys/ is empty)")
        assert config.encryption is not None
        master, slot = unlock(config.id, slots, secret, config.encryption.key_check)
        return cls(path, config, master, slot)

    # -- keys -----------------------------------------------------------------------------------------------------

    def key_slots(self) -> list[KeySlot]:
        """The key slots of an encrypted repository, oldest first (none for a clear one)."""
        return sorted(_read_slots(self.keys_dir), key=lambda s: (s.created, s.id)) if self.encrypted else []

    def add_key(self, secret: Secret, label: str = "", cost: KdfCost = DEFAULT_COST) -> KeySlot:
        """A new key slot wrapping this repository's master key under `secret` (a passphrase or a key file)."""
        master = self._master()
        try:
            slot = make_slot(self.config.id, master, secret, label, cost)
        except ValueError as exc:
            raise RepositoryError(f"--label: {one_line(exc)}") from None
        with forget_lock(self.locks_dir, "key add"):
            write_atomic(self.keys_dir / f"{slot.id}.json", dump_record(slot), self.scratch, sync_dir=True,
                         stem="key-", repository=self.path)
        return slot

    def remove_key(self, slot_id: str) -> None:
        """Remove a key slot: never the last one, nor the one this repository was opened with."""
        self._master()
        with forget_lock(self.locks_dir, "key remove"):
            slots = {s.id: s for s in self.key_slots()}
            if slot_id not in slots:
                raise KeyProblem(f"no key slot {slot_id!r} in {self.path}")
            if slot_id == self.slot:
                raise KeyProblem(f"key slot {slot_id} is the one this command opened the repository with; open it "
                                "with another passphrase or key file to remove this one")
            if len(slots) == 1:
                raise KeyProblem(f"key slot {slot_id} is the repository's last one; refusing to remove it")
            (self.keys_dir / f"{slot_id}.json").unlink()
            fsync_dir(self.keys_dir)

    def _master(self) -> MasterKey:
        if not self.encrypted:
            raise KeyProblem(f"{self.path}: the repository is not encrypted; it has no keys")
        master = self._master_key
        if master is None:
            raise KeyProblem(f"{self.path}: opened without its key")
        return master

    # -- holds and forgetting -------------------------------------------------------------------------------------

    def holds(self) -> dict[str, lifecycle.HoldState]:
        return lifecycle.holds(self)

    def protect(self, point_id: str, until: datetime | None = None, reason: str = "") -> lifecycle.Hold:
        return lifecycle.protect(self, point_id, until, reason)

    def unprotect(self, point_id: str) -> bool:
        return lifecycle.unprotect(self, point_id)

    def forget(self, point_ids: Collection[str]) -> list[str]:
        """Delete these restore points' manifests (never a held one's); their chunks stay until `prune`."""
        return lifecycle.forget(self, list(point_ids))

    def lock(self, kind: Kind, purpose: str) -> Lock:
        """Take a shared or the exclusive lock, or fail at once with `RepositoryLocked` naming the holder."""
        return Lock.take(self.locks_dir, kind, purpose)

    # -- writing --------------------------------------------------------------------------------------------------

    def begin(self, job_id: str, vm: VmIdentity, config: dict[str, Any], started: datetime | None = None, *,
              vm_config: VmConfig | None = None, nvram: bytes | None = None) -> PointWriter:
        """Start a restore point of `vm` (its configuration summary in `config`); holds a shared lock until the
        point is committed or aborted.

        With `vm_config` (what recreating the VM needs) the point is a version-2 manifest, and `nvram` (the VM's
        NVRAM file) is stored at once as a chunk and named in `vm_config.nvram`; without, a version-1 manifest.
        """
        if started is not None and started.tzinfo is None:
            raise RepositoryError("started must be a timezone-aware datetime")
        config = check_config(config)
        if nvram is not None and vm_config is None:
            raise RepositoryError("an NVRAM file needs the VM's configuration (vm_config)")
        if vm_config is not None and vm_config.nvram is not None and nvram is None:
            raise RepositoryError("vm_config.nvram names an NVRAM chunk, but no NVRAM file was given to store")
        lock = self.lock("shared", f"backup {vm.name} ({job_id})")
        point = PointWriter(store=self.chunks, points=self.points_dir, scratch=self.scratch, lock=lock,
                            block_size=self.block_size, job_id=job_id, vm=vm, config=config,
                            started=started or datetime.now(UTC), vm_config=vm_config)
        if nvram is not None:
            try:
                point.store_nvram(nvram)
            except BaseException:
                point.abort()
                raise
        return point

    # -- reading --------------------------------------------------------------------------------------------------

    def manifest(self, point_id: str) -> Manifest:
        """The restore point's manifest; a one-line `RepositoryError` if there is none, or naming the point and the
        damage if it is broken."""
        path = self.points_dir / f"{check_point_id(point_id)}.json"
        if not path.exists():
            raise RepositoryError(f"no restore point {point_id} in {self.path}")
        try:
            return self._read_manifest(point_id)
        except _Gone:
            raise RepositoryError(f"no restore point {point_id} in {self.path}") from None
        except RepositoryError as exc:
            raise RepositoryError(f"restore point {point_id} is broken: {exc}") from None

    def _read_manifest(self, point_id: str) -> Manifest:
        path = self.points_dir / f"{point_id}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise _Gone(point_id) from None
        except OSError as exc:
            raise RepositoryError(f"{path}: unreadable: {one_line(exc)}") from None
        try:
            manifest = parse_record(self.codec.open_record("point", point_id, raw), Manifest, path)
        except RepositoryError as exc:
            if not path.exists():
                raise _Gone(point_id) from None
            if str(exc).startswith(str(path)):
                raise
            raise RepositoryError(f"{path}: {exc}") from None
        if manifest.id != point_id:
            raise RepositoryError(f"{path}: holds restore point {manifest.id}, not {point_id}")
        return manifest

    def point_ids(self) -> list[str]:
        """The ids of every manifest file, readable or not."""
        return sorted(p.name.removesuffix(".json") for p in self.points_dir.glob("*.json"))

    def scan(self) -> tuple[list[Manifest], list[BrokenPoint]]:
        """Every readable restore point (oldest first) and every broken one (by id), read once."""
        found: list[Manifest] = []
        broken: list[BrokenPoint] = []
        for point_id in self.point_ids():
            if not POINT_ID.match(point_id):
                broken.append(BrokenPoint(point_id, f"{point_id}.json: not a restore point id"))
                continue
            try:
                found.append(self._read_manifest(point_id))
            except _Gone:
                continue  # pruned while we looked
            except RepositoryError as exc:
                broken.append(BrokenPoint(point_id, str(exc).removeprefix(f"{self.points_dir / point_id}.json: ")))
        return sorted(found, key=lambda m: (m.started, m.id)), broken

    def points(self, vm: str | None = None) -> list[Manifest]:
        """Restore points, oldest first, optionally only those of the VM named `vm`. Broken points (manifests that
        cannot be read) are left out: `broken_points` lists them."""
        found, _ = self.scan()
        return [m for m in found if vm is None or m.vm.name == vm]

    def broken_points(self) -> list[BrokenPoint]:
        """Every manifest that cannot be used, as (point id, reason), by id. Whose VM it was is not reliably known."""
        return self.scan()[1]

    def latest(self, vm: str) -> Manifest | None:
        """The VM's most recent readable restore point, or None."""
        points = self.points(vm)
        return points[-1] if points else None

    def nvram(self, point_id: str) -> bytes | None:
        """The NVRAM file a restore point saved, checked like any chunk (a corrupt one is quarantined and the error
        names the point); None when the point saved none (a version-1 point, or the file could not be read)."""
        with self.lock("shared", f"read the NVRAM of {point_id}"):
            record = self.manifest(point_id).nvram
            if record is None:
                return None
            try:
                return self.chunks.get(record.chunk, record.size)
            except RepositoryError as exc:
                raise RepositoryError(f"cannot read the NVRAM of restore point {point_id}: {exc}") from None

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

    def stream(self, point_id: str, disk_index: int, out: BinaryIO) -> RestoreResult:
        """Write disk `disk_index` of a restore point to `out` as a raw image from its first byte to its last
        (holes as zeros), in order, without seeking: a pipe (`restore disk --to -`). Every chunk is checked on the
        way; a damaged one ends the stream short, with the error."""
        with self.lock("shared", f"stream {point_id} disk {disk_index}"):
            disk = self.manifest(point_id).disk(disk_index)
            digest = self._write_image(out, point_id, disk, sparse=False)
            out.flush()
        return RestoreResult(Path("-"), disk.capacity, digest)

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
                data = self.chunks.get(chunk, length)  # a corrupt chunk is quarantined on the way
            except RepositoryError as exc:
                raise RepositoryError(f"cannot restore {point_id} disk {disk.index} block {block}: {exc}") from None
            f.write(data)
            digest.update(data)
        return digest.hexdigest()

    # -- maintenance ----------------------------------------------------------------------------------------------

    def verify(self, workers: int = 4, sample: Sample | None = None) -> VerifyReport:
        """Re-read, decompress and re-hash every referenced chunk (or, with `sample`, a seeded random subset of
        them); quarantine corrupt ones; report missing and corrupt chunks and what they break, and the broken
        points."""
        return verify(self, workers, sample)

    def prune(self, forget: Collection[str] = (), *, dry_run: bool = False) -> PruneResult:
        """Under the exclusive lock: delete the restore points in `forget` (broken ones included), every chunk no
        remaining point references, the quarantined chunk files no longer needed, and stale files in `tmp/`.
        Refused while a remaining point is broken. With `dry_run`, what it would delete, under a shared lock."""
        return prune(self, forget, dry_run=dry_run)


def _read_slots(keys: Path) -> list[KeySlot]:
    """Every readable key slot in `keys/` (an unreadable slot file is skipped: another slot may open)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(keys.glob("*.json")):
            try:
                slot = read_record(path, KeySlot)
            except RepositoryError:
                continue
            if slot.id == path.name.removesuffix(".json"):
                found.append(slot)
    return found


class _Gone(RepositoryError):
    """A manifest that was listed and is no longer there (pruned meanwhile)."""


def _publish_config(path: Path, record: bytes) -> bool:
    """Make `path/config` hold `record` unless a concurrent `init` got there first; True if ours won.

    The record is written whole to `tmp/` and hard-linked into place, which fails if `config` exists; on a file
    system without hard links it is created with O_EXCL and written in place.
    """
    tmp = scratch_name(path / "tmp", "config-")
    try:
        with open(tmp, "xb") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path / "config")
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                fd = os.open(path / "config", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with open(fd, "wb") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
    finally:
        remove_quietly(tmp)
    fsync_dir(path)
    return True
