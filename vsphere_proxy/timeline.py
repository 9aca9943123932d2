"""A backup window as a picture's data: one lane per proxy, one bar per stream (a disk of a VM attempt read over
[start, end)), the active streams of every datastore over time against the threshold, the summary, and the
decisions behind every bar. Built from a simulation (`from_simulation`) or from a real job in the catalog
(`from_job`); `report_html` draws it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MODES = ("san", "direct-nfs", "hotadd", "nbd")


@dataclass(frozen=True, slots=True)
class Bar:
    vm: str
    disk: int
    proxy: str
    mode: str
    datastore: str
    round: int
    attempt: int
    start: float  # seconds from the window's start
    end: float
    outcome: str  # read | failed | aborted
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Lane:
    proxy: str
    limit: int  # the proxy's stream limit (max_streams)


@dataclass(frozen=True, slots=True)
class Note:
    """One decision of the coordinator about a VM (or the job), with its reason."""

    round: int
    verdict: str
    vm: str | None
    proxy: str | None
    reason: str


@dataclass(frozen=True)
class Timeline:
    title: str
    kind: str  # simulation | job
    lanes: tuple[Lane, ...]
    bars: tuple[Bar, ...]
    threshold: int
    datastore_cap: int
    summary: Mapping[str, Any]
    notes: tuple[Note, ...] = ()
    recovered: tuple[str, ...] = field(default=())  # VMs stranded, then backed up in a later round

    @property
    def makespan(self) -> float:
        return max((b.end for b in self.bars), default=0.0)

    def notes_by_vm(self) -> dict[str, list[int]]:
        by: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.notes):
            if n.vm:
                by[n.vm].append(i)
        return dict(by)


def concurrency(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, int]]:
    """Step function of how many intervals are open: (time, count from then on), ends before starts at a tie."""
    spans = list(intervals)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    out: list[tuple[float, int]] = []
    n = 0
    for t, d in events:
        n += d
        if out and out[-1][0] == t:
            out[-1] = (t, n)
        else:
            out.append((t, n))
    return out


def peak(intervals: Iterable[tuple[float, float]]) -> int:
    return max((n for _, n in concurrency(intervals)), default=0)


def datastore_load(bars: Sequence[Bar]) -> dict[str, list[tuple[float, int]]]:
    """Active streams of every datastore over time."""
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for b in bars:
        by[b.datastore].append((b.start, b.end))
    return {ds: concurrency(iv) for ds, iv in sorted(by.items())}


def slots(bars: Sequence[Bar]) -> list[int]:
    """A row within its lane for every bar, so that bars of one lane never overlap: greedy interval partitioning
    (the rows a lane needs = its peak of concurrent streams)."""
    out = [0] * len(bars)
    by_lane: dict[str, list[int]] = defaultdict(list)
    for i, b in enumerate(bars):
        by_lane[b.proxy].append(i)
    for idx in by_lane.values():
        free_at: list[float] = []  # row -> when it frees
        for i in sorted(idx, key=lambda i: (bars[i].start, bars[i].end)):
            b = bars[i]
            row = next((r for r, t in enumerate(free_at) if t <= b.start), None)
            if row is None:
                row = len(free_at)
                free_at.append(b.end)
            else:
                free_at[row] = b.end
            out[i] = row
    return out


def recovered_vms(bars: Sequence[Bar]) -> tuple[str, ...]:
    """VMs with a failed or aborted attempt and a later attempt that read every disk it had."""
    bad: set[str] = set()
    good: dict[str, int] = {}
    first_bad: dict[str, int] = {}
    for b in bars:
        if b.outcome in ("failed", "aborted"):
            bad.add(b.vm)
            first_bad[b.vm] = min(first_bad.get(b.vm, b.attempt), b.attempt)
        else:
            good[b.vm] = max(good.get(b.vm, 0), b.attempt)
    return tuple(sorted(vm for vm in bad if good.get(vm, 0) > first_bad[vm]))


def from_simulation(comparison: Any, strategy: str = "scheduler") -> Timeline:
    """The timeline of one strategy's run of a `simulator.Comparison` made with `keep_segments=True`."""
    run = next(r for r in comparison.runs if r.strategy == strategy)
    scenario = comparison.scenario
    sizes = {(v.name, d.index): d.bytes for v in scenario.vms for d in v.disks}
    bars = tuple(Bar(s.vm, s.disk, s.proxy, s.mode, s.datastore, s.round, s.attempt, s.start, s.end, s.outcome,
                     sizes.get((s.vm, s.disk), 0) if s.outcome == "read" else 0) for s in run.segments)
    lanes = tuple(Lane(p.name, run.proxy_limits.get(p.name, 0)) for p in scenario.proxies)
    notes = tuple(Note(d.round, d.verdict, d.vm, d.proxy, d.reason) for d in run.decisions
                  if d.verdict not in ("skip", "wait"))
    bound = comparison.bound.seconds
    summary = {
        "scenario": scenario.name, "strategy": strategy, "status": run.status,
        "makespan_s": round(run.makespan_s, 1), "lower_bound_s": round(bound, 1),
        "ratio_to_lower_bound": round(run.makespan_s / bound, 3) if bound else None,
        "vms": len(scenario.vms), "done": run.done, "rounds": run.rounds,
        "bytes_read": sum(b.bytes for b in bars), "threshold_raises": run.threshold_raises,
        "stranded": {vm: _last_strand(run.decisions, vm) for vm in run.stranded},
        "failed": dict(run.errors), "fell_back": dict(run.fell_back),
        "baselines": {r.strategy: round(r.makespan_s, 1) for r in comparison.runs if r.strategy != strategy},
    }
    return Timeline(f"{scenario.name}: simulated backup window ({strategy})", "simulation", lanes, bars,
                    scenario.policy.threshold, scenario.policy.datastore_cap, summary, notes, recovered_vms(bars))


