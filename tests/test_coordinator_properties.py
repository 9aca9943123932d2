"""Property tests of the coordinator: random fleets, jobs, tier tables, policies and event orders (DESIGN §4).

An executor keeps every outstanding assignment of every job in one pool and plays them in a random order: a disk
read finishes, an attempt fails, a proxy goes down, or a report of an attempt long gone arrives. The invariants
of the patent are checked after every call the executor makes.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsphere_proxy.coordinator import (
    Assignment,
    Coordinator,
    DiskStreams,
    Job,
    LeastLoadedStrategy,
    PatentStrategy,
    Policy,
    RoundRobinStrategy,
    VmStatus,
    WorkDisk,
    WorkVM,
)
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.tiers import Tier, TierTable, eligible_proxies

GB = 1 << 30
TIERS = (Tier.SAN, Tier.HOTADD, Tier.NBD, None)
FINAL = {VmStatus.DONE, VmStatus.FAILED, VmStatus.UNPROTECTED}
STRATEGIES = {"scheduler": PatentStrategy, "round-robin": RoundRobinStrategy, "least-loaded": LeastLoadedStrategy}


@dataclass
class Scenario:
    proxies: list[Proxy]
    jobs: list[Job]
    strategy: str


@st.composite
def policies(draw: st.DrawFn, rounds: bool = True) -> Policy:
    threshold = draw(st.integers(1, 2))
    return Policy(
        max_streams=draw(st.none() | st.integers(1, 6)),
        threshold=threshold,
        datastore_cap=draw(st.integers(threshold, 4)),
        disk_streams=draw(st.sampled_from(list(DiskStreams))),
        rounds=draw(st.sampled_from([3, 3, 1, 2, 4])) if rounds else 3,
    )


@st.composite
def scenarios(draw: st.DrawFn, *, all_alive: bool = False, rounds: bool = True) -> Scenario:
    proxies = [
        Proxy(f"p{i}", draw(st.sampled_from(list(ProxyKind))), draw(st.integers(1, 4)), draw(st.integers(0, 1200)),
              alive=all_alive or draw(st.integers(0, 9)) > 0, down_reason="")
        for i in range(draw(st.integers(2, 6)))
    ]
    datastores = [f"ds{i}" for i in range(draw(st.integers(3, 6)))]
    jobs = []
    for j in range(draw(st.integers(2, 3))):
        members = draw(st.lists(st.sampled_from(proxies), min_size=1, max_size=len(proxies), unique=True))
        members.sort(key=lambda p: p.name)
        vms, tiers = [], {}
        for v in range(draw(st.integers(1, 12))):
            disks = draw(st.lists(st.tuples(st.integers(1, 500), st.sampled_from(datastores)), min_size=1, max_size=3))
            name = f"j{j}-vm{v}"
            vms.append(WorkVM(name, tuple(WorkDisk(i, gb * GB, ds) for i, (gb, ds) in enumerate(disks))))
            row = draw(st.lists(st.sampled_from(TIERS), min_size=len(members), max_size=len(members)))
            tiers[name] = {p.name: t for p, t in zip(members, row, strict=True)}
        jobs.append(Job(f"job{j}", tuple(vms), TierTable.declared(tiers), tuple(members), draw(policies(rounds))))
    return Scenario(proxies, jobs, draw(st.sampled_from(sorted(STRATEGIES))))


@dataclass
class World:
    """The executor: every job's outstanding work in one pool, played in a random order."""

    scenario: Scenario
    rnd: random.Random
    fail_rate: float = 0.0
    downs: int = 0  # proxies it may still take down
    stale_rate: float = 0.0
    ledger: InMemoryLedger = field(default_factory=InMemoryLedger)
    coords: dict[str, Coordinator] = field(default_factory=dict)
    pool: list[tuple[str, Assignment | tuple[str, str, int]]] = field(default_factory=list)  # disk | complete
    dead: list[Assignment] = field(default_factory=list)  # dropped assignments: replayed as late reports
    read: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    down: set[str] = field(default_factory=set)
    calls: int = 0
    hearing: bool = False  # jobs are being told a proxy is down, one after the other
    assigned: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for job in self.scenario.jobs:
            self.coords[job.id] = Coordinator(job, self.ledger, strategy=STRATEGIES[self.scenario.strategy]())
        self.down = {p.name for p in self.scenario.proxies if not p.alive}
        self.limits = {p.name: self.scenario.jobs[0].policy.formula(p) for p in self.scenario.proxies}
        self.cap = max(j.policy.datastore_cap for j in self.scenario.jobs)
        self.job_limits = {j.id: j.policy.max_streams or 2 * len({d.datastore for v in j.vms for d in v.disks})
                           for j in self.scenario.jobs}
        assert all(self.job_limits[j.id] == j.limit for j in self.scenario.jobs)

    # ---- invariants, after every call ----------------------------------------------------------------------

    def accept(self, c: Coordinator, out: list[Assignment]) -> None:
        job = c.job
        for a in out:
            assert a.job == job.id
            eligible = {e.proxy for e in job.table.eligible(a.vm, a.round)}
            assert a.proxy in eligible, (a, eligible)
            assert a.proxy not in self.down, a
            assert 1 <= a.round <= job.policy.rounds and a.round == c.round
            assert 0 <= a.disk < a.disk_count == len(next(v for v in job.vms if v.name == a.vm).disks)
            assert job.table.get(a.vm, a.proxy).tier == a.tier  # type: ignore[union-attr]
            if a.datastore_score is not None:
                assert a.threshold is not None and a.datastore_score < a.threshold <= job.policy.datastore_cap, a
            if a.opens:
                assert not a.extra
                self.assigned[job.id] += 1
            self.pool.append(("disk", a))
        self.check()

    def check(self) -> None:
        self.calls += 1
        ledger = self.ledger
        for p in self.scenario.proxies:
            assert ledger.proxy_active(p.name) <= self.limits[p.name], p.name
            if not self.hearing:
                assert p.name not in self.down or all(s.proxy != p.name for s in ledger.streams()), p.name
        for c in self.coords.values():
            assert ledger.job_active(c.job.id) <= self.job_limits[c.job.id], c.job.id
            for name in c.limits:
                assert c.limits[name] == self.limits[name]
        if self.scenario.strategy == "scheduler":
            for ds in {s for st_ in ledger.streams() for s in st_.datastores}:
                assert ledger.datastore_active(ds) <= self.cap, ds
        running = {(job, s, vm, d) for job, c in self.coords.items() for s, vm, d in c.running()}
        outstanding = {(a.job, a.stream, a.vm, a.disk) for kind, a in self.pool if kind == "disk"}  # type: ignore[union-attr]
        assert running == outstanding, (running ^ outstanding)
        assert {s.id for s in ledger.streams()} == {s for _, s, _, _ in running}

    def prune(self, c: Coordinator) -> None:
        """What the executor does after a failure or a proxy down: forget what the coordinator released."""
        live = set(c.running())
        keep = []
        for item in self.pool:
            kind, a = item
            if kind == "disk" and a.job == c.job.id and (a.stream, a.vm, a.disk) not in live:  # type: ignore[union-attr]
                self.dead.append(a)  # type: ignore[arg-type]
            else:
                keep.append(item)
        self.pool = keep

    def others(self, job: str) -> None:
        for c in self.coords.values():
            if c.job.id != job and not c.done:
                self.accept(c, c.schedule())

    # ---- events --------------------------------------------------------------------------------------------

    def start(self) -> None:
        for c in self.coords.values():
            self.accept(c, c.start())

    def proxy_down(self) -> None:
        name = self.rnd.choice(sorted({p.name for p in self.scenario.proxies} - self.down))
        self.down.add(name)
        self.downs -= 1
        self.hearing = True
        for c in self.coords.values():  # every job hears of it before anything else happens
            out = c.on_proxy_down(name, "lost")
            self.prune(c)
            self.accept(c, out)
        self.hearing = False
        for c in self.coords.values():
            if not c.done:
                self.accept(c, c.schedule())

    def late_report(self) -> None:
        a = self.rnd.choice(self.dead)
        c = self.coords[a.job]
        before = (c.report(), self.ledger.streams(), len(c.decisions))
        if self.rnd.random() < 0.5:
            out = c.on_disk_done(a.vm, a.disk, a.attempt)
        else:
            out = c.on_complete(a.vm, self.rnd.random() < 0.5, "late", attempt=a.attempt)
        assert out == [] and (c.report(), self.ledger.streams(), len(c.decisions)) == before, a
        self.check()

    def play(self) -> None:
        i = self.rnd.randrange(len(self.pool))
        kind, item = self.pool.pop(i)
        if kind == "complete":
            job, vm, attempt = item  # type: ignore[misc]
            c = self.coords[job]
            ok = self.rnd.random() >= self.fail_rate
            out = c.on_complete(vm, ok, "" if ok else f"error in attempt {attempt}", attempt=attempt)
            self.accept(c, out)
            self.others(job)
            return
        a: Assignment = item  # type: ignore[assignment]
        c = self.coords[a.job]
        if self.rnd.random() < self.fail_rate:
            out = c.on_complete(a.vm, False, f"error in attempt {a.attempt}", attempt=a.attempt)
            self.prune(c)
        else:
            out = c.on_disk_done(a.vm, a.disk, a.attempt)
            self.read[(a.job, a.vm, a.attempt)] += 1
            if self.read[(a.job, a.vm, a.attempt)] == a.disk_count:
                self.pool.append(("complete", (a.job, a.vm, a.attempt)))
        self.accept(c, out)
        self.others(a.job)

    def run(self, bound: int = 20_000) -> None:
        self.start()
        for _ in range(bound):
            if all(c.done for c in self.coords.values()):
                break
            r = self.rnd.random()
            if self.downs > 0 and r < 0.03 and len(self.down) < len(self.scenario.proxies):
                self.proxy_down()
            elif self.dead and r < 0.08:
                self.late_report()
            elif self.pool:
                self.play()
            else:
                for c in self.coords.values():
                    self.accept(c, c.schedule())
                assert self.pool or all(c.done for c in self.coords.values()), "deadlock: nothing to run"
        else:
            raise AssertionError(f"not finished after {bound} events")
        self.final()

    # ---- the end -------------------------------------------------------------------------------------------

    def final(self) -> None:
        assert not self.ledger.streams()
        assert all(kind == "complete" for kind, _ in self.pool)  # only late completions of stranded attempts
        for c in self.coords.values():
            report = c.report()
            assert c.running() == []
            assert report.rounds <= c.job.policy.rounds
            for o in report.vms:
                assert o.status in FINAL, o
                if o.status is VmStatus.DONE:
                    assert o.error == "" and o.proxy is not None and 1 <= o.attempts <= c.job.policy.rounds
                    assert o.tier is not None and o.best_tier is not None and o.tier >= o.best_tier
                    assert bool(o.fell_back) == (o.tier > o.best_tier)
                else:
                    assert o.error, o
                assert (o.status is VmStatus.UNPROTECTED) == (c.job.table.best_tier(o.vm) is None), o
            done = report.count(VmStatus.DONE)
            expected = "complete" if done == len(report.vms) else "partial" if done else "failed"
            assert report.status == expected
            assert sum(o.attempts for o in report.vms) == self.assigned[c.job.id]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.randoms(use_true_random=False), st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.25]),
       st.integers(0, 2))
