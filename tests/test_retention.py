"""Retention rules: properties on generated restore points, hand-computed tables, durations and refusals."""

from __future__ import annotations

import calendar
import itertools
import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsphere_proxy.retention import Candidate, Decision, Duration, Rules, decide

BERLIN = ZoneInfo("Europe/Berlin")
ZONES: list[tzinfo] = [
    UTC,
    BERLIN,
    ZoneInfo("America/New_York"),
    ZoneInfo("Australia/Lord_Howe"),  # half-hour clock changes
    ZoneInfo("Asia/Kolkata"),
    timezone(timedelta(hours=-9, minutes=-30)),
]
COUNT_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
RULE_FIELDS = (*COUNT_FIELDS, "keep_within")

KEEP_REASON = re.compile(r"last #\d+|(hourly|daily|weekly|monthly|yearly) #\d+ \(.+\)|within \S+|protected( .+)?")
REMOVE_REASON = re.compile(r"(hourly|daily|weekly|monthly|yearly) \S.* is kept by newer point .+|older than .+")

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def at(text: str, tz: tzinfo = UTC) -> datetime:
    """`2026-11-29 12:00` in `tz`."""
    return datetime.fromisoformat(text).replace(tzinfo=tz)


def kept(decisions: list[Decision]) -> set[str]:
    return {d.id for d in decisions if d.keep}


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.id: d for d in decisions}


def newest_first(points: list[Candidate]) -> list[Candidate]:
    return sorted(points, key=lambda p: (p.time, p.id), reverse=True)


# -- generated points ---------------------------------------------------------------------------------------------

BASE = datetime(2026, 1, 1, tzinfo=UTC)
SPAN_MINUTES = 3 * 366 * 24 * 60
# A few fixed instants, so that equal times, same hours and same days turn up often.
CLUSTER = [0, 1, 59, 60, 61, 23 * 60 + 59, 24 * 60, 7 * 24 * 60, 31 * 24 * 60, 365 * 24 * 60]
OFFSETS = st.one_of(st.integers(0, SPAN_MINUTES), st.integers(0, 3 * 24 * 60), st.sampled_from(CLUSTER))
INPUT_ZONES = st.sampled_from([UTC, BERLIN, timezone(timedelta(hours=5, minutes=45))])
HOLDS = st.sampled_from(["", "until 2027-01-31", "case 4711", "  "])


@st.composite
def candidates(draw, vms=("vm-a", "vm-b", "vm-c"), max_size=30, offsets=OFFSETS, protect=True) -> list[Candidate]:
    """Restore points with unique ids (not in time order), spread over `vms`, times in assorted time zones."""
    held = st.sampled_from([False] * 5 + [True]) if protect else st.just(False)
    rows = draw(
        st.lists(
            st.tuples(st.text("0123456789abcdef", min_size=1, max_size=6), st.sampled_from(vms), offsets, INPUT_ZONES,
                      held, HOLDS),
            max_size=max_size,
            unique_by=lambda row: row[0],
        )
    )  # fmt: skip
    return [
        Candidate(i, vm, (BASE + timedelta(minutes=minutes)).astimezone(zone), protected, hold if protected else "")
        for i, vm, minutes, zone, protected, hold in rows
    ]


COUNTS = st.one_of(st.none(), st.integers(1, 6), st.just(-1))
DURATIONS = st.builds(
    Duration, years=st.integers(0, 1), months=st.integers(0, 14), days=st.integers(0, 40), hours=st.integers(0, 50)
).filter(lambda d: not d.zero())


@st.composite
def rules(draw) -> Rules:
    values = {name: draw(COUNTS) for name in COUNT_FIELDS}
    values["keep_within"] = draw(st.one_of(st.none(), DURATIONS))
    if all(v is None for v in values.values()):
        values[draw(st.sampled_from(COUNT_FIELDS))] = draw(st.integers(1, 6))
    return Rules(**values)


def single_rules(r: Rules) -> list[Rules]:
    """Each rule set in `r`, alone."""
    return [Rules(**{name: getattr(r, name)}) for name in RULE_FIELDS if getattr(r, name) is not None]


