"""The backup-window simulator: a discrete-event run of a scenario through the real `Coordinator`.

The coordinator is the product's, unchanged; only the executor is simulated. Every stream reads its disk at
the per-stream rate of its proxy and access mode, and streams on one datastore (or one proxy with a ceiling)
share its bandwidth max-min fairly. Events are stream ends, injected attempt failures and proxies going down;
between events every rate is constant, so the run is exact, not time-stepped.

`SimulatedEngine` is that executor behind the `Engine` protocol: it reports every event to a `JobObserver`, as
the embedded and Celery engines do. `lower_bound` is what no schedule can beat; `simulate` runs one strategy
through it; `compare` runs the scheduler and the baselines side by side.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vsphere_proxy.coordinator import (
    STRATEGIES,
    Assignment,
    Coordinator,
    Decision,
    Job,
    JobReport,
    VmStatus,
    WorkVM,
)
from vsphere_proxy.engine.embedded import Stop, describe
from vsphere_proxy.engine.events import AttemptEnd, StreamResult
from vsphere_proxy.engine.protocol import JobObserver, Observer
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.scenario import Scenario
from vsphere_proxy.scheduler import max_streams
from vsphere_proxy.timeline import Bar as Segment  # one stream over [start, end): what a report draws

__all__ = [
    "BASELINES",
    "EPS",
    "Comparison",
    "LowerBound",
    "Segment",
    "SimResult",
    "SimulatedEngine",
    "Window",
    "allocate",
    "compare",
    "lower_bound",
    "simulate",
]

log = logging.getLogger(__name__)

EPS = 1e-9


@dataclass(frozen=True)
class LowerBound:
    """max(total bytes / aggregate bandwidth, busiest datastore's bytes / its cap, slowest single disk at its
    best path). Aggregate bandwidth is the least of: every proxy's streams at its fastest mode, the job limit's
    streams at the fastest rate anywhere, and the sum of datastore caps: each bounds the throughput."""

    aggregate_s: float
    busiest_datastore_s: float
    busiest_datastore: str
    largest_disk_s: float
    largest_disk: str

    @property
    def seconds(self) -> float:
        return max(self.aggregate_s, self.busiest_datastore_s, self.largest_disk_s)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "aggregate_bandwidth_s": round(self.aggregate_s, 1),
                "busiest_datastore_s": round(self.busiest_datastore_s, 1), "busiest_datastore": self.busiest_datastore,
                "largest_disk_s": round(self.largest_disk_s, 1), "largest_disk": self.largest_disk}


def lower_bound(scenario: Scenario) -> LowerBound:
    job = _job(scenario)
    limits = {p.name: max_streams(p, scenario.policy.formula) for p in scenario.proxies}
    reachable = [v for v in scenario.vms if scenario.table.best_tier(v.name) is not None]
    total = sum(v.total_bytes for v in reachable)

    def fastest(proxy: str) -> float:
        rate = max((r for (p, _), r in scenario.rates.items() if p == proxy), default=0.0)
        return min(rate, scenario.proxy_caps.get(proxy, rate))

    per_proxy = sum(limits[p.name] * fastest(p.name) for p in scenario.proxies)
    per_job = job.limit * max((fastest(p.name) for p in scenario.proxies), default=0.0)
    bandwidth = min(per_proxy, per_job, sum(scenario.datastore_caps.values()))
    by_ds: Counter[str] = Counter()
    for vm in reachable:
        for d in vm.disks:
            by_ds[d.datastore] += d.bytes
    busiest = max(by_ds, key=lambda ds: by_ds[ds] / scenario.datastore_caps[ds], default="")
    largest, largest_name = 0.0, ""
    for vm in reachable:
        paths = [c for c in scenario.table.for_vm(vm.name) if c.tier is not None and c.mode is not None]
        for d in vm.disks:
            best = max(min(scenario.rate(c.proxy, c.mode), scenario.proxy_caps.get(c.proxy, float("inf")),
                           scenario.datastore_caps[d.datastore]) for c in paths)
            if d.bytes / best > largest:
                largest, largest_name = d.bytes / best, f"{vm.name} disk {d.index}"
    return LowerBound(total / bandwidth if bandwidth else float("inf"),
                      by_ds[busiest] / scenario.datastore_caps[busiest] if busiest else 0.0, busiest,
                      largest, largest_name)


@dataclass(frozen=True)
class SimResult:
    scenario: str
    strategy: str
    makespan_s: float
    status: str
    rounds: int
    threshold_raises: int
    proxy_peak: dict[str, int]
    proxy_mean: dict[str, float]
    datastore_peak: dict[str, int]
    stranded: tuple[str, ...]  # stranded at least once
    failed: tuple[str, ...]  # reported failed or unprotected at the end, with their errors
    errors: dict[str, str]
    done: int
    lost: tuple[str, ...]  # neither backed up nor reported: must stay empty
    fell_back: dict[str, str]
    segments: tuple[Segment, ...] = field(repr=False, default=())
    decisions: tuple[Decision, ...] = field(repr=False, default=())  # kept with the segments
    proxy_limits: dict[str, int] = field(default_factory=dict)

    def to_json(self, bound: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy, "makespan_s": round(self.makespan_s, 1), "status": self.status,
            "rounds": self.rounds, "done": self.done, "stranded": list(self.stranded), "failed": list(self.failed),
            "errors": self.errors, "lost": list(self.lost), "threshold_raises": self.threshold_raises,
            "proxies": {p: {"peak_streams": self.proxy_peak[p], "mean_streams": round(self.proxy_mean[p], 2)}
                        for p in self.proxy_peak},
            "datastores": {ds: {"peak_streams": n} for ds, n in self.datastore_peak.items()},
            "fell_back": self.fell_back,
        }
        if bound:
            out["ratio_to_lower_bound"] = round(self.makespan_s / bound, 3)
        return out


def _job(scenario: Scenario) -> Job:
    return Job(scenario.name, scenario.vms, scenario.table, scenario.proxies, scenario.policy)


def allocate(demands: Sequence[float], uses: Sequence[Sequence[str]], caps: dict[str, float]) -> list[float]:
    """Max-min fair rates by progressive filling: every flow rises together until it reaches its own demand
    or one of the shared resources it uses is full."""
    rates = [0.0] * len(demands)
    left = dict(caps)
    active = set(range(len(demands)))
    while active:
        users: Counter[str] = Counter(r for i in active for r in uses[i] if r in left)
        step = min(demands[i] - rates[i] for i in active)
        if users:
            step = min(step, min(left[r] / n for r, n in users.items()))
        for i in active:
            rates[i] += step
            for r in uses[i]:
                if r in left:
                    left[r] -= step
        full = {r for r, v in left.items() if v <= EPS * max(1.0, caps[r])}
        active = {i for i in active if demands[i] - rates[i] > EPS * max(1.0, demands[i])
                  and not any(r in full for r in uses[i])}
    return rates


@dataclass(slots=True)
class _Flow:
    """One stream as it runs: what it reads, how much is left, how fast it may go."""

    a: Assignment
    datastore: str
    size: float  # the disk's bytes
    remaining: float
    start: float
    fail_left: float | None  # bytes until this attempt fails, when it is a failing one
    demand: float  # the stream's own rate: its proxy's for its mode, within the proxy's ceiling
    uses: tuple[str, str]  # the shared resources it reads through: its datastore, its proxy
    done_eps: float  # what is left of the disk when it counts as read
    rate: float = 0.0

    def read(self) -> float:
        """The bytes read so far."""
        return min(self.size, max(0.0, self.size - self.remaining))


@dataclass(slots=True)
class _Open:
    """One VM attempt while its streams run."""

    a: Assignment  # the assignment that opened it
    started: float
    bytes: float = 0.0  # read by its streams that ended
    disks_read: int = 0


@dataclass(frozen=True)
class Window:
    """What one simulated run measured beside the job's report: how long it took, the most streams that ran at
    once on each proxy and each datastore, and the stream-seconds each proxy ran."""

    seconds: float
    proxy_peak: dict[str, int]
    datastore_peak: dict[str, int]
    busy_s: dict[str, float]


class _Guarded(Observer):
    """An observer whose errors are kept instead of raised: the engine ends the job on the first one (DESIGN §9)
    and goes on reporting to it while the job ends."""

    def __init__(self, inner: JobObserver) -> None:
        self.inner = inner
        self.error: BaseException | None = None

    def _failed(self, exc: Exception, event: str) -> None:
        if self.error is None:
            self.error = exc
        else:
            log.warning("observer failed again on %s: %s", event, describe(exc))

    def assignment_started(self, assignment: Assignment) -> None:
        try:
            self.inner.assignment_started(assignment)
        except Exception as e:
            self._failed(e, "assignment_started")

    def stream_ended(self, assignment: Assignment, result: StreamResult) -> None:
        try:
            self.inner.stream_ended(assignment, result)
        except Exception as e:
            self._failed(e, "stream_ended")

    def attempt_ended(self, end: AttemptEnd) -> None:
        try:
            self.inner.attempt_ended(end)
        except Exception as e:
            self._failed(e, "attempt_ended")

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        try:
            self.inner.states_changed(coordinator, vms)
        except Exception as e:
            self._failed(e, "states_changed")

    def proxy_lost(self, proxy: str, vms: Sequence[str]) -> None:
        try:
            self.inner.proxy_lost(proxy, vms)
        except Exception as e:
            self._failed(e, "proxy_lost")


class SimulatedEngine:
    """An `Engine` whose proxies, datastores and clock are simulated by `scenario`'s physics: a discrete-event run
    of the coordinator's job (the coordinator itself is the product's).

    Every stream reads its disk at the per-stream rate of its proxy and access mode; streams on one datastore (or
    one proxy with a ceiling) share its bandwidth max-min fairly (`allocate`). Events are stream ends, the
    scenario's injected attempt failures (a VM's first `fails` attempts fail after `after_fraction` of the disk
    their first stream reads) and proxies going down at their times. Between events every rate is constant, so
    the run is exact, not time-stepped. The disks read are the coordinator's job's; the scenario gives the rates,
    the caps and the failures.

    What the observer hears, all times in simulated seconds from the start of the run:
    - `assignment_started` for every assignment that opens an attempt, before its stream runs;
    - `stream_ended` for every stream as it ends: its disk read (`disk_done`), its own injected failure
      (`failed`), or aborted (neither) because its attempt ended on another stream, its proxy went down or the
      job ended early; `bytes` is what it read. The stream that ends its attempt carries the attempt's end;
    - `attempt_ended` after the coordinator took the end in (`on_complete`, `on_proxy_down` or `abort`):
      `seconds` simulated, nothing written (`bytes_written` 0, `point_id` None, no notes);
    - `states_changed` after every event that changed where VMs stand (every VM of the job when a round began,
      a proxy went down or the job ended);
    - `proxy_lost` when a proxy that ran attempts goes down, with those VMs, before the coordinator strands them;
    - no `block_read`: the simulator moves no blocks.

    After `run`, `window` holds what the run measured and `stopped` why it ended early, if it did.
    """

    name = "simulated"

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.window: Window | None = None
        self.stopped: Stop | None = None
        self._stop: Stop | None = None

    def stop(self, reason: str, status: str = "interrupted") -> None:
        """End the running job at its next event, every VM not backed up failed with `reason` (it only records:
        safe from a signal handler or an observer)."""
        if self._stop is None:
            self._stop = Stop(reason, status)

    def run(self, coordinator: Coordinator, observer: JobObserver | None = None) -> JobReport:
        """Run the coordinator's job to its end on the simulated clock, reporting to `observer`; the job's report."""
        sc = self.scenario
        watch = _Guarded(observer or Observer())
        job_id = coordinator.job.id
        ledger = coordinator.ledger
        vms = {v.name: v for v in coordinator.job.vms}
        every_vm = tuple(vms)
        fails_left = {name: f.fails for name, f in sc.vm_failures.items()}
        flows: dict[str, _Flow] = {}
        attempts: dict[str, _Open] = {}  # vm -> its running attempt
        downs = list(sc.proxy_downs)
        now = 0.0
        busy_time: Counter[str] = Counter()
        proxy_peak: Counter[str] = Counter()
        ds_peak: Counter[str] = Counter()
        last_round = coordinator.round
        no_cap = float("inf")

        def stream_ended(f: _Flow, disk_done: bool, failed: bool = False, error: str = "",
                         end: AttemptEnd | None = None) -> None:
            a = f.a
            read = f.size if disk_done else f.read()
            op = attempts.get(a.vm)
            if op is not None and op.a.attempt == a.attempt:
                op.bytes += read
            watch.stream_ended(a, StreamResult(a.vm, a.attempt, a.disk, a.stream, disk_done, end, error, f.start,
                                               now, round(read), failed))

        def attempt_end(vm: str, ok: bool, error: str) -> AttemptEnd:
            """The end of `vm`'s running attempt, which leaves `attempts`; its streams still running count what
            they read so far."""
            op = attempts.pop(vm)
            a = op.a
            read = op.bytes + sum(f.read() for f in flows.values()
                                  if f.a.vm == vm and f.a.attempt == a.attempt)
            return AttemptEnd(vm, a.attempt, a.round, a.proxy, a.mode, ok, error, round(read), 0, now - op.started,
                              None, ())

        def apply(assignments: Iterable[Assignment], changed: set[str] | tuple[str, ...]) -> None:
            """Start what the coordinator handed out, abort the streams it no longer holds, report the states."""
            nonlocal last_round
            touched = set(changed)
            for a in assignments:
                old = flows.get(a.stream)
                if old is not None:
                    stream_ended(old, True)
                disk = vms[a.vm].disks[a.disk]
                fail_left = None
                if a.opens:
                    attempts[a.vm] = _Open(a, now)
                    touched.add(a.vm)
                    watch.assignment_started(a)
                    if fails_left.get(a.vm, 0) > 0:
                        fails_left[a.vm] -= 1
                        fail_left = sc.vm_failures[a.vm].after_fraction * disk.bytes
                size = float(disk.bytes)
                flows[a.stream] = _Flow(a, disk.datastore, size, size, now, fail_left,
                                        min(sc.rate(a.proxy, a.mode), sc.proxy_caps.get(a.proxy, no_cap)),
                                        (f"ds:{disk.datastore}", f"proxy:{a.proxy}"), EPS * max(1.0, disk.bytes))
            live = {s.id for s in ledger.streams() if s.job == job_id}
            for s in [s for s in flows if s not in live]:
                stream_ended(flows.pop(s), False)
            for p, n in Counter(f.a.proxy for f in flows.values()).items():
                proxy_peak[p] = max(proxy_peak[p], n)
            for ds, n in Counter(f.datastore for f in flows.values()).items():
                ds_peak[ds] = max(ds_peak[ds], n)
            if coordinator.round != last_round or coordinator.done:
                last_round = coordinator.round
                touched = set(every_vm)
            if touched:
                watch.states_changed(coordinator, every_vm if len(touched) == len(every_vm) else sorted(touched))

        caps = {**{f"ds:{k}": v for k, v in sc.datastore_caps.items()},
                **{f"proxy:{k}": v for k, v in sc.proxy_caps.items()}}
        self.stopped = None
        apply(coordinator.start(), every_vm)
        guard = 0
        most_disks = max((len(v.disks) for v in vms.values()), default=1)
        while not coordinator.done:
            stop = self._stop
            if stop is None and watch.error is not None:
                stop = Stop(f"the job could not go on: {describe(watch.error)}")
            if stop is not None:
                self.stopped = stop
                running = list(attempts)
                ends = [attempt_end(vm, False, stop.reason) for vm in running]
                coordinator.abort(stop.reason, status=stop.status)
                for end in ends:
                    watch.attempt_ended(end)
                apply((), every_vm)
                break
            guard += 1
            if guard > 50 * (len(vms) + 1) * (1 + most_disks) + 1000:
                raise RuntimeError(f"{sc.name}/{coordinator.strategy.name}: the simulation does not converge")
            order = list(flows.values())
            rates = allocate([f.demand for f in order], [f.uses for f in order], caps)
            soonest = float("inf")
            for f, r in zip(order, rates, strict=True):
                f.rate = r
                if r > 0:
                    soonest = min(soonest, (f.remaining if f.fail_left is None else min(f.remaining, f.fail_left)) / r)
            next_down = downs[0].at_s - now if downs else None
            if soonest == float("inf") and next_down is None:
                raise RuntimeError(f"{sc.name}/{coordinator.strategy.name}: nothing runs and nothing will happen, "
                                   f"but the job is not done")
            dt = max(0.0, min(soonest, next_down if next_down is not None else float("inf")))
            for f in order:
                f.remaining -= f.rate * dt
                if f.fail_left is not None:
                    f.fail_left -= f.rate * dt
                busy_time[f.a.proxy] += dt
            now += dt
            if next_down is not None and next_down <= dt + EPS:
                down = downs.pop(0)
                why = f"proxy {down.proxy} down" + (f": {down.reason}" if down.reason else "")
                lost = sorted({f.a.vm for f in flows.values() if f.a.proxy == down.proxy})
                ends = [attempt_end(vm, False, why) for vm in lost]
                if lost:
                    watch.proxy_lost(down.proxy, lost)
                following = coordinator.on_proxy_down(down.proxy, down.reason)
                for end in ends:
                    watch.attempt_ended(end)
                apply(following, every_vm)
                continue
            for f in order:
                if coordinator.done or flows.get(f.a.stream) is not f:
                    continue
                a = f.a
                if f.fail_left is not None and f.fail_left <= f.done_eps:
                    del flows[a.stream]
                    error = f"simulated failure of attempt {a.attempt}"
                    attempts[a.vm].bytes += f.read()
                    end = attempt_end(a.vm, False, error)
                    watch.stream_ended(a, StreamResult(a.vm, a.attempt, a.disk, a.stream, False, end, error, f.start,
                                                       now, round(f.read()), True))
                    following = coordinator.on_complete(a.vm, False, error, attempt=a.attempt)
                    watch.attempt_ended(end)
                    apply(following, (a.vm,))
                elif f.remaining <= f.done_eps:
                    del flows[a.stream]
                    op = attempts[a.vm]
                    op.disks_read += 1
                    op.bytes += f.size
                    end = attempt_end(a.vm, True, "") if op.disks_read == a.disk_count else None
                    watch.stream_ended(a, StreamResult(a.vm, a.attempt, a.disk, a.stream, True, end, "", f.start, now,
                                                       int(f.size)))
                    following = coordinator.on_disk_done(a.vm, a.disk, a.attempt)
                    if end is not None:
                        following += coordinator.on_complete(a.vm, True, attempt=a.attempt)
                        watch.attempt_ended(end)
                    apply(following, (a.vm,) if end is not None else ())
        if self.stopped is None and watch.error is not None:  # the job ended on the event whose report failed
            self.stopped = Stop(f"the job could not go on: {describe(watch.error)}")
            log.error("job %s: an observer failed: %s", job_id, self.stopped.reason)
        proxies = coordinator.job.proxies
        self.window = Window(now, {p.name: proxy_peak[p.name] for p in proxies}, dict(sorted(ds_peak.items())),
                             {p.name: busy_time[p.name] for p in proxies})
        return coordinator.report()


class _Segments(Observer):
    """Every stream of a run as a `Segment` (one bar of the window's report), in the order they ended."""

    def __init__(self, vms: Iterable[WorkVM]) -> None:
        self.datastores = {(v.name, d.index): d.datastore for v in vms for d in v.disks}
        self.segments: list[Segment] = []

    def stream_ended(self, assignment: Assignment, result: StreamResult) -> None:
        a = assignment
        self.segments.append(Segment(a.vm, a.disk, a.proxy, a.mode, self.datastores[(a.vm, a.disk)], a.round,
                                     a.attempt, result.started, result.ended, result.outcome))


def simulate(scenario: Scenario, strategy: str = "scheduler", *, keep_segments: bool = False) -> SimResult:
    """Run the backup window of `scenario` with one strategy to its end (a `SimulatedEngine` run of a fresh
    coordinator on its own ledger)."""
    coordinator = Coordinator(_job(scenario), InMemoryLedger(), strategy=STRATEGIES[strategy]())
    engine = SimulatedEngine(scenario)
    segments = _Segments(scenario.vms) if keep_segments else None
    report = engine.run(coordinator, segments or Observer())
    window = engine.window
    assert window is not None
    stranded = {d.vm for d in coordinator.decisions if d.verdict == "strand" and d.vm}
    failed = tuple(v.vm for v in report.vms if v.status in (VmStatus.FAILED, VmStatus.UNPROTECTED))
    lost = tuple(v.vm for v in report.vms if v.status not in (VmStatus.DONE, VmStatus.FAILED, VmStatus.UNPROTECTED))
    span = window.seconds or 1.0
    return SimResult(
        scenario.name, strategy, window.seconds, report.status, report.rounds, report.threshold_raises,
        window.proxy_peak, {p: s / span for p, s in window.busy_s.items()}, window.datastore_peak,
        tuple(sorted(stranded)), failed, {v.vm: v.error for v in report.vms if v.vm in failed},
        report.count(VmStatus.DONE), lost, {v.vm: v.fell_back for v in report.vms if v.fell_back},
        tuple(segments.segments) if segments else (), tuple(coordinator.decisions) if keep_segments else (),
        dict(coordinator.limits))


BASELINES = ("round-robin", "least-loaded")


@dataclass(frozen=True)
class Comparison:
    scenario: Scenario
    bound: LowerBound
    runs: tuple[SimResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario.name, "description": self.scenario.description,
                "vms": len(self.scenario.vms), "proxies": len(self.scenario.proxies),
                "job_limit": _job(self.scenario).limit, "lower_bound": self.bound.to_json(),
                "runs": [r.to_json(self.bound.seconds) for r in self.runs]}


def compare(scenario: Scenario, strategies: Sequence[str] = ("scheduler", *BASELINES),
            keep_segments: bool = False) -> Comparison:
    """The scenario with the scheduler and with each baseline, beside the lower bound."""
    return Comparison(scenario, lower_bound(scenario),
                      tuple(simulate(scenario, s, keep_segments=keep_segments) for s in strategies))