def _last_strand(decisions: Sequence[Any], vm: str) -> str:
    return next((d.reason for d in reversed(decisions) if d.vm == vm and d.verdict == "strand"), "")


def from_job(catalog: Any, job_id: str) -> Timeline:
    """The timeline of a job that ran (or runs), from the catalog: its streams, limits, policy and decisions."""
    job = catalog.job(job_id)
    if job is None:
        raise KeyError(job_id)
    rows = catalog.streams(job_id)
    origin = min((r.started for r in rows), default=job.started)
    bars = tuple(Bar(r.vm, r.disk, r.proxy, r.mode, r.datastore, r.round, r.attempt,
                     (r.started - origin).total_seconds(), max((r.ended - origin).total_seconds(),
                                                               (r.started - origin).total_seconds()),
                     r.outcome, r.bytes) for r in rows)
    summary: Mapping[str, Any] = job.summary or {}
    policy: Mapping[str, Any] = job.policy or {}
    limits: Mapping[str, int] = summary.get("stream_limits") or {}
    names = list(limits) + sorted({b.proxy for b in bars} - set(limits))
    lanes = tuple(Lane(p, int(limits.get(p, 0))) for p in names)
    stranded: dict[str, str] = {}
    for r in catalog.results(job_id):
        if r.status == "stranded":
            stranded[r.vm] = f"attempt {r.attempt} on {r.proxy} ({r.mode}) in round {r.round}: {r.error}"
    counts = summary.get("counts") or {}
    read, written = summary.get("bytes_read"), summary.get("bytes_written")
    makespan = max((b.end for b in bars), default=0.0)
    info = {
        "job": job.id, "engine": job.engine, "status": job.status, "makespan_s": round(makespan, 1),
        "vms": sum(counts.values()) if counts else None, "done": counts.get("done"), "rounds": job.rounds,
        "bytes_read": read, "bytes_written": written,
        "dedup_ratio": round(read / written, 2) if read and written else None,
        "stranded": stranded, "failed": dict(summary.get("not_backed_up") or {}),
        "fell_back": dict(summary.get("fell_back") or {}),
    }
    notes = tuple(Note(d.round, d.verdict, d.vm, d.proxy, d.reason) for d in catalog.decisions(job_id)
                  if d.verdict not in ("skip", "wait"))
    return Timeline(f"{job.name}: backup job {job.id} ({job.status})", "job", lanes, bars,
                    int(policy.get("threshold", 1)), int(policy.get("datastore_cap", 4)), info, notes,
                    recovered_vms(bars))