def test_random_jobs_keep_every_limit_and_end_with_every_vm_accounted_for(
        scenario: Scenario, rnd: random.Random, fail_rate: float, downs: int) -> None:
    World(scenario, rnd, fail_rate=fail_rate, downs=downs).run()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(all_alive=True, rounds=False), st.randoms(use_true_random=False))
def test_without_failures_every_reachable_vm_is_backed_up(scenario: Scenario, rnd: random.Random) -> None:
    world = World(scenario, rnd)
    world.run()
    for c in world.coords.values():
        for o in c.report().vms:
            reachable = any(cl.tier is not None and c.limits[cl.proxy] > 0 for cl in c.job.table.for_vm(o.vm))
            assert (o.status is VmStatus.DONE) == reachable, o
            if not reachable:
                assert o.error.startswith("0/"), o


@dataclass
class BlockWorld(World):
    """The same executor, also checking after every call that the round is what the patent's blocks say: each
    VM's eligible proxies are `eligible_proxies` for its round without those that could not serve when the round
    began, and the proxies the coordinator offers to `next_available_proxy` are exactly those alive, below their
    limit and eligible for a pending VM."""

    down_at: dict[tuple[str, int], frozenset[str]] = field(default_factory=dict)

    def check(self) -> None:
        super().check()
        for c in self.coords.values():
            if not c.priority:
                continue
            down = self.down_at.setdefault((c.job.id, c.round), frozenset(self.down))
            unusable = down | {p for p, n in c.limits.items() if n <= 0}
            for entry in c.priority:
                block = {cl.proxy for cl in eligible_proxies(entry.vm, c.round, c.job.table)}
                assert set(entry.eligible) == block - unusable, (entry.vm, c.round)
            if self.hearing:
                continue
            pending = list(c.pending())
            assert {p.name for p in c.candidates(set())} == {
                p for p in c.proxy_names if p not in self.down and self.ledger.proxy_active(p) < c.limits[p]
                and any(p in e.eligible for e in pending)}
            for p in c.proxy_names:
                assert [e for e in c.pending_for(p) if e.vm not in c.started] == [e for e in pending if p in e.eligible]

    def proxy_down(self) -> None:
        for c in self.coords.values():  # the rounds already begun keep the view they began with
            self.down_at.setdefault((c.job.id, c.round), frozenset(self.down))
        super().proxy_down()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.randoms(use_true_random=False), st.sampled_from([0.0, 0.05, 0.25]), st.integers(0, 2))
def test_every_round_runs_the_patents_eligibility_and_candidates(
        scenario: Scenario, rnd: random.Random, fail_rate: float, downs: int) -> None:
    BlockWorld(scenario, rnd, fail_rate=fail_rate, downs=downs).run()
