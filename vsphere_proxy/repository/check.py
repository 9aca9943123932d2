"""`verify` (re-read and re-hash every referenced chunk) and `prune` (delete what nothing references).

Both follow `docs/repository.md`: verify holds a shared lock, prune the exclusive one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .chunks import ChunkCorrupt, ChunkMissing
from .files import fsync_dir, remove_quietly
from .format import Manifest, RepositoryError, check_point_id, one_line

if TYPE_CHECKING:
    from .repo import Repository


@dataclass(frozen=True, slots=True, order=True)
class DiskRef:
    """One disk of one restore point."""

    point: str
    disk: int

    def __str__(self) -> str:
        return f"{self.point} disk {self.disk}"


@dataclass(frozen=True, slots=True)
class ChunkProblem:
    """A referenced chunk that is missing or corrupt, and every disk of every restore point it breaks."""

    chunk: str
    kind: Literal["missing", "corrupt"]
    detail: str
    used_by: tuple[DiskRef, ...]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    points: int
    chunks: int  # distinct chunks checked
    problems: tuple[ChunkProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(p.chunk for p in self.problems if p.kind == "missing")

    @property
    def corrupt(self) -> tuple[str, ...]:
        return tuple(p.chunk for p in self.problems if p.kind == "corrupt")

    @property
    def broken(self) -> dict[str, tuple[int, ...]]:
        """Restore point id -> the indexes of its disks that cannot be restored."""
        disks: dict[str, set[int]] = defaultdict(set)
        for problem in self.problems:
            for ref in problem.used_by:
                disks[ref.point].add(ref.disk)
        return {point: tuple(sorted(d)) for point, d in sorted(disks.items())}

    def summary(self) -> str:
        if self.ok:
            return f"{self.points} restore points, {self.chunks} chunks: no errors"
        return (f"{self.points} restore points, {self.chunks} chunks: {len(self.missing)} missing, "
                f"{len(self.corrupt)} corrupt; restore points broken: {', '.join(self.broken)}")


@dataclass(frozen=True, slots=True)
class PruneResult:
    points_removed: int
    chunks_removed: int
    bytes_removed: int
    chunks_kept: int
    tmp_removed: int


def verify(repo: Repository, workers: int = 4) -> VerifyReport:
    """Read every chunk referenced by any restore point once, decompress it and check its SHA-256."""
    with repo.lock("shared", "verify"):
        manifests = repo.points()
        users = _references(manifests)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            outcomes = list(pool.map(lambda chunk: _check(repo, chunk, users[chunk][0]), users))
    problems = tuple(
        ChunkProblem(chunk, kind, detail, tuple(sorted(users[chunk][1])))
        for chunk, (kind, detail) in zip(users, outcomes, strict=True)
        if kind is not None
    )
    return VerifyReport(points=len(manifests), chunks=len(users), problems=problems)


def prune(repo: Repository, forget: Collection[str] = ()) -> PruneResult:
    """Delete the restore points in `forget`, then every chunk no remaining point references, then `tmp/`."""
    forget = sorted(set(forget))
    with repo.lock("exclusive", "prune"):
        for point_id in forget:
            repo.manifest(point_id)  # refuse unknown ids before deleting anything
        for point_id in forget:
            (repo.points_dir / f"{check_point_id(point_id)}.json").unlink()
        if forget:
            fsync_dir(repo.points_dir)
        live = set().union(*(m.chunks() for m in repo.points()))
        removed = removed_bytes = kept = 0
        for chunk, path in repo.chunks.walk():
            if chunk in live:
                kept += 1
                continue
            try:
                removed_bytes += path.stat().st_size
                path.unlink()
            except OSError as exc:
                raise RepositoryError(f"prune: cannot remove {path}: {one_line(exc)}") from None
            removed += 1
        tmp = 0
        with os.scandir(repo.scratch) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    remove_quietly(repo.scratch / entry.name)
                    tmp += 1
    return PruneResult(points_removed=len(forget), chunks_removed=removed, bytes_removed=removed_bytes,
                       chunks_kept=kept, tmp_removed=tmp)


def _references(manifests: list[Manifest]) -> dict[str, tuple[int, set[DiskRef]]]:
    """Chunk id -> (its length, the disks using it)."""
    users: dict[str, tuple[int, set[DiskRef]]] = {}
    for m in manifests:
        for disk in m.disks:
            for block, chunk in enumerate(disk.blocks):
                if chunk is not None:
                    users.setdefault(chunk, (disk.block_length(block), set()))[1].add(DiskRef(m.id, disk.index))
    return users


def _check(repo: Repository, chunk: str, length: int) -> tuple[Literal["missing", "corrupt"] | None, str]:
    try:
        repo.chunks.get(chunk, length)
    except ChunkMissing as exc:
        return "missing", str(exc)
    except ChunkCorrupt as exc:
        return "corrupt", str(exc)
    except OSError as exc:
        return "corrupt", f"chunk {chunk} is unreadable: {one_line(exc)}"
    return None, ""
