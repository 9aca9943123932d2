"""The backup repository (the media agent's storage): fixed 4 MiB chunks named by SHA-256, zstd, holes for zero
blocks, deduplication across disks, VMs and restore points, atomic writes, one manifest per restore point.

The format is specified in `docs/repository.md`; this package implements it on a local filesystem and does no
vSphere I/O. Typical use::

    repo = Repository.open(path)
    with repo.begin(job_id, VmIdentity.of(vm), {"cpus": vm.cpus}, vm_config=config, nvram=nvram) as point:
        disk = point.disk(0, "Hard disk 1", capacity, base=repo.latest(vm.name), change_id=change_id)
        disk.write(offset, block)          # or disk.keep(block_index) for an area CBT reports unchanged
        manifest = point.commit()
    repo.restore(manifest.id, 0, Path("disk0.img"))
    repo.nvram(manifest.id)                # the NVRAM file a version-2 point saved, or None

An encrypted repository (`Repository.init(path, secret)`, then `Repository.open(path, secret)` with a passphrase or
key file `Secret`) names chunks by a keyed HMAC and seals chunks, manifests and holds with AES-256-GCM.
"""

from .check import ChunkProblem, DiskRef, PruneResult, QuarantinedChunk, Sample, VerifyReport
from .format import (
    BLOCK_SIZE,
    BaseDamaged,
    BrokenPoint,
    DiskLayout,
    DiskRecord,
    DiskStats,
    Manifest,
    NicRecord,
    NvramRecord,
    RepositoryError,
    RepositoryFull,
    RepositoryLocked,
    TagRecord,
    VmConfig,
    VmIdentity,
)
from .keys import (
    KdfCost,
    KeyProblem,
    KeySlot,
    Secret,
    WrongKey,
    new_key_file,
    passphrase_from_env,
    passphrase_from_file,
    read_key_file,
)
from .lifecycle import Hold, HoldState, PointHeld
from .repo import Repository, RestoreResult
from .writer import DiskWriter, PointWriter

__all__ = [
    "BLOCK_SIZE",
    "BaseDamaged",
    "BrokenPoint",
    "ChunkProblem",
    "DiskLayout",
    "DiskRecord",
    "DiskRef",
    "DiskStats",
    "DiskWriter",
    "Hold",
    "HoldState",
    "KdfCost",
    "KeyProblem",
    "KeySlot",
    "Manifest",
    "NicRecord",
    "NvramRecord",
    "PointHeld",
    "PointWriter",
    "PruneResult",
    "QuarantinedChunk",
    "Repository",
    "RepositoryError",
    "RepositoryFull",
    "RepositoryLocked",
    "RestoreResult",
    "Sample",
    "Secret",
    "TagRecord",
    "VerifyReport",
    "VmConfig",
    "VmIdentity",
    "WrongKey",
    "new_key_file",
    "passphrase_from_env",
    "passphrase_from_file",
    "read_key_file",
]
