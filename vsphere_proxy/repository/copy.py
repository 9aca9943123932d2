"""Copying restore points into another repository (`docs/repository.md`, "Copying to another repository"): only
the chunks the target lacks are written, encoded for the target (re-encrypted, renamed by its chunk ids); every
chunk of a point is read back from the target and checked before its manifest is written there, so a point
counts as copied only once the target can restore it. A copy killed at any moment is resumed by running it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .files import fsync_dir, write_atomic
from .format import DiskRecord, Manifest, RepositoryError, RepositoryFull, dump_record

if TYPE_CHECKING:
    from .repo import Repository


@dataclass(frozen=True, slots=True)
class CopiedPoint:
    """One restore point's copy: `status` copied, skipped (the target holds it already) or failed (`error`)."""

    id: str
    vm: str
    status: str
    chunks_written: int = 0
    bytes_written: int = 0  # chunk file bytes written to the target
    bytes_read: int = 0  # block bytes read from the source
    error: str = ""


@dataclass(slots=True)
class CopyResult:
    points: list[CopiedPoint] = field(default_factory=list)
    chunks_verified: int = 0
    seconds: float = 0.0

    @property
    def copied(self) -> list[CopiedPoint]:
        return [p for p in self.points if p.status == "copied"]

    @property
    def failed(self) -> list[CopiedPoint]:
        return [p for p in self.points if p.status == "failed"]

    @property
    def chunk_bytes_written(self) -> int:
        return sum(p.bytes_written for p in self.points)

    @property
    def chunks_written(self) -> int:
        return sum(p.chunks_written for p in self.points)

    @property
    def bytes_read(self) -> int:
        return sum(p.bytes_read for p in self.points)


class _Run:
    """What one copy run shares between its points: source → target chunk ids, target chunks already checked."""

    def __init__(self, source: Repository, target: Repository, workers: int) -> None:
        self.source = source
        self.target = target
        self.workers = max(1, workers)
        self.same_ids = source.codec.naming == target.codec.naming
        self.raw = self.same_ids and not source.encrypted and not target.encrypted  # the files themselves fit
        self.mapped: dict[str, str] = {}
        self.verified: set[str] = set()
        self.guard = threading.Lock()

    def translate(self, chunk: str, length: int) -> tuple[str, int, int, Path | None]:
        """(the target's id of `chunk`, file bytes written, block bytes read, the directory written to)."""
        with self.guard:
            known = self.mapped.get(chunk)
        if known is not None:
            return known, 0, 0, None
        target = self.target.chunks
        if self.same_ids and target.present(chunk):
            self._map(chunk, chunk)
            return chunk, 0, 0, None
        if self.raw:
            raw = self.source.chunks.get_checked_file(chunk, length)
            stored = target.put_file(chunk, raw)
        else:  # another naming or sealing: the checked frame, sealed for the target (not compressed again)
            frame, data = self.source.chunks.get_frame(chunk, length)
            stored = target.put_frame(target.chunk_id(data), frame)
        self._map(chunk, stored.chunk)
        return stored.chunk, stored.written, length, target.path(stored.chunk).parent if stored.new else None

    def _map(self, chunk: str, to: str) -> None:
        with self.guard:
            self.mapped[chunk] = to

    def check(self, chunk: str, length: int) -> bool:
        """Read a target chunk back and check it, once per run; False if it is missing or corrupt."""
        with self.guard:
            if chunk in self.verified:
                return True
        try:
            self.target.chunks.get(chunk, length)
        except RepositoryFull:
            raise
        except RepositoryError:
            return False
        with self.guard:
            self.verified.add(chunk)
        return True