def without_protection(reasons: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(r for r in reasons if not r.startswith("protected"))


# -- properties ---------------------------------------------------------------------------------------------------


@PROPERTY
@given(candidates(), rules(), st.sampled_from(ZONES))
def test_kept_set_is_the_union_of_each_rule_alone(points, r, tz):
    full = decide(points, r, tz)
    alone = [by_id(decide(points, single, tz)) for single in single_rules(r)]
    assert kept(full) == set().union(*({i for i, d in one.items() if d.keep} for one in alone))
    # More: a kept point's reasons are those of each rule alone, in rule order.
    for d in full:
        expected = tuple(
            reason for one in alone if one[d.id].keep for reason in without_protection(one[d.id].reasons)
        )
        assert without_protection(d.reasons) == expected if d.keep else not expected


@PROPERTY
@given(st.data(), candidates(), rules(), st.sampled_from(ZONES))
def test_decisions_do_not_depend_on_input_order(data, points, r, tz):
    shuffled = data.draw(st.permutations(points))
    assert decide(shuffled, r, tz) == decide(points, r, tz)
    assert decide(iter(shuffled), r, tz) == decide(tuple(points), r, tz)


@PROPERTY
@given(candidates(protect=False), rules(), st.sampled_from(ZONES), st.data())
def test_protected_points_are_kept_and_change_nothing_else(points, r, tz, data):
    baseline = by_id(decide(points, r, tz))
    chosen = data.draw(st.sets(st.sampled_from([p.id for p in points]))) if points else set()
    holds = {i: data.draw(HOLDS) for i in sorted(chosen)}
    protected = [
        Candidate(p.id, p.vm, p.time, protected=True, hold=holds[p.id]) if p.id in chosen else p for p in points
    ]
    after = by_id(decide(protected, r, tz))
    assert after.keys() == baseline.keys()
    for point_id, d in after.items():
        if point_id not in chosen:
            assert d == baseline[point_id]
            continue
        assert d.keep
        hold = holds[point_id].strip()
        assert d.reasons[-1] == (f"protected {hold}" if hold else "protected")
        assert d.reasons[:-1] == (baseline[point_id].reasons if baseline[point_id].keep else ())


# Times from a handful of instants: equal timestamps are the rule, not the exception.
TIGHT = st.sampled_from([0, 0, 0, 1, 1, 60, 24 * 60])


@PROPERTY
@given(candidates(vms=("vm",), max_size=25, offsets=TIGHT, protect=False), st.integers(1, 30), st.sampled_from(ZONES))
def test_keep_last_keeps_exactly_the_n_newest(points, n, tz):
    decisions = decide(points, Rules(keep_last=n), tz)
    assert kept(decisions) == {p.id for p in newest_first(points)[:n]}
    assert len(kept(decisions)) == min(n, len(points))
    assert [d.id for d in decisions] == [p.id for p in newest_first(points)]
    assert [d.reasons for d in decisions if d.keep] == [(f"last #{k}",) for k in range(1, min(n, len(points)) + 1)]
    assert kept(decide(points, Rules(keep_last=-1), tz)) == {p.id for p in points}


@PROPERTY
@given(candidates(), rules(), st.sampled_from(ZONES))
def test_every_point_has_reasons_that_match_its_fate(points, r, tz):
    decisions = decide(points, r, tz)
    assert sorted(d.id for d in decisions) == sorted(p.id for p in points)
    for d in decisions:
        assert d.reasons
        if d.keep:
            assert all(KEEP_REASON.fullmatch(reason) for reason in d.reasons), d.reasons
        else:
            assert len(d.reasons) == 1
            assert REMOVE_REASON.fullmatch(d.reasons[0]), d.reasons
            assert not KEEP_REASON.fullmatch(d.reasons[0])
        assert "\n" not in d.line()
        assert d.line().startswith("keep   " if d.keep else "remove ")
    points_by_id = {p.id: p for p in points}
    assert all(d.time == points_by_id[d.id].time and d.time.tzinfo is tz for d in decisions)
    # Sorted by VM, then newest first, then greater id first.
    for one, two in itertools.pairwise(decisions):
        assert one.vm < two.vm or (one.vm == two.vm and (one.time, one.id) > (two.time, two.id))


@PROPERTY
@given(candidates(), rules(), st.sampled_from(ZONES))
def test_vms_do_not_influence_each_other(points, r, tz):
    together = decide(points, r, tz)
    apart = [d for vm in sorted({p.vm for p in points}) for d in decide([p for p in points if p.vm == vm], r, tz)]
    assert together == apart


def wall_clock_before(moment: datetime, d: Duration) -> datetime:
    """The cutoff of `keep_within`, computed by hand: calendar steps on the wall clock, then hours elapsed."""
    wall = moment.replace(tzinfo=None)
    months = wall.year * 12 + (wall.month - 1) - d.years * 12 - d.months
    year, month = divmod(months, 12)
    day = min(wall.day, calendar.monthrange(year, month + 1)[1])
    wall = wall.replace(year=year, month=month + 1, day=day) - timedelta(days=d.days)
    start = wall.replace(tzinfo=moment.tzinfo, fold=0)
    return start.astimezone(UTC) - timedelta(hours=d.hours)


@PROPERTY
@given(candidates(protect=False), DURATIONS, st.sampled_from(ZONES))
def test_keep_within_keeps_exactly_the_points_within_d_of_the_vms_newest(points, d, tz):
    decisions = decide(points, Rules(keep_within=d), tz)
    expected = set()
    for vm in {p.vm for p in points}:
        mine = [p for p in points if p.vm == vm]
        cutoff = wall_clock_before(max(p.time for p in mine).astimezone(tz), d)
        expected |= {p.id for p in mine if p.time >= cutoff}
    assert kept(decisions) == expected
    assert {x.reasons for x in decisions if x.keep} <= {(f"within {d}",)}


PERIOD_KEYS = {
    "keep_hourly": lambda t: t.strftime("%Y-%m-%d %H"),
    "keep_daily": lambda t: t.date().isoformat(),
    "keep_weekly": lambda t: t.isocalendar()[:2],
    "keep_monthly": lambda t: (t.year, t.month),
    "keep_yearly": lambda t: t.year,
}


@PROPERTY
@given(candidates(vms=("vm",), protect=False), st.sampled_from(sorted(PERIOD_KEYS)), COUNTS, st.sampled_from(ZONES))
def test_a_period_rule_keeps_the_newest_point_of_each_of_its_n_latest_periods(points, field, n, tz):
    n = n or 1
    key = PERIOD_KEYS[field]
    newest_of: dict[object, Candidate] = {}
    for p in newest_first(points):
        newest_of.setdefault(key(p.time.astimezone(tz)), p)
    # Periods are ordered by their newest point, and so are the reasons' numbers.
    latest = list(newest_of.values()) if n == -1 else list(newest_of.values())[:n]
    decisions = decide(points, Rules(**{field: n}), tz)
    assert [d.id for d in decisions if d.keep] == [p.id for p in latest]
    numbers = [int(re.search(r"#(\d+)", d.reasons[0]).group(1)) for d in decisions if d.keep]
    assert numbers == list(range(1, len(latest) + 1))


# -- hand-computed tables -----------------------------------------------------------------------------------------


def test_restic_documentation_example_keep_daily_4_over_12_sundays():
    # restic's "Removing backup snapshots" page: one backup every Sunday at 11:00 for 12 weeks; `forget
    # --keep-daily 4` keeps the last four (each is the newest of its day) and removes the other eight.
    sundays = [
        ("0a1f9759", "2019-09-01 11:00:00"),
        ("46cfe4d5", "2019-09-08 11:00:00"),
        ("f6b1f037", "2019-09-15 11:00:00"),
        ("eb430a5d", "2019-09-22 11:00:00"),
        ("8cf1cb9a", "2019-09-29 11:00:00"),
        ("5d33b116", "2019-10-06 11:00:00"),
        ("b9553125", "2019-10-13 11:00:00"),
        ("e1a7b58b", "2019-10-20 11:00:00"),
        ("8f8018c0", "2019-10-27 11:00:00"),
        ("59403279", "2019-11-03 11:00:00"),
        ("dfee9fb4", "2019-11-10 11:00:00"),
        ("e1ae2f40", "2019-11-17 11:00:00"),
    ]
    points = [Candidate(i, "mopped:/home/user/work", at(t)) for i, t in sundays]
    decisions = decide(points, Rules(keep_daily=4), UTC)
    assert kept(decisions) == {"8f8018c0", "59403279", "dfee9fb4", "e1ae2f40"}
    assert [d.reasons for d in decisions if d.keep] == [
        ("daily #1 (2019-11-17)",),
        ("daily #2 (2019-11-10)",),
        ("daily #3 (2019-11-03)",),
        ("daily #4 (2019-10-27)",),
    ]
    assert {d.reasons for d in decisions if not d.keep} == {("older than the 4 daily periods kept",)}


def test_keep_daily_7_over_30_days_with_extra_points_the_same_day():
    # d01..d30: 2026-11-01 .. 2026-11-30 at 02:00 UTC. Extra points: n30 2026-11-30 14:00, m28 2026-11-28 10:00,
    # n28 2026-11-28 23:00. By hand: the 7 latest days with points are 30 .. 24; the newest of each is n30, d29,
    # n28, d27, d26, d25, d24. d30 and d28, m28 go for a newer point of their day, d01 .. d23 are too old.
    points = [Candidate(f"d{day:02d}", "vm", at(f"2026-11-{day:02d} 02:00")) for day in range(1, 31)]
    points += [
        Candidate("n30", "vm", at("2026-11-30 14:00")),
        Candidate("m28", "vm", at("2026-11-28 10:00")),
        Candidate("n28", "vm", at("2026-11-28 23:00")),
    ]
    decisions = by_id(decide(points, Rules(keep_daily=7), UTC))
    assert {i for i, d in decisions.items() if d.keep} == {"n30", "d29", "n28", "d27", "d26", "d25", "d24"}
    assert decisions["n30"].reasons == ("daily #1 (2026-11-30)",)
    assert decisions["n28"].reasons == ("daily #3 (2026-11-28)",)
    assert decisions["d24"].reasons == ("daily #7 (2026-11-24)",)
    assert decisions["d30"].reasons == ("daily 2026-11-30 is kept by newer point n30",)
    assert decisions["d28"].reasons == ("daily 2026-11-28 is kept by newer point n28",)
    assert decisions["m28"].reasons == ("daily 2026-11-28 is kept by newer point n28",)
    assert decisions["d23"].reasons == ("older than the 7 daily periods kept",)
    assert decisions["d24"].line() == "keep   d24  vm  2026-11-24T02:00:00+00:00  daily #7 (2026-11-24)"
    assert decisions["d30"].line() == (
        "remove d30  vm  2026-11-30T02:00:00+00:00  daily 2026-11-30 is kept by newer point n30"
    )


def test_keep_weekly_4_across_the_iso_year_boundary():
    # One point a day at 12:00 UTC from Monday 2026-12-07 to Sunday 2027-01-10. ISO weeks (datetime.isocalendar):
    # 2026-W50 = 12-07 .. 12-13, W51 = 12-14 .. 12-20, W52 = 12-21 .. 12-27, 2026-W53 = 12-28 .. 2027-01-03
    # (2026 has 53 ISO weeks: 2027-01-01..03 belong to ISO year 2026), 2027-W01 = 01-04 .. 01-10.
    # By hand, weekly 4 keeps each week's Sunday: 2027-01-10, 2027-01-03, 2026-12-27, 2026-12-20; W50 is too old.
    start = datetime(2026, 12, 7, 12, tzinfo=UTC)
    days = [start + timedelta(days=k) for k in range(35)]
    points = [Candidate(day.date().isoformat(), "vm", day) for day in days]
    assert datetime(2027, 1, 1).isocalendar()[:2] == (2026, 53)
    decisions = by_id(decide(points, Rules(keep_weekly=4), UTC))
    assert {i for i, d in decisions.items() if d.keep} == {"2027-01-10", "2027-01-03", "2026-12-27", "2026-12-20"}
    assert decisions["2027-01-10"].reasons == ("weekly #1 (2027-W01)",)
    assert decisions["2027-01-03"].reasons == ("weekly #2 (2026-W53)",)
    assert decisions["2026-12-27"].reasons == ("weekly #3 (2026-W52)",)
    assert decisions["2026-12-20"].reasons == ("weekly #4 (2026-W51)",)
    assert decisions["2027-01-01"].reasons == ("weekly 2026-W53 is kept by newer point 2027-01-03",)
    assert decisions["2026-12-28"].reasons == ("weekly 2026-W53 is kept by newer point 2027-01-03",)
    assert decisions["2026-12-13"].reasons == ("older than the 4 weekly periods kept",)


def test_keep_monthly_3_and_keep_yearly_2():
    # Points (UTC, 12:00): a 2024-12-10, b 2025-03-01, c 2025-11-20, e 2025-12-05, f 2025-12-24, g 2026-01-15,
    # h 2026-02-01, i 2026-02-20. By hand: monthly 3 keeps the newest of 2026-02, 2026-01, 2025-12 = i, g, f;
    # yearly 2 keeps the newest of 2026 and 2025 = i, f. Kept: i, g, f. h and e go for a newer point of their
    # month; b and c: their month is beyond the 3 kept, their year 2025 is kept by f; a is beyond both rules.
    dates = {"a": "2024-12-10", "b": "2025-03-01", "c": "2025-11-20", "e": "2025-12-05", "f": "2025-12-24",
             "g": "2026-01-15", "h": "2026-02-01", "i": "2026-02-20"}  # fmt: skip
    points = [Candidate(i, "vm", at(f"{d} 12:00")) for i, d in dates.items()]
    decisions = decide(points, Rules(keep_monthly=3, keep_yearly=2), UTC)
    assert [(d.id, d.keep, d.reasons) for d in decisions] == [
        ("i", True, ("monthly #1 (2026-02)", "yearly #1 (2026)")),
        ("h", False, ("monthly 2026-02 is kept by newer point i",)),
        ("g", True, ("monthly #2 (2026-01)",)),
        ("f", True, ("monthly #3 (2025-12)", "yearly #2 (2025)")),
        ("e", False, ("monthly 2025-12 is kept by newer point f",)),
        ("c", False, ("yearly 2025 is kept by newer point f",)),
        ("b", False, ("yearly 2025 is kept by newer point f",)),
        ("a", False, ("older than the 3 monthly, 2 yearly periods kept",)),
    ]


def test_keep_last_2_and_keep_daily_2_overlapping():
    # p1 2026-11-30 18:00, p2 2026-11-30 06:00, p3 2026-11-29 18:00, p4 2026-11-28 18:00 (UTC).
    # By hand: last 2 = p1, p2; daily 2 = newest of 11-30 and 11-29 = p1, p3. p1 is kept by both rules.
    points = [
        Candidate("p1", "vm", at("2026-11-30 18:00")),
        Candidate("p2", "vm", at("2026-11-30 06:00")),
        Candidate("p3", "vm", at("2026-11-29 18:00")),
        Candidate("p4", "vm", at("2026-11-28 18:00")),
    ]
    decisions = decide(points, Rules(keep_last=2, keep_daily=2), UTC)
    assert [(d.id, d.keep, d.reasons) for d in decisions] == [
        ("p1", True, ("last #1", "daily #1 (2026-11-30)")),
        ("p2", True, ("last #2",)),
        ("p3", True, ("daily #2 (2026-11-29)",)),
        ("p4", False, ("older than the last 2 points and the 2 daily periods kept",)),
    ]
    assert decisions[0].line() == "keep   p1  vm  2026-11-30T18:00:00+00:00  last #1, daily #1 (2026-11-30)"


def test_days_are_the_repository_time_zone_days():
    # late 2026-11-29T23:30Z is 2026-11-30 00:30 in Berlin (CET, +01:00); early 2026-11-29T22:30Z is 23:30 on the
    # 29th there. In Berlin they are two days, both kept by daily 2; in UTC one day, where only the newer is kept.
    points = [Candidate("late", "vm", at("2026-11-29 23:30")), Candidate("early", "vm", at("2026-11-29 22:30"))]
    berlin = decide(points, Rules(keep_daily=2), BERLIN)
    assert [(d.id, d.keep, d.reasons) for d in berlin] == [
        ("late", True, ("daily #1 (2026-11-30)",)),
        ("early", True, ("daily #2 (2026-11-29)",)),
    ]
    assert berlin[0].line() == "keep   late  vm  2026-11-30T00:30:00+01:00  daily #1 (2026-11-30)"
    utc = decide(points, Rules(keep_daily=2), UTC)
    assert [(d.id, d.keep, d.reasons) for d in utc] == [
        ("late", True, ("daily #1 (2026-11-29)",)),
        ("early", False, ("daily 2026-11-29 is kept by newer point late",)),
    ]


def test_clock_changes_in_berlin():
    # 2026-10-25 03:00 CEST becomes 02:00 CET: 00:15Z is 02:15 CEST and 01:15Z is 02:15 CET, the same wall-clock
    # hour "02:00" (one period, as in restic). 2026-03-29 02:00 CET becomes 03:00 CEST: 00:59Z is 01:59 CET,
    # 01:00Z is 03:00 CEST, two periods.
    points = [
        Candidate("first-0215", "vm", at("2026-10-25 00:15")),
        Candidate("second-0215", "vm", at("2026-10-25 01:15")),
        Candidate("before-gap", "vm", at("2026-03-29 00:59")),
        Candidate("after-gap", "vm", at("2026-03-29 01:00")),
    ]
    decisions = by_id(decide(points, Rules(keep_hourly=-1), BERLIN))
    assert decisions["second-0215"].reasons == ("hourly #1 (2026-10-25 02:00)",)
    assert decisions["first-0215"].reasons == ("hourly 2026-10-25 02:00 is kept by newer point second-0215",)
    assert decisions["after-gap"].reasons == ("hourly #2 (2026-03-29 03:00)",)
    assert decisions["before-gap"].reasons == ("hourly #3 (2026-03-29 01:00)",)
    # keep_within across the spring change: one wall-clock day back from 2026-03-29 12:00 CEST (10:00Z) is
    # 2026-03-28 12:00 CET (11:00Z), 23 hours of elapsed time; 24h back is 2026-03-28 11:00 CET (10:00Z). A point
    # 23h30 of elapsed time older (10:30Z) is outside 1d but inside 24h.
    newest = at("2026-03-29 12:00", BERLIN)
    assert Duration.parse("1d").before(newest) == at("2026-03-28 12:00", BERLIN)
    assert Duration.parse("24h").before(newest) == at("2026-03-28 11:00", BERLIN)
    older = newest.astimezone(UTC) - timedelta(hours=23, minutes=30)
    within = [Candidate("newest", "vm", newest), Candidate("23h30", "vm", older)]
    assert kept(decide(within, Rules(keep_within=Duration.parse("1d")), BERLIN)) == {"newest"}
    assert kept(decide(within, Rules(keep_within=Duration.parse("24h")), BERLIN)) == {"newest", "23h30"}


def test_restic_and_not_proxmox_backup_server_semantics():
    # One point a day at 12:00 UTC, 2026-11-21 .. 2026-11-30, keep-last 3 and keep-daily 2.
    # restic (implemented here): every option looks at all points; last 3 = 30, 29, 28; daily 2 = 30, 29, both
    #   already kept: 3 points are kept.
    # Proxmox Backup Server: the options are processed in the order last, hourly, daily, ... and each one skips
    #   the periods of the points already kept, considering only older ones: last 3 = 30, 29, 28, then daily 2 =
    #   27, 26: 5 points would be kept. That mode is not implemented.
    points = [Candidate(f"2026-11-{day}", "vm", at(f"2026-11-{day} 12:00")) for day in range(21, 31)]
    decisions = decide(points, Rules(keep_last=3, keep_daily=2), UTC)
    proxmox_backup_server = {"2026-11-30", "2026-11-29", "2026-11-28", "2026-11-27", "2026-11-26"}
    assert kept(decisions) == {"2026-11-30", "2026-11-29", "2026-11-28"}
    assert kept(decisions) != proxmox_backup_server
    assert by_id(decisions)["2026-11-27"].reasons == ("older than the last 3 points and the 2 daily periods kept",)


def test_restic_documentation_100_years_of_daily_points():
    # restic's page: one backup a day for 100 years, `--keep-daily 7 --keep-weekly 5 --keep-monthly 12
    # --keep-yearly 75` keeps 7 dailies, 4 more weeklies (the 7 dailies include one), 11 or 12 more monthlies and
    # 74 or 75 more yearlies. Here, ending on Sunday 2026-11-29: dailies 11-23 .. 11-29; weeklies 11-29 (a daily),
    # 11-22, 11-15, 11-08, 11-01; monthlies 11-29 (a daily), 2026-10-31 .. 2025-12-31 (11 more); yearlies
    # 11-29 and 2025-12-31 (both kept already), 2024-12-31 .. 1952-12-31 (73 more): 7 + 4 + 11 + 73 = 95 points.
    end = datetime(2026, 11, 29, 12, tzinfo=UTC)
    points = [Candidate(f"p{k:05d}", "vm", end - timedelta(days=k)) for k in range(100 * 365 + 25)]
    decisions = decide(points, Rules(keep_daily=7, keep_weekly=5, keep_monthly=12, keep_yearly=75), UTC)
    kept_points = [d for d in decisions if d.keep]
    assert len(kept_points) == 95
    for label, count in (("daily", 7), ("weekly", 5), ("monthly", 12), ("yearly", 75)):
        assert sum(r.startswith(f"{label} #") for d in kept_points for r in d.reasons) == count
    assert kept_points[-1].time == datetime(1952, 12, 31, 12, tzinfo=UTC)
    assert kept_points[-1].reasons == ("yearly #75 (1952)",)


def test_keep_within_is_relative_to_each_vms_newest_point():
    # vm-old stopped being backed up in 2025; within 30d keeps its last month, not nothing.
    points = [
        Candidate("old-1", "vm-old", at("2025-03-10 00:00")),
        Candidate("old-2", "vm-old", at("2025-02-08 00:00")),
        Candidate("old-3", "vm-old", at("2025-02-07 23:59")),
        Candidate("new-1", "vm-new", at("2026-11-30 00:00")),
        Candidate("new-2", "vm-new", at("2026-10-31 00:00")),
    ]
    decisions = decide(points, Rules(keep_within=Duration.parse("30d")), UTC)
    assert [(d.vm, d.id, d.keep) for d in decisions] == [
        ("vm-new", "new-1", True),
        ("vm-new", "new-2", True),  # exactly 30 days before the newest: kept
        ("vm-old", "old-1", True),
        ("vm-old", "old-2", True),  # 2025-03-10 minus 30 days (February has 28) is 2025-02-08
        ("vm-old", "old-3", False),
    ]
    assert by_id(decisions)["old-3"].reasons == ("older than 30d before the newest point",)
    assert by_id(decisions)["old-1"].reasons == ("within 30d",)


def test_protected_point_reason_and_line():
    points = [
        Candidate("new", "vm", at("2026-11-30 12:00")),
        Candidate("held", "vm", at("2026-01-01 12:00"), protected=True, hold="until 2027-01-31"),
        Candidate("bare", "vm", at("2025-01-01 12:00"), protected=True),
    ]
    decisions = decide(points, Rules(keep_last=1), UTC)
    assert [(d.id, d.reasons) for d in decisions] == [
        ("new", ("last #1",)),
        ("held", ("protected until 2027-01-31",)),
        ("bare", ("protected",)),
    ]
    assert decisions[1].line() == "keep   held  vm  2026-01-01T12:00:00+00:00  protected until 2027-01-31"


def test_line_stays_one_line_with_hostile_names():
    points = [Candidate("a\nb", "vm\r\x1b[31m", at("2026-11-30 12:00"), protected=True, hold="x\ny")]
    (d,) = decide(points, Rules(keep_last=1), UTC)
    assert d.reasons == ("last #1", "protected x\ny")
    assert d.line() == "keep   a\\nb  vm\\r\\x1b[31m  2026-11-30T12:00:00+00:00  last #1, protected x\\ny"


def test_no_points_no_decisions():
    assert decide([], Rules(keep_last=1), UTC) == []


# -- durations ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("1y6m", Duration(years=1, months=6), "1y6m"),
        ("30d", Duration(days=30), "30d"),
        ("36h", Duration(hours=36), "36h"),
        ("2w", Duration(days=14), "14d"),
        ("1w2d", Duration(days=9), "9d"),
        ("1y2m3d4h", Duration(1, 2, 3, 4), "1y2m3d4h"),
        ("2y5m7d3h", Duration(2, 5, 7, 3), "2y5m7d3h"),
        (" 7d ", Duration(days=7), "7d"),
        ("0d", Duration(), "0d"),
    ],
)
def test_duration_parse_good_forms(text, expected, canonical):
    assert Duration.parse(text) == expected
    assert str(Duration.parse(text)) == canonical
    assert Duration.parse(canonical) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "3x", "d", "-1d", "1.5d", "1d2y", "1d1d", "1 d", "30", "1D", "+1d", "٣d", "1e3d", "1234567890d"]
)
def test_duration_parse_bad_forms_name_the_text(text):
    with pytest.raises(ValueError) as caught:
        Duration.parse(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "\n" not in message


@given(st.builds(Duration, st.integers(0, 99), st.integers(0, 99), st.integers(0, 9999), st.integers(0, 9999)))
def test_duration_text_reads_back(d):
    assert Duration.parse(str(d)) == d


def test_duration_refuses_negative_parts():
    with pytest.raises(ValueError, match="days: must be >= 0"):
        Duration(days=-1)


@pytest.mark.parametrize(
    ("moment", "text", "expected"),
    [
        ("2026-03-31 10:00", "1m", "2026-02-28 10:00"),
        ("2028-03-31 10:00", "1m", "2028-02-29 10:00"),
        ("2026-05-31 10:00", "1m", "2026-04-30 10:00"),
        ("2028-02-29 10:00", "1y", "2027-02-28 10:00"),
        ("2026-03-31 10:00", "1y1m", "2025-02-28 10:00"),
        ("2026-01-01 02:00", "3h", "2025-12-31 23:00"),
        ("2026-03-01 00:00", "1d", "2026-02-28 00:00"),
        ("2026-11-30 12:00", "2w", "2026-11-16 12:00"),
    ],
)
def test_duration_before_is_calendar_aware(moment, text, expected):
    assert Duration.parse(text).before(at(moment)) == at(expected)
    assert Duration.parse(text).before(at(moment, BERLIN)) == at(expected, BERLIN)


def test_duration_before_the_earliest_time_is_clamped():
    assert Duration.parse("999999999y").before(at("2026-11-30 12:00")) == datetime.min.replace(tzinfo=UTC)
    points = [Candidate("a", "vm", at("2026-11-30 12:00")), Candidate("b", "vm", datetime(1, 1, 2, tzinfo=UTC))]
    assert kept(decide(points, Rules(keep_within=Duration.parse("999999y")), BERLIN)) == {"a", "b"}


# -- refusals -----------------------------------------------------------------------------------------------------


def test_empty_rules_are_refused():
    assert Rules().empty()
    assert not Rules(keep_within=Duration(hours=1)).empty()
    points = [Candidate("a", "vm", at("2026-11-30 12:00"))]
    with pytest.raises(ValueError, match=r"^retention: no keep_\* rule set; refusing to remove every point$"):
        decide(points, Rules(), UTC)
    with pytest.raises(ValueError, match="no keep_"):
        decide([], Rules(), UTC)


@pytest.mark.parametrize("field", COUNT_FIELDS)
@pytest.mark.parametrize("value", [0, -2, -100])
def test_counts_out_of_range_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError) as caught:
        Rules(**{field: value})
    assert str(caught.value) == f"{field}: must be >= 1 or -1 (got {value})"


