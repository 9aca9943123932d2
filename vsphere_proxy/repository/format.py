"""The repository's on-disk records, as `docs/repository.md` specifies them: `config`, manifests (versions 1 and
2), disk entries, and the VM configuration a version-2 manifest holds.

Everything here is plain data plus the one place that reads a JSON record from disk (`read_record`), which checks
the `version` before anything else so readers abort on a format they do not know.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from vsphere_proxy.faults import JobFault
from vsphere_proxy.model import VM

FORMAT_VERSION = 1  # of `config`: the layout and chunk format, in clear
ENCRYPTED_VERSION = 2  # of `config`: the same, encrypted at rest
MANIFEST_VERSION = 2  # what writers write when they hold the VM's configuration
BLOCK_SIZE = 4 * 1024 * 1024
CHUNK_HASH = "sha256"
COMPRESSION = "zstd"
ZSTD_LEVEL = 3

ChunkId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
PointId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
POINT_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class RepositoryError(ValueError):
    """Anything wrong with a repository or a request to it; the message is one line."""


class RepositoryLocked(RepositoryError):
    """Another process holds a lock that conflicts with the one asked for (the message names the holder)."""


class RepositoryFull(RepositoryError, JobFault):
    """The repository's file system has no room left: "repository full: N bytes free on /path". It ends the job:
    no other VM could be written either."""


class BaseDamaged(RepositoryError):
    """The base restore point given for a disk lost chunks (quarantined or missing): keeping its blocks would make
    the new point broken too, so the disk must be written in full (which stores the lost chunks again)."""


class BrokenPoint(NamedTuple):
    """A manifest that cannot be used: its restore point id (the file name) and what is wrong with it."""

    id: str
    reason: str


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    versions: ClassVar[tuple[int, ...]] = ()  # the `version`s a reader of this record knows (records read alone)


R = TypeVar("R", bound=_Record)


class VmIdentity(_Record):
    """Who the restore point belongs to, as vCenter names it."""

    name: str = Field(min_length=1)
    moref: str = ""
    uuid: str = ""
    instance_uuid: str = ""

    @classmethod
    def of(cls, vm: VM) -> VmIdentity:
        return cls(name=vm.name, moref=vm.moref, uuid=vm.uuid, instance_uuid=vm.instance_uuid)

    def same_vm(self, other: VmIdentity) -> bool:
        """True if both name the same VM: by instance UUID when both know it, else by name."""
        if self.instance_uuid and other.instance_uuid:
            return self.instance_uuid == other.instance_uuid
        return self.name == other.name


class DiskStats(_Record):
    """What writing one disk cost; see `docs/repository.md`, "Manifests"."""

    bytes_in: int = 0
    new_chunks: int = 0
    new_bytes_stored: int = 0
    dedup_chunks: int = 0
    zero_blocks: int = 0
    kept_blocks: int = 0


class DiskRecord(_Record):
    """One disk of a restore point; `blocks` is its fixed index (chunk id, or None for a hole)."""

    index: int = Field(ge=0)
    label: str
    capacity: int = Field(ge=0)
    block_size: int = Field(gt=0)
    change_id: str | None = None
    blocks: tuple[ChunkId | None, ...]
    stats: DiskStats = DiskStats()

    @model_validator(mode="after")
    def _blocks_cover_capacity(self) -> DiskRecord:
        if len(self.blocks) != block_count(self.capacity, self.block_size):
            raise ValueError(f"disk {self.index} has {len(self.blocks)} blocks for {self.capacity} bytes")
        return self

    def block_length(self, block: int) -> int:
        return block_length(self.capacity, self.block_size, block)


class TagRecord(_Record):
    """A vSphere tag of the VM."""

    category: str
    name: str


class NicRecord(_Record):
    """One network adapter of the VM and the network it is on; see `docs/repository.md`, "Manifest version 2"."""

    key: int
    label: str
    device_type: str  # vmxnet3 | e1000e | e1000 | vmxnet2 | pcnet32 | sriov
    network: str  # the network's name
    network_moref: str = ""
    network_kind: str = ""  # standard | distributed | opaque
    portgroup_key: str = ""  # distributed port groups only
    switch_uuid: str = ""  # distributed port groups only
    mac: str = ""
    mac_type: str = ""  # assigned | manual | generated
    start_connected: bool = True


class DiskLayout(_Record):
    """One virtual disk of the VM as its configuration places it, backed up or not."""

    index: int | None = Field(ge=0)  # the DiskRecord index of a backed-up disk, None for a disk not backed up
    key: int
    label: str
    controller_key: int
    controller: str  # pvscsi | lsilogic | lsilogic-sas | buslogic | nvme | sata | ide
    bus: int
    unit: int
    capacity: int = Field(ge=0)
    file: str  # "[datastore] vm/vm.vmdk"
    datastore: str
    provisioning: str  # thin | thick-lazy | thick-eager
    disk_mode: str = "persistent"
    sharing: str = ""


class NvramRecord(_Record):
    """The VM's NVRAM file, stored as one chunk of the chunk store."""

    chunk: ChunkId
    size: int = Field(ge=0)  # bytes: the chunk's decompressed length
    file: str  # where it was, "[datastore] vm/vm.nvram"


