"""`verify` (re-read and re-hash every referenced chunk, quarantine the corrupt ones) and `prune` (delete what
nothing references).

Both follow `docs/repository.md`: verify holds a shared lock, prune the exclusive one.
"""

from __future__ import annotations

import os
import random
import secrets
from collections import defaultdict
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .chunks import ChunkCorrupt, ChunkMissing, ChunkUnreadable
from .files import fsync_dir, remove_quietly
from .format import BrokenPoint, Manifest, RepositoryError, check_point_id, one_line
from .lifecycle import PointHeld

if TYPE_CHECKING:
    from .repo import Repository


@dataclass(frozen=True, slots=True, order=True)
class DiskRef:
    """One disk of one restore point or, with `nvram` (and `disk` -1), the point's saved NVRAM file."""

    point: str
    disk: int
    nvram: bool = False

    @classmethod
    def nvram_of(cls, point: str) -> DiskRef:
        return cls(point, -1, nvram=True)

    def __str__(self) -> str:
        return f"{self.point} nvram" if self.nvram else f"{self.point} disk {self.disk}"


@dataclass(frozen=True, slots=True)
class ChunkProblem:
    """A referenced chunk that is missing or corrupt, and every disk (or NVRAM file) of every restore point it
    breaks.

    A corrupt chunk is quarantined by the verify that finds it (`quarantined`: where, relative to the repository;
    "" if it could not be moved); from then on it is missing until a backup writes the same bytes again."""

    chunk: str
    kind: Literal["missing", "corrupt"]
    detail: str
    used_by: tuple[DiskRef, ...]
    quarantined: str = ""


@dataclass(frozen=True, slots=True)
class QuarantinedChunk:
    """A quarantined chunk file (relative to the repository), and whether its chunk has been written again."""

    chunk: str
    path: str
    rewritten: bool


