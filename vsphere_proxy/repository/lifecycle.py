"""Holds and forgetting (`docs/repository.md`, "Holds" and "Forget"): `protect`/`unprotect` a restore point, and
`forget` points by id, never a held one. All three hold a shared repository lock and the forget lock, so a hold
cannot appear between forget's check and the deletion it allows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import AwareDatetime, StringConstraints, field_validator

from .files import fsync_dir, write_atomic
from .format import (
    BrokenPoint,
    Manifest,
    PointId,
    RepositoryError,
    _Record,
    check_point_id,
    dump_record,
    one_line,
    parse_record,
)
from .locks import forget_lock

if TYPE_CHECKING:
    from .repo import Repository


class Hold(_Record):
    """One `holds/<id>.json` record."""

    versions: ClassVar[tuple[int, ...]] = (1,)

    version: Literal[1] = 1
    point: PointId
    until: AwareDatetime | None = None
    reason: Annotated[str, StringConstraints(max_length=500)] = ""
    created: AwareDatetime

    @field_validator("reason")
    @classmethod
    def _one_line(cls, v: str) -> str:
        if any(ord(c) < 32 for c in v):
            raise ValueError("must be one line without control characters")
        return v

    def active(self, now: datetime | None = None) -> bool:
        return self.until is None or self.until > (now or datetime.now(UTC))

    def describe(self) -> str:
        """"until 2027-01-31" / "without end", then the reason."""
        when = f"until {self.until.astimezone(UTC):%Y-%m-%d %H:%M}Z" if self.until else "without end"
        return f"{when}: {self.reason}" if self.reason else when


@dataclass(frozen=True, slots=True)
class HoldState:
    """What `holds/<point>.json` says: the hold, or why it cannot be read (a hold that cannot be read protects)."""

    point: str
    hold: Hold | None
    problem: str = ""

    def protects(self, now: datetime | None = None) -> bool:
        return self.hold is None or self.hold.active(now)

    def describe(self) -> str:
        if self.hold is None:
            return f"hold cannot be read ({self.problem})"
        return self.hold.describe() if self.hold.active() else f"expired ({self.hold.describe()})"


class PointHeld(RepositoryError):
    """Forgetting a held point was asked: nothing was forgotten."""


def holds(repo: Repository) -> dict[str, HoldState]:
    """Every hold file, by point id (expired ones and unreadable ones included)."""
    found: dict[str, HoldState] = {}
    if not repo.holds_dir.is_dir():
        return found
    for path in sorted(repo.holds_dir.glob("*.json")):
        point = path.name.removesuffix(".json")
        try:
            plain = repo.codec.open_record("hold", point, path.read_bytes())
            hold = parse_record(plain, Hold, path)
            if hold.point != point:
                raise RepositoryError(f"holds point {hold.point}")
            found[point] = HoldState(point, hold)
        except FileNotFoundError:
            continue
        except (OSError, RepositoryError) as exc:
            found[point] = HoldState(point, None, one_line(exc).removeprefix(f"{path}: "))
    return found


def protect(repo: Repository, point_id: str, until: datetime | None = None, reason: str = "") -> Hold:
    """Put (or replace) a hold on a restore point; refused for a point that does not exist or an `until` past."""
    check_point_id(point_id)
    now = datetime.now(UTC)
    if until is not None and until <= now:
        raise RepositoryError(f"--until {until.isoformat()}: is in the past")
    try:
        hold = Hold(point=point_id, until=until, reason=reason, created=now)
    except ValueError as exc:
        raise RepositoryError(f"--reason: {one_line(exc)}") from None
    with repo.lock("shared", f"protect {point_id}"), forget_lock(repo.locks_dir, f"protect {point_id}"):
        if not (repo.points_dir / f"{point_id}.json").exists():
            raise RepositoryError(f"no restore point {point_id} in {repo.path}")
        repo.holds_dir.mkdir(exist_ok=True)
        record = repo.codec.seal_record("hold", point_id, dump_record(hold))
        write_atomic(repo.holds_dir / f"{point_id}.json", record, repo.scratch, sync_dir=True, stem="hold-",
                     repository=repo.path)
    return hold


def unprotect(repo: Repository, point_id: str) -> bool:
    """Remove a point's hold; False if it had none."""
    check_point_id(point_id)
    with repo.lock("shared", f"unprotect {point_id}"), forget_lock(repo.locks_dir, f"unprotect {point_id}"):
        path = repo.holds_dir / f"{point_id}.json"
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(repo.holds_dir)
    return True


Chooser = Callable[[list[Manifest], list[BrokenPoint], dict[str, HoldState]], list[str]]


def forget(repo: Repository, point_ids: list[str]) -> list[str]:
    """Delete the manifests of `point_ids` (broken ones included); their chunks stay until prune. Refused as a
    whole (`PointHeld`, nothing deleted) when one of them is held. Returns the ids deleted (a point already gone
    is left out)."""
    for point_id in point_ids:
        check_point_id(point_id)
    return forget_chosen(repo, lambda _points, _broken, _holds: point_ids)


def forget_chosen(repo: Repository, choose: Chooser) -> list[str]:
    """Forget the points `choose` picks from the repository's points, broken points and holds as they are under
    the forget lock (so the choice and the deletion see the same holds, and no other forget runs between)."""
    removed: list[str] = []
    with repo.lock("shared", "forget"), forget_lock(repo.locks_dir, "forget"):
        points, broken = repo.scan()
        held = holds(repo)
        wanted = sorted(set(choose(points, broken, held)))
        refused = [p for p in wanted if p in held and held[p].protects()]
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise PointHeld(f"restore point {refused[0]} is held ({held[refused[0]].describe()}){more}; "
                            "nothing was forgotten: unprotect it first")
        try:
            for point_id in wanted:
                with contextlib.suppress(FileNotFoundError):
                    (repo.points_dir / f"{point_id}.json").unlink()
                    removed.append(point_id)
        finally:
            if removed:
                fsync_dir(repo.points_dir)
    return removed