class VmConfig(_Record):
    """What recreating the VM in vCenter needs, read at the snapshot; see `docs/repository.md`, "Manifest version
    2". What could not be read is left empty and named in `notes`."""

    config_info: dict[str, Any]  # the snapshot's vim.vm.ConfigInfo as pyVmomi's VmomiJSONEncoder writes it
    hardware_version: str = ""
    firmware: str = ""
    guest_id: str = ""
    cpus: int = 0
    cores_per_socket: int = 0
    memory_mb: int = 0
    host: str = ""
    cluster: str | None = None
    folder: str = ""  # path below the datacenter's VM folder
    resource_pool: str = ""  # path below the host folder ("Prod/Resources"), or the pool's name
    resource_pool_moref: str = ""
    datastore: str = ""  # the VM's home (vmx) datastore
    nics: tuple[NicRecord, ...] = ()
    disks: tuple[DiskLayout, ...] = ()
    tags: tuple[TagRecord, ...] = ()
    custom_attributes: dict[str, str] = {}
    nvram: NvramRecord | None = None
    notes: tuple[str, ...] = ()  # what could not be saved, one line each ("nvram not saved: ...")

    @model_validator(mode="after")
    def _layout_indexes_unique(self) -> VmConfig:
        indexes = [d.index for d in self.disks if d.index is not None]
        if len(indexes) != len(set(indexes)):
            raise ValueError("disk layout indexes must be unique")
        return self


class Manifest(_Record):
    """One restore point: a VM, its configuration summary, every block of its disks, and (version 2) what
    recreating the VM needs."""

    versions: ClassVar[tuple[int, ...]] = (1, 2)

    version: Literal[1, 2] = MANIFEST_VERSION
    id: PointId
    job_id: str
    vm: VmIdentity
    config: dict[str, Any]
    started: AwareDatetime
    ended: AwareDatetime
    disks: tuple[DiskRecord, ...]
    vm_config: VmConfig | None = None

    @model_validator(mode="after")
    def _disks_unique(self) -> Manifest:
        indexes = [d.index for d in self.disks]
        if indexes != sorted(set(indexes)):
            raise ValueError("disk indexes must be unique and sorted")
        return self

    @model_validator(mode="after")
    def _vm_config_matches_version(self) -> Manifest:
        if self.version >= 2 and self.vm_config is None:
            raise ValueError(f"a version {self.version} manifest must hold vm_config")
        if self.version == 1 and self.vm_config is not None:
            raise ValueError("a version 1 manifest holds no vm_config")
        return self

    def disk(self, index: int) -> DiskRecord:
        for d in self.disks:
            if d.index == index:
                return d
        raise RepositoryError(f"restore point {self.id} has no disk {index}")

    @property
    def nvram(self) -> NvramRecord | None:
        """The saved NVRAM file, if the point has one."""
        return self.vm_config.nvram if self.vm_config is not None else None

    def chunks(self) -> set[str]:
        """Every chunk the point references: its disks' blocks and its NVRAM chunk."""
        found = {c for d in self.disks for c in d.blocks if c is not None}
        if self.nvram is not None:
            found.add(self.nvram.chunk)
        return found


class Encryption(_Record):
    """`config.encryption` of a version-2 repository."""

    cipher: Literal["aes-256-gcm"] = "aes-256-gcm"
    key_size: Literal[64] = 64
    key_check: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]  # names the master key


class RepoConfig(_Record):
    """The repository's `config` file: version 1 in clear, version 2 encrypted."""

    versions: ClassVar[tuple[int, ...]] = (FORMAT_VERSION, ENCRYPTED_VERSION)

    version: Literal[1, 2] = FORMAT_VERSION
    id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    block_size: Literal[4194304] = BLOCK_SIZE
    chunk_hash: Literal["sha256", "hmac-sha256"] = CHUNK_HASH
    compression: Literal["zstd"] = COMPRESSION
    created: AwareDatetime
    encryption: Encryption | None = None

    @model_validator(mode="after")
    def _version_matches(self) -> RepoConfig:
        if self.version == ENCRYPTED_VERSION and (self.encryption is None or self.chunk_hash != "hmac-sha256"):
            raise ValueError("a version 2 repository names its chunks with hmac-sha256 and holds `encryption`")
        if self.version == FORMAT_VERSION and (self.encryption is not None or self.chunk_hash != CHUNK_HASH):
            raise ValueError("a version 1 repository names its chunks with sha256 and holds no `encryption`")
        return self

    @property
    def encrypted(self) -> bool:
        return self.version == ENCRYPTED_VERSION


def block_count(capacity: int, block_size: int) -> int:
    return -(-capacity // block_size)


def block_length(capacity: int, block_size: int, block: int) -> int:
    """Length of block `block` of a disk: `block_size`, except for a short last block."""
    return min(block_size, capacity - block * block_size)


@functools.lru_cache(maxsize=8)
def zeros(n: int) -> bytes:
    """`n` zero bytes, shared (the block size and a few short last-block sizes are all that is ever asked)."""
    return bytes(n)


def check_point_id(point_id: str) -> str:
    if not POINT_ID.match(point_id):
        raise RepositoryError(f"invalid restore point id {point_id!r}")
    return point_id


def read_record(path: Path, kind: type[R]) -> R:
    """Read a `config` or manifest file; one-line `RepositoryError` on an unknown version or a malformed record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(f"{path}: no such file") from None
    except OSError as exc:
        raise RepositoryError(f"{path}: unreadable: {one_line(exc)}") from None
    return parse_record(data, kind, path)


def parse_record(data: bytes, kind: type[R], path: Path) -> R:
    """A record from its JSON bytes (read from `path`, named in errors), checked as `read_record` checks it."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise RepositoryError(f"{path}: unreadable: {one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise RepositoryError(f"{path}: not a JSON object")
    version = raw.get("version")
    if version not in kind.versions or isinstance(version, bool):
        known = ", ".join(map(str, kind.versions))
        raise RepositoryError(f"{path}: unsupported format version {version!r} (this build reads "
                              f"version{'s' if len(kind.versions) > 1 else ''} {known})")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise RepositoryError(f"{path}: invalid {where}: {message}") from None


def dump_record(record: _Record) -> bytes:
    return record.model_dump_json(indent=1).encode() + b"\n"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
