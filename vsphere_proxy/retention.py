"""Retention rules: which restore points of each VM to keep, and why.

The rules are restic's `forget` policy (`--keep-last`, `--keep-hourly` ... `--keep-yearly`, `--keep-within`),
applied to every VM's restore points separately. Like borg's `prune --list`, every point gets the reasons it is
kept, or the one reason it goes.

How a VM's points are decided:

* The points are ordered newest first (equal times: the greater id first). `#1` in a reason is always the newest.
* `keep_last n` keeps the n first points of that order.
* `keep_hourly` / `keep_daily` / `keep_weekly` / `keep_monthly` / `keep_yearly` n keep the newest point of each
  of the n most recent periods that hold points (periods without points do not count). Periods are calendar
  periods on the wall clock of the repository's time zone: hour `2026-11-29 13:00`, day `2026-11-29`, ISO week
  `2026-W48` (Monday to Sunday, numbered in the ISO year, so 2027-01-01 is in `2026-W53`), month `2026-11`,
  year `2026`. When the clock goes back, the repeated hour is one period, as in restic.
* `keep_within d` keeps every point at or after d before the VM's newest point (the newest point, not now: a VM
  no longer backed up keeps its last points). A point exactly d before is kept; restic keeps only later ones.
* A count of -1 means every period (every point for `keep_last`).
* Each rule is evaluated on all the VM's points independently of the others, and a point is kept when at least
  one rule keeps it: the kept set is the union of what each rule keeps (restic's rule; Proxmox Backup Server
  instead lets each option consider only the points older than what the previous options kept).
* A protected point (legal hold) is always kept. Protection does not take part in the rules: they are evaluated
  as if no point were protected, so protecting a point never changes what is decided for the others.

Unlike restic 0.17 and later, the oldest point is not kept additionally when a rule has periods left over;
such a rule simply keeps fewer periods than its count.

This module is pure: no I/O, no clock. Decisions depend only on the points, the rules and the time zone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta, tzinfo

from dateutil.relativedelta import relativedelta

__all__ = ["Candidate", "Decision", "Duration", "Rules", "decide"]

_DURATION = re.compile(
    r"(?:(?P<years>[0-9]+)y)?(?:(?P<months>[0-9]+)m)?(?:(?P<weeks>[0-9]+)w)?"
    r"(?:(?P<days>[0-9]+)d)?(?:(?P<hours>[0-9]+)h)?",
    re.ASCII,
)
_MAX_DIGITS = 9

# The earliest instant a cutoff can be: `Duration.before` clamps to it instead of overflowing.
_EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Duration:
    """A calendar duration, written as restic's `--keep-within`: `2y5m7d3h`, `30d`, `36h`, `1w` (7 days).

    Years, months and days are calendar steps (one month before 2026-03-31 is 2026-02-28), hours are elapsed
    time (across a clock change, 24h is not one day).
    """

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"duration {f.name}: must be an integer (got {value!r})")
            if value < 0:
                raise ValueError(f"duration {f.name}: must be >= 0 (got {value})")

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Read `1y6m`, `30d`, `36h`, `2w`, `1y2m3d4h`: numbers with the units y, m, w, d, h, in that order.

        Raises ValueError with a one-line message naming `text` on anything else (empty, a sign, a fraction,
        an unknown or repeated unit, units out of order, a number over nine digits).
        """
        if not isinstance(text, str):
            raise ValueError(f"duration {text!r}: not a text")
        match = _DURATION.fullmatch(text.strip())
        if not text.strip() or match is None:
            raise ValueError(
                f"duration {text!r}: expected numbers with the units y, m, w, d, h in that order, "
                "as in '1y6m', '30d', '36h' or '2w'"
            )
        groups = match.groupdict()
        if any(v is not None and len(v) > _MAX_DIGITS for v in groups.values()):
            raise ValueError(f"duration {text!r}: a number has more than {_MAX_DIGITS} digits")
        number = {k: int(v) if v is not None else 0 for k, v in groups.items()}
        return cls(
            years=number["years"],
            months=number["months"],
            days=number["weeks"] * 7 + number["days"],
            hours=number["hours"],
        )

    def zero(self) -> bool:
        """True when every part is 0."""
        return not (self.years or self.months or self.days or self.hours)

    def before(self, moment: datetime) -> datetime:
        """`moment` minus this duration: years, months and days on the wall clock of `moment`, then hours elapsed.

        A day missing in the target month is its last day (2026-03-31 minus 1m is 2026-02-28). A wall-clock time
        that a clock change makes occur twice is taken at its first occurrence; one that it skips is read with
        the offset in force before the change. A result before the earliest representable time is that time
        (in UTC). The result is in `moment`'s time zone.
        """
        try:
            wall = moment.replace(tzinfo=None) - relativedelta(years=self.years, months=self.months, days=self.days)
            shifted = wall.replace(tzinfo=moment.tzinfo, fold=0)
            if not self.hours:
                return shifted
            if shifted.tzinfo is None or shifted.utcoffset() is None:
                return shifted - timedelta(hours=self.hours)
            return (shifted.astimezone(UTC) - timedelta(hours=self.hours)).astimezone(shifted.tzinfo)
        except (OverflowError, ValueError):
            return _EARLIEST

    def __str__(self) -> str:
        """The canonical text, which `parse` reads back: `1y6m`, `30d`, `36h`; `0d` when zero."""
        text = "".join(
            f"{value}{unit}"
            for value, unit in ((self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h"))
            if value
        )
        return text or "0d"


_COUNTS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


@dataclass(frozen=True, slots=True)
class Rules:
    """Which restore points to keep (restic's `forget` policy); unset rules are None.

    Counts are >= 1, or -1 for unlimited (every period; every point for `keep_last`). A count of 0 is refused
    rather than read as "unset", as is a zero `keep_within`.
    """

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: Duration | None = None

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: must be an integer (got {value!r})")
            if value < 1 and value != -1:
                raise ValueError(f"{name}: must be >= 1 or -1 (got {value})")
        within = self.keep_within
        if within is not None:
            if not isinstance(within, Duration):
                raise ValueError(f"keep_within: must be a Duration (got {within!r})")
            if within.zero():
                raise ValueError(f"keep_within: must be longer than 0 (got {within})")

    def empty(self) -> bool:
        """True when no rule is set."""
        return all(getattr(self, name) is None for name in (*_COUNTS, "keep_within"))

    def describe(self) -> str:
        """The rules set, in evaluation order: `last 3, daily 7, weekly 4, within 30d`; `no rule` when empty."""
        parts = []
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name.removeprefix('keep_')} {'unlimited' if value == -1 else value}")
        if self.keep_within is not None:
            parts.append(f"within {self.keep_within}")
        return ", ".join(parts) or "no rule"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A restore point to decide on.

    `id` is unique among the points decided together; `vm` groups them (each VM is decided on its own); `time`
    is the point's timezone-aware start time. A `protected` point (legal hold) is always kept; `hold` is an
    optional text shown in its reason, such as `until 2027-01-31`.
    """

    id: str
    vm: str
    time: datetime
    protected: bool = False
    hold: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.time, datetime) or self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError(f"restore point {self.id!r}: time {self.time!r} has no time zone")


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens to one restore point, and why.

    `time` is the point's time in the rules' time zone (the same instant as the candidate's). A kept point's
    `reasons` name every rule that keeps it, in the order last, hourly, daily, weekly, monthly, yearly, within,
    protected: `last #1`, `daily #3 (2026-11-29)`, `weekly #1 (2026-W48)`, `within 30d`,
    `protected until 2027-01-31`. A removed point has one reason: the period it falls in is kept by a newer
    point (`daily 2026-11-29 is kept by newer point <id>`), or it is older than what every rule keeps
    (`older than the last 3 points, the 7 daily, 4 weekly periods kept and 30d before the newest point`).
    """

    id: str
    vm: str
    time: datetime
    keep: bool
    reasons: tuple[str, ...]

    def line(self) -> str:
        """One line: `keep   <id>  <vm>  <time>  <reasons>` or `remove <id>  <vm>  <time>  <reason>`.

        Control characters in the texts are escaped, so the line stays one line whatever the names.
        """
        action = "keep" if self.keep else "remove"
        when = self.time.isoformat(timespec="seconds")
        why = ", ".join(self.reasons)
        return f"{action:<6} {_printable(self.id)}  {_printable(self.vm)}  {when}  {_printable(why)}"


def decide(points: Iterable[Candidate], rules: Rules, tz: tzinfo) -> list[Decision]:
    """Decide every point: kept or removed, with the reasons (see the module's description for the rules).

    Each VM's points are decided on their own; periods are calendar periods in `tz`, the repository's time zone.
    Rules are evaluated on all points as if none were protected; the kept set is the union of what each rule
    keeps, plus the protected points. The result is sorted by VM, then newest first (equal times: greater id
    first), the order the rules walk; it does not depend on the order of `points`.

    Raises ValueError for empty rules (that would remove every point) and for an id given twice.
    """
    if not isinstance(rules, Rules):
        raise TypeError(f"retention: rules must be Rules (got {type(rules).__name__})")
    if rules.empty():
        raise ValueError("retention: no keep_* rule set; refusing to remove every point")
    if not isinstance(tz, tzinfo):
        raise TypeError(f"retention: tz must be a tzinfo (got {tz!r})")
    by_vm: dict[str, list[Candidate]] = {}
    seen: set[str] = set()
    for point in points:
        if point.id in seen:
            raise ValueError(f"retention: restore point {point.id!r} given twice")
        seen.add(point.id)
        by_vm.setdefault(point.vm, []).append(point)
    decisions: list[Decision] = []
    for vm in sorted(by_vm):
        decisions.extend(_decide_vm(by_vm[vm], rules, tz))
    return decisions


def _hour(t: datetime) -> str:
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:00"


def _day(t: datetime) -> str:
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}"