@pytest.mark.parametrize("value", [True, 1.0, "3"])
def test_counts_must_be_integers(value):
    with pytest.raises(ValueError, match="keep_daily: must be an integer"):
        Rules(keep_daily=value)


def test_keep_within_must_be_a_nonzero_duration():
    with pytest.raises(ValueError, match="keep_within: must be longer than 0"):
        Rules(keep_within=Duration())
    with pytest.raises(ValueError, match="keep_within: must be a Duration"):
        Rules(keep_within="30d")


def test_describe():
    r = Rules(keep_last=3, keep_daily=7, keep_weekly=4, keep_within=Duration.parse("30d"))
    assert r.describe() == "last 3, daily 7, weekly 4, within 30d"
    assert Rules(keep_hourly=-1, keep_yearly=2).describe() == "hourly unlimited, yearly 2"
    assert Rules().describe() == "no rule"


def test_naive_times_and_repeated_ids_are_refused():
    with pytest.raises(ValueError, match="has no time zone"):
        Candidate("a", "vm", datetime(2026, 11, 30, 12))
    points = [Candidate("a", "vm-1", at("2026-11-30 12:00")), Candidate("a", "vm-2", at("2026-11-29 12:00"))]
    with pytest.raises(ValueError, match="'a' given twice"):
        decide(points, Rules(keep_last=1), UTC)


def test_decide_refuses_a_missing_time_zone():
    with pytest.raises(TypeError, match="tz must be a tzinfo"):
        decide([], Rules(keep_last=1), None)  # type: ignore[arg-type]
