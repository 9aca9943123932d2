"""Copy jobs (the disaster-recovery or compliance copy): select restore points of the job's repository by the
copy policy (`--vm`, `--since`, each VM's latest N), copy them into a second repository (only the chunks it lacks,
each point checked there before it counts), then apply the target's own retention."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vsphere_proxy.config import RetentionConfig
from vsphere_proxy.jobs.forget import ForgetResult, apply_retention
from vsphere_proxy.repository import Manifest, Repository
from vsphere_proxy.repository.copy import CopiedPoint, CopyResult, copy_points
from vsphere_proxy.retention import Duration


@dataclass(frozen=True, slots=True)
class CopySelection:
    vms: tuple[str, ...] | None = None
    since: Duration | None = None
    latest: int | None = None

    def choose(self, points: Collection[Manifest], now: datetime | None = None) -> list[Manifest]:
        """The points to copy, oldest first."""
        now = now or datetime.now(UTC)
        cutoff = self.since.before(now) if self.since is not None else None
        by_vm: dict[str, list[Manifest]] = {}
        for m in sorted(points, key=lambda m: (m.started, m.id)):
            if self.vms is not None and m.vm.name not in self.vms:
                continue
            if cutoff is not None and m.started < cutoff:
                continue
            by_vm.setdefault(m.vm.name, []).append(m)
        chosen = [m for ms in by_vm.values() for m in (ms[-self.latest:] if self.latest else ms)]
        return sorted(chosen, key=lambda m: (m.started, m.id))


@dataclass(frozen=True, slots=True)
class CopyReport:
    source: str
    target: str
    selected: int
    result: CopyResult
    retention: ForgetResult | None = None

    @property
    def ok(self) -> bool:
        return not self.result.failed

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "source": self.source, "target": self.target, "selected": self.selected,
            "copied": len(r.copied), "skipped": sum(1 for p in r.points if p.status == "skipped"),
            "failed": len(r.failed), "chunks_written": r.chunks_written, "chunk_bytes_written": r.chunk_bytes_written,
            "bytes_read": r.bytes_read, "chunks_verified": r.chunks_verified, "seconds": round(r.seconds, 3),
            "points": [{"id": p.id, "vm": p.vm, "status": p.status, "chunks_written": p.chunks_written,
                        "bytes_written": p.bytes_written, "error": p.error or None} for p in r.points],
            "retention": None if self.retention is None else self.retention.to_json(),
        }


def run_copy(source: Repository, target: Repository, selection: CopySelection, *,
             retention: RetentionConfig | None = None, dry_run: bool = False, workers: int = 4,
             on_point: Callable[[CopiedPoint], None] | None = None) -> CopyReport:
    """Copy the selected points of `source` into `target`, then (unless nothing could be copied) forget and prune
    in `target` what its `retention` removes; the prune is skipped, and said so, while the target is in use."""
    points, _broken = source.scan()
    chosen = selection.choose(points)
    if dry_run:
        have = set(target.point_ids())
        result = CopyResult([CopiedPoint(m.id, m.vm.name, "skipped" if m.id in have else "would copy")
                             for m in chosen])
        return CopyReport(str(source.path), str(target.path), len(chosen), result)
    result = copy_points(source, target, chosen, workers=workers, on_point=on_point)
    after = None
    if retention is not None:
        after = apply_retention(target, retention.rules(), retention.tz(), prune=retention.prune)
    return CopyReport(str(source.path), str(target.path), len(chosen), result, after)
