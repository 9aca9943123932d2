"""The backup-window simulator: a discrete-event run of a scenario through the real `Coordinator`.

The coordinator is the product's, unchanged; only the executor is simulated. Every stream reads its disk at
the per-stream rate of its proxy and access mode, and streams on one datastore (or one proxy with a ceiling)
share its bandwidth max-min fairly. Events are stream ends, injected attempt failures and proxies going down;
between events every rate is constant, so the run is exact, not time-stepped.

`lower_bound` is what no schedule can beat; `simulate` runs one strategy; `compare` runs the scheduler and
the baselines side by side.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vsphere_proxy.coordinator import STRATEGIES, Assignment, Coordinator, Decision, Job, VmStatus
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.scenario import Scenario
from vsphere_proxy.timeline import Bar as Segment  # one stream over [start, end): what a report draws

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
    limits = {p.name: scenario.policy.formula(p) for p in scenario.proxies}
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


@dataclass(slots=True)
class _Flow:
    a: Assignment
    datastore: str
    remaining: float
    start: float
    fail_left: float | None  # bytes until this attempt fails, when it is a failing one
    rate: float = 0.0


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


def simulate(scenario: Scenario, strategy: str = "scheduler", *, keep_segments: bool = False) -> SimResult:
    """Run the backup window of `scenario` with one strategy to its end."""
    ledger = InMemoryLedger()
    coordinator = Coordinator(_job(scenario), ledger, strategy=STRATEGIES[strategy]())
    vms = {v.name: v for v in scenario.vms}
    fails_left = {name: f.fails for name, f in scenario.vm_failures.items()}
    flows: dict[str, _Flow] = {}
    read: Counter[tuple[str, int]] = Counter()  # disks read per (vm, attempt)
    segments: list[Segment] = []
    downs = list(scenario.proxy_downs)
    now = 0.0
    busy_time: Counter[str] = Counter()
    proxy_peak: Counter[str] = Counter()
    ds_peak: Counter[str] = Counter()

    def end(flow: _Flow, outcome: str) -> None:
        if keep_segments:
            a = flow.a
            segments.append(Segment(a.vm, a.disk, a.proxy, a.mode, flow.datastore, a.round, a.attempt, flow.start,
                                    now, outcome))

    def apply(assignments: Iterable[Assignment]) -> None:
        for a in assignments:
            old = flows.get(a.stream)
            if old is not None:
                end(old, "read")
            disk = vms[a.vm].disks[a.disk]
            fail_left = None
            if a.opens and fails_left.get(a.vm, 0) > 0:
                fails_left[a.vm] -= 1
                fail_left = scenario.vm_failures[a.vm].after_fraction * disk.bytes
            flows[a.stream] = _Flow(a, disk.datastore, float(disk.bytes), now, fail_left)
        live = {s for s, _, _ in coordinator.running()}
        for s in [s for s in flows if s not in live]:
            end(flows.pop(s), "aborted")
        for p, n in Counter(f.a.proxy for f in flows.values()).items():
            proxy_peak[p] = max(proxy_peak[p], n)
        for ds, n in Counter(f.datastore for f in flows.values()).items():
            ds_peak[ds] = max(ds_peak[ds], n)

    caps = {**{f"ds:{k}": v for k, v in scenario.datastore_caps.items()},
            **{f"proxy:{k}": v for k, v in scenario.proxy_caps.items()}}
    apply(coordinator.start())
    guard = 0
    while not coordinator.done:
        guard += 1
        if guard > 50 * (len(vms) + 1) * (1 + max((len(v.disks) for v in vms.values()), default=1)) + 1000:
            raise RuntimeError(f"{scenario.name}/{strategy}: the simulation does not converge")
        order = list(flows.values())
        rates = allocate([min(scenario.rate(f.a.proxy, f.a.mode), scenario.proxy_caps.get(f.a.proxy, float("inf")))
                          for f in order],
                         [(f"ds:{f.datastore}", f"proxy:{f.a.proxy}") for f in order], caps)
        soonest = float("inf")
        for f, r in zip(order, rates, strict=True):
            f.rate = r
            if r > 0:
                soonest = min(soonest, (f.remaining if f.fail_left is None else min(f.remaining, f.fail_left)) / r)
        next_down = downs[0].at_s - now if downs else None
        if soonest == float("inf") and next_down is None:
            raise RuntimeError(f"{scenario.name}/{strategy}: nothing runs and nothing will happen, but the job "
                               f"is not done")
        dt = max(0.0, min(soonest, next_down if next_down is not None else float("inf")))
        for f in order:
            f.remaining -= f.rate * dt
            if f.fail_left is not None:
                f.fail_left -= f.rate * dt
            busy_time[f.a.proxy] += dt
        now += dt
        if next_down is not None and next_down <= dt + EPS:
            down = downs.pop(0)
            apply(coordinator.on_proxy_down(down.proxy, down.reason))
            continue
        for f in order:
            if coordinator.done or flows.get(f.a.stream) is not f:
                continue
            a = f.a
            if f.fail_left is not None and f.fail_left <= EPS * max(1.0, vms[a.vm].disks[a.disk].bytes):
                end(flows.pop(a.stream), "failed")
                apply(coordinator.on_complete(a.vm, False, f"simulated failure of attempt {a.attempt}",
                                              attempt=a.attempt))
            elif f.remaining <= EPS * max(1.0, vms[a.vm].disks[a.disk].bytes):
                end(flows.pop(a.stream), "read")
                read[(a.vm, a.attempt)] += 1
                new = coordinator.on_disk_done(a.vm, a.disk, a.attempt)
                if read[(a.vm, a.attempt)] == a.disk_count:
                    new += coordinator.on_complete(a.vm, True, attempt=a.attempt)
                apply(new)
    report = coordinator.report()
    stranded = {d.vm for d in coordinator.decisions if d.verdict == "strand" and d.vm}
    failed = tuple(v.vm for v in report.vms if v.status in (VmStatus.FAILED, VmStatus.UNPROTECTED))
    lost = tuple(v.vm for v in report.vms if v.status not in (VmStatus.DONE, VmStatus.FAILED, VmStatus.UNPROTECTED))
    span = now or 1.0
    return SimResult(
        scenario.name, strategy, now, report.status, report.rounds, report.threshold_raises,
        {p.name: proxy_peak[p.name] for p in scenario.proxies},
        {p.name: busy_time[p.name] / span for p in scenario.proxies},
        dict(sorted(ds_peak.items())), tuple(sorted(stranded)), failed,
        {v.vm: v.error for v in report.vms if v.vm in failed}, report.count(VmStatus.DONE), lost,
        {v.vm: v.fell_back for v in report.vms if v.fell_back}, tuple(segments),
        tuple(coordinator.decisions) if keep_segments else (), dict(coordinator.limits))


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