def _week(t: datetime) -> str:
    iso = t.isocalendar()
    return f"{iso.year:04d}-W{iso.week:02d}"


def _month(t: datetime) -> str:
    return f"{t.year:04d}-{t.month:02d}"


def _year(t: datetime) -> str:
    return f"{t.year:04d}"


_PERIODS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_hourly", "hourly", _hour),
    ("keep_daily", "daily", _day),
    ("keep_weekly", "weekly", _week),
    ("keep_monthly", "monthly", _month),
    ("keep_yearly", "yearly", _year),
)


def _decide_vm(points: list[Candidate], rules: Rules, tz: tzinfo) -> list[Decision]:
    """Decide one VM's points (see `decide`)."""
    ordered = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    local = [p.time.astimezone(tz) for p in ordered]
    keeps: list[list[str]] = [[] for _ in ordered]
    # For a point not kept: the first period rule whose period for it is kept by another (newer) point.
    superseded: list[str | None] = [None] * len(ordered)

    if rules.keep_last is not None:
        count = len(ordered) if rules.keep_last == -1 else min(rules.keep_last, len(ordered))
        for i in range(count):
            keeps[i].append(f"last #{i + 1}")

    for attr, label, period_of in _PERIODS:
        limit = getattr(rules, attr)
        if limit is None:
            continue
        kept_by: dict[str, str] = {}  # period -> id of the point keeping it, newest period first
        for i, point in enumerate(ordered):
            period = period_of(local[i])
            holder = kept_by.get(period)
            if holder is not None:
                if superseded[i] is None:
                    superseded[i] = f"{label} {period} is kept by newer point {holder}"
            elif limit == -1 or len(kept_by) < limit:
                kept_by[period] = point.id
                keeps[i].append(f"{label} #{len(kept_by)} ({period})")

    if rules.keep_within is not None and ordered:
        cutoff = rules.keep_within.before(local[0])
        for i, point in enumerate(ordered):
            if point.time >= cutoff:
                keeps[i].append(f"within {rules.keep_within}")

    decisions = []
    for i, point in enumerate(ordered):
        reasons = keeps[i]
        if point.protected:
            hold = point.hold.strip()
            reasons.append(f"protected {hold}" if hold else "protected")
        if reasons:
            decisions.append(Decision(point.id, point.vm, local[i], True, tuple(reasons)))
        else:
            why = superseded[i] or _older_than(rules)
            decisions.append(Decision(point.id, point.vm, local[i], False, (why,)))
    return decisions


def _older_than(rules: Rules) -> str:
    """The reason of a point beyond the reach of every rule set."""
    parts = []
    if rules.keep_last is not None:
        parts.append("the last point" if rules.keep_last == 1 else f"the last {rules.keep_last} points")
    counts = [(getattr(rules, attr), label) for attr, label, _ in _PERIODS if getattr(rules, attr) is not None]
    if counts:
        noun = "period" if len(counts) == 1 and counts[0][0] == 1 else "periods"
        parts.append(f"the {', '.join(f'{count} {label}' for count, label in counts)} {noun} kept")
    if rules.keep_within is not None:
        parts.append(f"{rules.keep_within} before the newest point")
    if len(parts) == 1:
        return f"older than {parts[0]}"
    return f"older than {', '.join(parts[:-1])} and {parts[-1]}"


def _printable(text: str) -> str:
    """`text` with every non-printable character (newline, tab, other controls) escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