@dataclass(frozen=True, slots=True)
class Sample:
    """Which part of the referenced chunks a verify checks: `percent` of them, or `count` of them (the first
    set wins), drawn at random with `seed` (a fresh random seed when None; the report says which was used)."""

    percent: float | None = None
    count: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise RepositoryError("a sample is a percentage or a count of chunks")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise RepositoryError(f"sample: must be more than 0% and at most 100% (got {self.percent:g}%)")
        if self.count is not None and self.count < 1:
            raise RepositoryError(f"sample: must be at least 1 chunk (got {self.count})")

    def size(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        return min(total, max(1, round(total * (self.percent or 0) / 100))) if total else 0

    def describe(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count} chunks"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    points: int  # readable restore points checked
    chunks: int  # distinct chunks checked
    problems: tuple[ChunkProblem, ...]
    broken_points: tuple[BrokenPoint, ...] = ()  # manifests that cannot be read, with the reason
    quarantine: tuple[QuarantinedChunk, ...] = ()  # every quarantined chunk file, after this run
    vms: dict[str, str] = field(default_factory=dict)  # restore point id -> VM name, for the points in `broken`
    referenced: int = 0  # distinct chunks the readable points reference (all of them checked unless sampled)
    sample: Sample | None = None  # the sample checked, with the seed used; None: every referenced chunk

    @property
    def ok(self) -> bool:
        return not self.problems and not self.broken_points

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(p.chunk for p in self.problems if p.kind == "missing")

    @property
    def corrupt(self) -> tuple[str, ...]:
        return tuple(p.chunk for p in self.problems if p.kind == "corrupt")

    @property
    def broken(self) -> dict[str, tuple[int, ...]]:
        """Restore point id -> the indexes of its disks that cannot be restored (readable points only)."""
        disks: dict[str, set[int]] = defaultdict(set)
        for problem in self.problems:
            for ref in problem.used_by:
                if not ref.nvram:
                    disks[ref.point].add(ref.disk)
        return {point: tuple(sorted(d)) for point, d in sorted(disks.items())}

    @property
    def nvram(self) -> tuple[str, ...]:
        """The restore points whose saved NVRAM file is missing or corrupt (their VM cannot be recreated as it was),
        by id."""
        return tuple(sorted({r.point for p in self.problems for r in p.used_by if r.nvram}))

    @property
    def damaged(self) -> tuple[str, ...]:
        """Every restore point that cannot be restored in full: those with missing or corrupt chunks (a block or
        the NVRAM file) and the broken ones, by id."""
        return tuple(sorted({*self.broken, *self.nvram, *(b.id for b in self.broken_points)}))

    def summary(self) -> str:
        checked = f"{self.points} restore points, {self.chunks} chunks"
        if self.sample is not None:
            checked += f" (a sample of {self.sample.describe()} of {self.referenced}, seed {self.sample.seed})"
        if self.ok:
            return f"{checked}: no errors"
        parts = []
        if self.problems:
            hit = sorted({*self.broken, *self.nvram})
            parts.append(f"{len(self.missing)} missing, {len(self.corrupt)} corrupt; "
                         f"restore points broken: {', '.join(hit)}")
        if self.broken_points:
            parts.append(f"{len(self.broken_points)} unreadable manifest(s): "
                         f"{', '.join(b.id for b in self.broken_points)}")
        return f"{checked}: " + "; ".join(parts)


@dataclass(frozen=True, slots=True)
class PruneResult:
    points_removed: int
    chunks_removed: int
    bytes_removed: int
    chunks_kept: int
    tmp_removed: int
    quarantine_removed: int = 0


def verify(repo: Repository, workers: int = 4, sample: Sample | None = None) -> VerifyReport:
    """Read every chunk referenced by any readable restore point once (or a seeded random `sample` of them),
    decompress it and check it (authenticate it, in an encrypted repository) against its id; quarantine the corrupt
    ones; report them, the missing ones and the broken points."""
    with repo.lock("shared", "verify"):
        manifests, broken_points = repo.scan()
        users = _references(manifests)
        referenced = len(users)
        if sample is not None:
            seed = sample.seed if sample.seed is not None else secrets.randbits(32)
            sample = Sample(sample.percent, sample.count, seed)
            chosen = random.Random(seed).sample(sorted(users), sample.size(referenced))
            users = {chunk: users[chunk] for chunk in sorted(chosen)}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            outcomes = list(pool.map(lambda chunk: _check(repo, chunk, users[chunk][0]), users))
        quarantine = tuple(QuarantinedChunk(q.chunk, str(q.path.relative_to(repo.path)), q.rewritten)
                           for q in repo.chunks.quarantined())
    problems = tuple(
        ChunkProblem(chunk, kind, detail, tuple(sorted(users[chunk][1])), moved)
        for chunk, (kind, detail, moved) in zip(users, outcomes, strict=True)
        if kind is not None
    )
    hit = {ref.point for p in problems for ref in p.used_by}
    return VerifyReport(points=len(manifests), chunks=len(users), problems=problems,
                        broken_points=tuple(broken_points), quarantine=quarantine,
                        vms={m.id: m.vm.name for m in manifests if m.id in hit}, referenced=referenced,
                        sample=sample)


def prune(repo: Repository, forget: Collection[str] = (), *, dry_run: bool = False) -> PruneResult:
    """Delete the restore points in `forget` (broken ones included), then every chunk no remaining point references
    and the quarantined files no longer needed, then `tmp/`. Refused while a remaining point is broken: its
    references are unknown. With `dry_run`, count what would be deleted, under a shared lock, deleting nothing."""
    forget = sorted(set(forget))
    with repo.lock("shared" if dry_run else "exclusive", "prune"):
        for point_id in forget:  # refuse unknown ids before deleting anything
            if not (repo.points_dir / f"{check_point_id(point_id)}.json").exists():
                raise RepositoryError(f"no restore point {point_id} in {repo.path}")
        held = repo.holds()
        refused = [p for p in forget if p in held and held[p].protects()]
        if refused:
            raise PointHeld(f"restore point {refused[0]} is held ({held[refused[0]].describe()}); nothing was "
                            "forgotten or pruned: unprotect it first")
        for point_id in [] if dry_run else forget:
            (repo.points_dir / f"{point_id}.json").unlink()
        if forget and not dry_run:
            fsync_dir(repo.points_dir)
        manifests, broken = repo.scan()
        manifests = [m for m in manifests if m.id not in forget]
        broken = [b for b in broken if b.id not in forget]
        if broken:
            first = broken[0]
            more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
            raise RepositoryError(f"prune: restore point {first.id} is broken ({first.reason}){more}; its chunks "
                                  "are unknown, so nothing is deleted: forget it first")
        live = set().union(*(m.chunks() for m in manifests))
        removed = removed_bytes = kept = 0
        for chunk, path in repo.chunks.walk():
            if chunk in live:
                kept += 1
                continue
            removed_bytes += _remove(path, dry_run)
            removed += 1
        quarantine = 0
        for q in repo.chunks.quarantined():
            if q.rewritten or q.chunk not in live:
                removed_bytes += _remove(q.path, dry_run)
                quarantine += 1
        tmp = 0
        with os.scandir(repo.scratch) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    if not dry_run:
                        remove_quietly(repo.scratch / entry.name)
                    tmp += 1
        points = {m.id for m in manifests}
        orphans = [] if dry_run else [p for p in held if p not in points]
        for point_id in orphans:  # a hold whose point is gone means nothing
            remove_quietly(repo.holds_dir / f"{point_id}.json")
        if orphans:
            fsync_dir(repo.holds_dir)
    return PruneResult(points_removed=len(forget), chunks_removed=removed, bytes_removed=removed_bytes,
                       chunks_kept=kept, tmp_removed=tmp, quarantine_removed=quarantine)


def _remove(path: Path, dry_run: bool = False) -> int:
    """Delete a file of the chunk store (not with `dry_run`); its size."""
    try:
        size = path.stat().st_size
        if not dry_run:
            path.unlink()
    except OSError as exc:
        raise RepositoryError(f"prune: cannot remove {path}: {one_line(exc)}") from None
    return size


def _references(manifests: list[Manifest]) -> dict[str, tuple[int, set[DiskRef]]]:
    """Chunk id -> (its length, the disks and NVRAM files using it)."""
    users: dict[str, tuple[int, set[DiskRef]]] = {}
    for m in manifests:
        for disk in m.disks:
            for block, chunk in enumerate(disk.blocks):
                if chunk is not None:
                    users.setdefault(chunk, (disk.block_length(block), set()))[1].add(DiskRef(m.id, disk.index))
        if m.nvram is not None:
            users.setdefault(m.nvram.chunk, (m.nvram.size, set()))[1].add(DiskRef.nvram_of(m.id))
    return users


def _check(repo: Repository, chunk: str, length: int) -> tuple[Literal["missing", "corrupt"] | None, str, str]:
    """(kind of damage or None, detail, where a corrupt chunk was quarantined)."""
    try:
        repo.chunks.get(chunk, length)
    except ChunkMissing as exc:
        return "missing", str(exc), ""
    except ChunkCorrupt as exc:
        moved = str(exc.quarantined.relative_to(repo.path)) if exc.quarantined is not None else ""
        return "corrupt", str(exc), moved
    except ChunkUnreadable as exc:
        return "corrupt", str(exc), ""
    return None, "", ""