def copy_points(source: Repository, target: Repository, points: Iterable[Manifest], *, workers: int = 4,
                on_point: Callable[[CopiedPoint], None] | None = None) -> CopyResult:
    """Copy `points` (manifests of `source`, copied oldest first) into `target`; a point the target holds already
    is skipped without reading it. Holds shared locks on both for the whole run. A point whose chunks cannot be
    read from the source or checked on the target fails alone (no manifest written, its chunks left for the
    target's prune); a full target (`RepositoryFull`) ends the run."""
    if source.config.id == target.config.id:
        raise RepositoryError(f"copy: {target.path} is the same repository as {source.path}")
    result = CopyResult()
    started = time.monotonic()
    run = _Run(source, target, workers)
    with source.lock("shared", f"copy to {target.path}"), target.lock("shared", f"copy from {source.path}"), \
            ThreadPoolExecutor(max_workers=run.workers) as pool:
        for manifest in sorted(points, key=lambda m: (m.started, m.id)):
            if (target.points_dir / f"{manifest.id}.json").exists():
                outcome = CopiedPoint(manifest.id, manifest.vm.name, "skipped")
            else:
                outcome = _copy_one(run, pool, manifest)
            result.points.append(outcome)
            if on_point is not None:
                on_point(outcome)
    result.chunks_verified = len(run.verified)
    result.seconds = time.monotonic() - started
    return result


def _copy_one(run: _Run, pool: ThreadPoolExecutor, manifest: Manifest) -> CopiedPoint:
    lengths = _lengths(manifest)
    try:
        translated = list(pool.map(lambda item: run.translate(*item), lengths.items()))
    except RepositoryFull:
        raise
    except RepositoryError as exc:
        return CopiedPoint(manifest.id, manifest.vm.name, "failed", error=f"reading the source: {exc}")
    mapping = {chunk: t[0] for chunk, t in zip(lengths, translated, strict=True)}
    written = sum(t[1] for t in translated)
    read = sum(t[2] for t in translated)
    new = sum(1 for t in translated if t[1])
    checks = list(pool.map(lambda item: run.check(mapping[item[0]], item[1]), lengths.items()))
    bad = [chunk for chunk, ok in zip(lengths, checks, strict=True) if not ok]
    if bad:
        return CopiedPoint(manifest.id, manifest.vm.name, "failed", new, written, read,
                           f"{len(bad)} chunk(s) did not check out on the target (first {mapping[bad[0]]})")
    for directory in sorted({t[3] for t in translated if t[3] is not None}):
        fsync_dir(directory)
    copied = _translated(manifest, mapping)
    record = run.target.codec.seal_record("point", copied.id, dump_record(copied))
    write_atomic(run.target.points_dir / f"{copied.id}.json", record, run.target.scratch, sync_dir=True,
                 stem="point-", repository=run.target.path)
    return CopiedPoint(manifest.id, manifest.vm.name, "copied", new, written, read)


def _lengths(manifest: Manifest) -> dict[str, int]:
    """Every chunk the point references, with its length, in the order the point uses them."""
    found: dict[str, int] = {}
    for disk in manifest.disks:
        for block, chunk in enumerate(disk.blocks):
            if chunk is not None and chunk not in found:
                found[chunk] = disk.block_length(block)
    if manifest.nvram is not None:
        found.setdefault(manifest.nvram.chunk, manifest.nvram.size)
    return found


def _translated(manifest: Manifest, mapping: dict[str, str]) -> Manifest:
    """The manifest with the target's chunk ids (each disk's block list validated again)."""
    disks = tuple(DiskRecord.model_validate({**d.model_dump(), "blocks": [None if c is None else mapping[c]
                                                                           for c in d.blocks]})
                  for d in manifest.disks)
    update: dict[str, object] = {"disks": disks}
    if manifest.vm_config is not None and manifest.vm_config.nvram is not None:
        nvram = manifest.vm_config.nvram.model_copy(update={"chunk": mapping[manifest.vm_config.nvram.chunk]})
        update["vm_config"] = manifest.vm_config.model_copy(update={"nvram": nvram})
    return manifest.model_copy(update=update)
