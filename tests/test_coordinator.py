"""Unit tests of the event-driven coordinator (DESIGN §3-§4): small hand-made jobs, a deterministic executor."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import pytest

from vsphere_proxy.coordinator import (
    Assignment,
    Coordinator,
    DiskStreams,
    Job,
    LeastLoadedStrategy,
    Policy,
    RoundRobinStrategy,
    VmOutcome,
    VmStatus,
    WorkDisk,
    WorkVM,
)
from vsphere_proxy.ledger import InMemoryLedger, Stream
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.scheduler import StreamFormula, max_streams
from vsphere_proxy.tiers import Tier, TierTable, eligible_proxies

GB = 1 << 30
S, H, N = Tier.SAN, Tier.HOTADD, Tier.NBD


def proxy(name: str, ram_mb: int = 1000, cpus: int = 4, *, alive: bool = True,
          kind: ProxyKind = ProxyKind.PHYSICAL) -> Proxy:
    """A proxy whose stream limit is min(10 x cpus, ram_mb // 100): 10 by default."""
    return Proxy(name, kind, cpus, ram_mb, alive=alive, down_reason="" if alive else "powered off")


def vm(name: str, *disks: tuple[int, str]) -> WorkVM:
    """A VM from (GiB, datastore) pairs."""
    return WorkVM(name, tuple(WorkDisk(i, gb * GB, ds) for i, (gb, ds) in enumerate(disks)))


def make(vms: list[WorkVM], tiers: Mapping[str, Mapping[str, Tier | None]], proxies: list[Proxy],
         policy: Policy | None = None, *, job_id: str = "j1", ledger: InMemoryLedger | None = None,
         **kwargs: object) -> Coordinator:
    job = Job(job_id, tuple(vms), TierTable.declared(tiers), tuple(proxies), policy or Policy())
    return Coordinator(job, ledger if ledger is not None else InMemoryLedger(), **kwargs)  # type: ignore[arg-type]


def foreign(ledger: InMemoryLedger, proxy_name: str, n: int = 1, datastore: str = "ds-other") -> None:
    """Streams held by another job on the shared ledger."""
    for i in range(n):
        assert ledger.acquire(Stream(f"other/{proxy_name}/{i}", "other", proxy_name, (datastore,)), 1000)


class Executor:
    """Reads assignments in order; fails an attempt when `fail(assignment)` returns an error text."""

    def __init__(self, coords: list[Coordinator], fail: Callable[[Assignment], str | None] = lambda a: None) -> None:
        self.coords = {c.job.id: c for c in coords}
        self.fail = fail
        self.queue: list[Assignment] = []
        self.seen: list[Assignment] = []
        self.read: Counter[tuple[str, str, int]] = Counter()

    def take(self, assignments: list[Assignment]) -> list[Assignment]:
        self.queue += assignments
        self.seen += assignments
        return assignments

    def start(self) -> list[Assignment]:
        out = []
        for c in self.coords.values():
            out += self.take(c.start())
        return out

    def others(self, job: str) -> None:
        for c in self.coords.values():
            if c.job.id != job and not c.done:
                self.take(c.schedule())

    def step(self) -> None:
        a = self.queue.pop(0)
        c = self.coords[a.job]
        if (a.stream, a.vm, a.disk) not in c.running():
            return  # dropped: its attempt failed or its proxy went down
        error = self.fail(a)
        if error is not None:
            self.take(c.on_complete(a.vm, False, error, attempt=a.attempt))
        else:
            self.take(c.on_disk_done(a.vm, a.disk, a.attempt))
            self.read[(a.job, a.vm, a.attempt)] += 1
            if self.read[(a.job, a.vm, a.attempt)] == a.disk_count:
                self.take(c.on_complete(a.vm, True, attempt=a.attempt))
        self.others(a.job)

    def drain(self, bound: int = 10_000) -> list[Assignment]:
        for _ in range(bound):
            if not self.queue:
                break
            self.step()
        assert not self.queue and all(c.done for c in self.coords.values())
        return self.seen


def run(coord: Coordinator, fail: Callable[[Assignment], str | None] = lambda a: None) -> list[Assignment]:
    ex = Executor([coord], fail)
    ex.start()
    return ex.drain()


def verdicts(coord: Coordinator, verdict: str) -> list[str]:
    return [d.reason for d in coord.decisions if d.verdict == verdict]


def outcome(coord: Coordinator, name: str) -> VmOutcome:
    return next(v for v in coord.report().vms if v.vm == name)


# ---- limits -------------------------------------------------------------------------------------------------


def test_job_limit_defaults_to_twice_the_distinct_datastores_and_the_job_waits_at_it() -> None:
    vms = [vm(f"vm{i}", (10 + i, "ds-a" if i % 2 else "ds-b")) for i in range(7)]
    c = make(vms, {v.name: {"p1": S} for v in vms}, [proxy("p1")])
    assert c.job.limit == 4
    first = c.start()
    assert len(first) == 4 and all(a.opens for a in first)
    assert c.ledger.job_active("j1") == 4
    assert "job limit reached: 4 streams in use" in verdicts(c, "wait")
    assert c.schedule() == []  # nothing frees a stream: still waiting
    nxt = c.on_disk_done(first[0].vm, 0, first[0].attempt)  # stream released, VM not yet complete
    assert len(nxt) == 1 and nxt[0].opens
    assert c.ledger.job_active("j1") == 4
    ex = Executor([c])
    ex.queue = first[1:] + nxt
    ex.take(c.on_complete(first[0].vm, True, attempt=first[0].attempt))
    peak = 0
    while ex.queue:
        ex.step()
        peak = max(peak, c.ledger.job_active("j1"))
    assert peak == 4 and c.done and {v.status for v in c.report().vms} == {VmStatus.DONE}


def test_job_limit_counts_each_datastore_once_and_is_at_least_one() -> None:
    vms = [vm("a", (1, "ds-a"), (1, "ds-b")), vm("b", (1, "ds-b"))]
    assert make(vms, {}, [proxy("p1")]).job.limit == 4
    assert make([], {}, [proxy("p1")]).job.limit == 1


def test_explicit_max_streams_is_the_job_limit() -> None:
    vms = [vm(f"vm{i}", (10, f"ds-{i}")) for i in range(5)]
    c = make(vms, {v.name: {"p1": S, "p2": S} for v in vms}, [proxy("p1"), proxy("p2")], Policy(max_streams=2))
    assert c.job.limit == 2
    ex = Executor([c])
    assert len(ex.start()) == 2
    peak = 0
    while ex.queue:
        ex.step()
        peak = max(peak, c.ledger.job_active("j1"))
    assert peak == 2 and c.report().status == "complete"
    with pytest.raises(ValueError, match="max_streams"):
        Policy(max_streams=0)
    with pytest.raises(ValueError, match="datastore_cap"):
        Policy(threshold=3, datastore_cap=2)


def test_a_proxy_with_stream_limit_zero_is_never_used() -> None:
    vms = [vm(f"vm{i}", (10, f"ds-{i}")) for i in range(4)] + [vm("only-p0", (10, "ds-x"))]
    tiers: dict[str, dict[str, Tier | None]] = {v.name: {"p0": S, "p1": S} for v in vms}
    tiers["only-p0"] = {"p0": S, "p1": None}
    c = make(vms, tiers, [proxy("p0", ram_mb=99), proxy("p1", ram_mb=200)])
    assert c.limits == {"p0": 0, "p1": 2}
    seen = run(c)
    assert seen and {a.proxy for a in seen} == {"p1"}
    lonely = outcome(c, "only-p0")
    assert lonely.status is VmStatus.FAILED and lonely.attempts == 0
    assert lonely.error == "0/2 proxies eligible: 1 no access, 1 stream limit 0"
    assert "still stranded after round 3: 0/2 proxies eligible: 1 no access, 1 stream limit 0" in verdicts(c, "failed")
    assert c.report().status == "partial"


def test_a_proxy_never_holds_more_than_its_limit_across_jobs() -> None:
    ledger = InMemoryLedger()
    p = [proxy("p1", ram_mb=300)]  # limit 3
    jobs = [make([vm(f"{j}-{i}", (5, f"ds-{j}{i}")) for i in range(4)], {f"{j}-{i}": {"p1": S} for i in range(4)},
                 p, job_id=j, ledger=ledger) for j in ("a", "b")]
    ex = Executor(jobs)
    ex.start()
    assert ledger.proxy_active("p1") == 3
    peak = 3
    while ex.queue:
        ex.step()
        peak = max(peak, ledger.proxy_active("p1"))
    assert peak == 3 and all(j.report().status == "complete" for j in jobs) and not ledger.streams()


# ---- the priority list and the next available proxy ---------------------------------------------------------


def test_first_assignments_follow_the_priority_list() -> None:
    # p2 and p3 are full with another job's streams: p1 takes the VMs one after the other, in priority order:
    # fewest eligible proxies first, then the larger VM, then the name.
    ledger = InMemoryLedger()
    foreign(ledger, "p2")
    foreign(ledger, "p3")
    vms = [vm("a", (500, "ds-1")), vm("b", (10, "ds-2")), vm("c", (100, "ds-3")), vm("d", (200, "ds-4")),
           vm("f", (50, "ds-5")), vm("e", (50, "ds-6"))]
    tiers = {"a": {"p1": S, "p2": S, "p3": S}, "b": {"p1": S}, "c": {"p1": S, "p2": S}, "d": {"p1": S, "p3": S},
             "f": {"p1": S, "p2": S}, "e": {"p1": S, "p2": S}}
    c = make(vms, tiers, [proxy("p1"), proxy("p2", ram_mb=100), proxy("p3", ram_mb=100)], ledger=ledger)
    first = c.start()
    assert [a.vm for a in first] == ["b", "d", "c", "e", "f", "a"]
    assert {a.proxy for a in first} == {"p1"}
    assert [d.vm for d in c.decisions if d.verdict == "assign"] == ["b", "d", "c", "e", "f", "a"]


def test_next_available_proxy_is_the_least_utilized_across_jobs() -> None:
    ledger = InMemoryLedger()
    foreign(ledger, "p1", 5)  # 5/10
    foreign(ledger, "p2", 1)  # 1/4
    foreign(ledger, "p3", 1)  # 1/2
    vms = [vm("big", (100, "ds-1")), vm("small", (10, "ds-2"))]
    c = make(vms, {v.name: {"p1": S, "p2": S, "p3": S} for v in vms},
             [proxy("p1"), proxy("p2", ram_mb=400), proxy("p3", ram_mb=200)], ledger=ledger)
    first = c.start()
    assert [(a.vm, a.proxy) for a in first] == [("big", "p2"), ("small", "p1")]  # then 2/4 = 5/10: tie by name
    scores = [dict(d.scores) for d in c.decisions if d.verdict == "assign"]
    assert [s["utilization_pct"] for s in scores] == [25, 50]
    assert "p2 next available (1/4 streams)" in next(d.reason for d in c.decisions if d.verdict == "assign")


# ---- the datastore threshold --------------------------------------------------------------------------------


def threshold_job(**policy: object) -> Coordinator:
    vms = [vm("a1", (300, "ds-a")), vm("a2", (200, "ds-a")), vm("b1", (100, "ds-b"))]
    return make(vms, {v.name: {"p1": S} for v in vms}, [proxy("p1")], Policy(max_streams=3, **policy))  # type: ignore[arg-type]


def test_vms_on_idle_datastores_go_first_then_the_threshold_is_raised_and_falls_back() -> None:
    c = threshold_job()
    first = c.start()
    assert [a.vm for a in first] == ["a1", "b1", "a2"]  # a2 (larger than b1) waits for an idle datastore
    assert [(a.datastore_score, a.threshold) for a in first] == [(0, 1), (0, 1), (1, 2)]
    assert c.threshold_raises == 1 and c.report().threshold_raises == 1 and c.threshold == 2
    assert verdicts(c, "raise") == ["every VM p1 can back up is over threshold 1: raised to 2"]
    raise_decision = next(d for d in c.decisions if d.verdict == "raise")
    assert raise_decision.vm == "a2" and raise_decision.scores == (("threshold", 2),)
    assert c.ledger.datastore_active("ds-a") == 2
    c.on_disk_done("b1", 0, first[1].attempt)  # a stream released: back to the baseline
    assert c.threshold == 1


def test_the_threshold_is_never_raised_past_the_datastore_cap() -> None:
    c = threshold_job(datastore_cap=1)
    first = c.start()
    assert [a.vm for a in first] == ["a1", "b1"]
    assert c.threshold_raises == 0 and "1 VMs wait for a free stream on their proxies" in verdicts(c, "wait")
    nxt = c.on_disk_done("a1", 0, first[0].attempt)
    assert [(a.vm, a.datastore_score, a.threshold) for a in nxt] == [("a2", 0, 1)]


# ---- completion, failure, rounds ----------------------------------------------------------------------------


def test_success_removes_the_vm_and_releases_its_stream() -> None:
    c = make([vm("a", (10, "ds-1"))], {"a": {"p1": S}}, [proxy("p1")])
    (a,) = c.start()
    assert (a.vm, a.proxy, a.mode, a.tier, a.round, a.attempt, a.opens, a.extra) == ("a", "p1", "san", S, 1, 1,
                                                                                     True, False)
    assert c.running() == [(a.stream, "a", 0)] and outcome(c, "a").status is VmStatus.RUNNING
    assert c.report().status == "running"
    assert c.on_disk_done("a", 0, a.attempt) == []
    assert c.ledger.streams() == () and not c.done
    assert c.on_complete("a", True, attempt=a.attempt) == []
    out = outcome(c, "a")
    assert (out.status, out.proxy, out.mode, out.tier, out.round, out.attempts, out.error, out.fell_back) == (
        VmStatus.DONE, "p1", "san", S, 1, 1, "", "")
    assert c.done and c.report().status == "complete" and c.report().rounds == 1
    assert verdicts(c, "done") == ["backed up by p1 (san) in round 1"]
    assert verdicts(c, "job")[-1].startswith("job complete after 1 rounds")


def test_a_failed_vm_falls_back_to_a_lower_tier_in_round_2() -> None:
    ledger = InMemoryLedger()
    c = make([vm("a", (10, "ds-1"))], {"a": {"p1": S, "p2": H}}, [proxy("p1", ram_mb=100), proxy("p2")],
             ledger=ledger)
    (first,) = c.start()
    assert (first.proxy, first.round) == ("p1", 1)  # round 1: only its best tier
    foreign(ledger, "p1")  # another job takes p1's only stream meanwhile
    (second,) = c.on_complete("a", False, "snapshot failed", attempt=first.attempt)
    assert (second.proxy, second.mode, second.tier, second.round, second.attempt) == ("p2", "hotadd", H, 2, 2)
    assert verdicts(c, "strand") == ["attempt 1 on p1 failed: snapshot failed"]
    assert "round 2: 1 VMs, tiers up to hotadd" in verdicts(c, "round")
    c.on_disk_done("a", 0, 2)
    c.on_complete("a", True, attempt=2)
    out = outcome(c, "a")
    assert out.status is VmStatus.DONE and (out.best_tier, out.tier, out.attempts) == (S, H, 2)
    assert out.fell_back.startswith("fell back from san to hotadd")
    assert "earlier attempt: snapshot failed" in out.fell_back
    assert c.report().status == "complete" and c.report().rounds == 2


def test_round_2_still_prefers_an_idle_better_proxy() -> None:
    c = make([vm("a", (10, "ds-1"))], {"a": {"p1": S, "p2": H}}, [proxy("p1"), proxy("p2")])
    (first,) = c.start()
    (second,) = c.on_complete("a", False, "transient", attempt=first.attempt)
    assert (second.proxy, second.round) == ("p1", 2)  # p2 is admitted, but p1 ties at 0 % and sorts first


def test_a_vm_that_keeps_failing_ends_failed_with_its_last_error() -> None:
    vms = [vm("bad", (10, "ds-1")), vm("good", (10, "ds-2"))]
    c = make(vms, {"bad": {"p1": S, "p2": H, "p3": N}, "good": {"p1": S}}, [proxy("p1"), proxy("p2"), proxy("p3")])
    seen = run(c, lambda a: f"boom {a.round}" if a.vm == "bad" else None)
    bad = outcome(c, "bad")
    assert bad.status is VmStatus.FAILED and bad.attempts == 3 and bad.round == 3
    assert bad.error == "boom 3"  # its last error
    assert verdicts(c, "failed") == ["still stranded after round 3: boom 3"]
    assert [a.round for a in seen if a.vm == "bad"] == [1, 2, 3]
    assert outcome(c, "good").status is VmStatus.DONE
    report = c.report()
    assert report.status == "partial" and report.rounds == 3 and report.count(VmStatus.FAILED) == 1
    assert report.to_json()["counts"] == {"done": 1, "failed": 1}


def test_a_job_with_nothing_backed_up_is_failed_and_rounds_follow_the_policy() -> None:
    c = make([vm("bad", (10, "ds-1"))], {"bad": {"p1": N}}, [proxy("p1")], Policy(rounds=1))
    seen = run(c, lambda a: "no space")
    assert len(seen) == 1
    assert outcome(c, "bad").error == "no space"
    assert verdicts(c, "failed") == ["still stranded after round 1: no space"]
    assert c.report().status == "failed" and c.report().rounds == 1


def test_proxy_down_strands_its_vms_which_finish_later_on_another_proxy() -> None:
    vms = [vm("v1", (20, "ds-1")), vm("v2", (10, "ds-2"))]
    c = make(vms, {v.name: {"p1": S, "p2": S} for v in vms}, [proxy("p1"), proxy("p2")])
    first = c.start()
    assert [(a.vm, a.proxy) for a in first] == [("v1", "p1"), ("v2", "p2")]
    assert c.on_proxy_down("p1", "agent lost") == []  # round 1 is still running v2
    assert c.ledger.proxy_active("p1") == 0 and c.ledger.job_active("j1") == 1
    assert [vm for _, vm, _ in c.running()] == ["v2"]
    assert outcome(c, "v1").status is VmStatus.STRANDED
    assert outcome(c, "v1").error == "proxy p1 down: agent lost"
    assert verdicts(c, "proxy-down") == ["proxy p1 down: agent lost"]
    assert c.on_disk_done("v1", 0, 1) == [] and c.on_complete("v1", True, attempt=1) == []  # stale reports
    c.on_disk_done("v2", 0, 1)
    (again,) = c.on_complete("v2", True, attempt=1)
    assert (again.vm, again.proxy, again.round, again.attempt) == ("v1", "p2", 2, 2)
    c.on_disk_done("v1", 0, 2)
    c.on_complete("v1", True, attempt=2)
    assert c.done and c.report().status == "complete"
    assert (outcome(c, "v1").proxy, outcome(c, "v1").attempts) == ("p2", 2)


def test_proxy_down_walks_the_vm_down_the_tiers_round_by_round() -> None:
    c = make([vm("v", (10, "ds-1"))], {"v": {"p1": S, "p2": N}}, [proxy("p1"), proxy("p2")])
    (first,) = c.start()
    assert (first.proxy, first.round) == ("p1", 1)
    (last,) = c.on_proxy_down("p1")
    assert (last.proxy, last.mode, last.round) == ("p2", "nbd", 3)
    assert "0/2 proxies eligible: 1 down, 1 nbd not before round 3" in verdicts(c, "strand")
    c.on_disk_done("v", 0, last.attempt)
    c.on_complete("v", True, attempt=last.attempt)
    out = outcome(c, "v")
    assert out.status is VmStatus.DONE and out.attempts == 2
    assert out.fell_back.startswith("fell back from san to nbd: p1 (san) down")


def test_a_vm_no_proxy_can_reach_is_unprotected() -> None:
    vms = [vm("blind", (10, "ds-1")), vm("absent", (10, "ds-1")), vm("ok", (10, "ds-2"))]
    c = make(vms, {"blind": {"p1": None, "p2": None}, "ok": {"p1": N}}, [proxy("p1"), proxy("p2")])
    seen = run(c)
    assert [a.vm for a in seen] == ["ok"]
    for name in ("blind", "absent"):
        out = outcome(c, name)
        assert out.status is VmStatus.UNPROTECTED and out.attempts == 0
        assert out.error == "0/2 proxies eligible: 2 no access"
    assert c.report().status == "partial"
    empty = make([WorkVM("diskless", ())], {"diskless": {"p1": S}}, [proxy("p1")])
    assert empty.start() == [] and empty.done
    assert outcome(empty, "diskless").error == "no disk to back up" and empty.report().status == "failed"


def test_a_vm_whose_only_eligible_proxies_are_down_is_stranded_in_round_1() -> None:
    vms = [vm("x", (10, "ds-1")), vm("y", (10, "ds-2"))]
    c = make(vms, {"x": {"p1": S, "p2": H}, "y": {"p2": S}}, [proxy("p1", alive=False), proxy("p2")])
    (first,) = c.start()
    assert first.vm == "y"
    x = outcome(c, "x")
    assert x.status is VmStatus.STRANDED
    assert x.error == "0/2 proxies eligible: 1 down, 1 hotadd not before round 2"
    c.on_disk_done("y", 0, 1)
    (second,) = c.on_complete("y", True, attempt=1)
    assert (second.vm, second.proxy, second.round, second.attempt) == ("x", "p2", 2, 1)
    c.on_disk_done("x", 0, 1)
    c.on_complete("x", True, attempt=1)
    x = outcome(c, "x")
    assert x.status is VmStatus.DONE and x.fell_back.startswith("fell back from san to hotadd: p1 (san) down")


def test_a_vm_whose_proxies_stay_down_fails_with_the_reason() -> None:
    c = make([vm("x", (10, "ds-1"))], {"x": {"p1": S}}, [proxy("p1", alive=False), proxy("p2")])
    assert c.start() == [] and c.done
    out = outcome(c, "x")
    assert out.status is VmStatus.FAILED
    assert out.error == "0/2 proxies eligible: 1 down, 1 no access"
    assert len(verdicts(c, "strand")) == 3 and len(verdicts(c, "round")) == 3


# ---- disk streams -------------------------------------------------------------------------------------------


def three_disks(disk_streams: DiskStreams) -> Coordinator:
    v = vm("v", (10, "ds-1"), (30, "ds-1"), (20, "ds-1"))
    return make([v], {"v": {"p1": S, "p2": S}}, [proxy("p1"), proxy("p2")],
                Policy(max_streams=3, disk_streams=disk_streams))


def test_disk_streams_auto_reads_every_disk_on_its_own_stream() -> None:
    c = three_disks(DiskStreams.AUTO)
    first = c.start()
    assert [(a.disk, a.opens, a.extra) for a in first] == [(1, True, False), (2, False, True), (0, False, True)]
    assert {a.proxy for a in first} == {"p1"} and len({a.stream for a in first}) == 3
    assert {(a.attempt, a.round, a.disk_count) for a in first} == {(1, 1, 3)}
    assert [(a.datastore_score, a.threshold) for a in first] == [(0, 1), (1, 2), (2, 3)]
    assert c.ledger.job_active("j1") == 3 and c.ledger.datastore_active("ds-1") == 3
    assert len(verdicts(c, "disk-stream")) == 2
    for a in first:
        assert c.on_disk_done("v", a.disk, a.attempt) == []
    assert c.ledger.streams() == ()
    c.on_complete("v", True, attempt=1)
    assert c.report().status == "complete"


def test_disk_streams_off_walks_one_stream_through_the_disks() -> None:
    c = three_disks(DiskStreams.OFF)
    (a,) = c.start()
    disks = [a.disk]
    while True:
        nxt = c.on_disk_done("v", a.disk, a.attempt)
        if not nxt:
            break
        (b,) = nxt
        assert (b.stream, b.proxy, b.opens, b.extra, b.attempt) == (a.stream, a.proxy, False, False, a.attempt)
        assert c.running() == [(b.stream, "v", b.disk)]
        disks.append(b.disk)
        a = b
    assert disks == [1, 2, 0]  # largest first
    assert c.ledger.streams() == () and outcome(c, "v").status is VmStatus.RUNNING
    c.on_complete("v", True, attempt=1)
    assert c.done


def test_disk_streams_stop_at_the_datastore_cap() -> None:
    v = vm("v", (10, "ds-1"), (30, "ds-1"), (20, "ds-1"))
    c = make([v], {"v": {"p1": S}}, [proxy("p1")], Policy(max_streams=3, datastore_cap=2))
    assert len(c.start()) == 2 and c.ledger.datastore_active("ds-1") == 2


# ---- reports that come too late, misuse ---------------------------------------------------------------------


def test_late_reports_of_an_old_attempt_are_ignored() -> None:
    c = make([vm("v", (10, "ds-1"), (5, "ds-1"))], {"v": {"p1": S}}, [proxy("p1")], Policy(max_streams=1))
    (a,) = c.start()
    (b,) = c.on_complete("v", False, "timeout", attempt=1)
    assert b.attempt == 2
    before = (c.report(), c.running(), c.ledger.streams(), len(c.decisions))
    assert c.on_disk_done("v", a.disk, attempt=1) == []
    assert c.on_complete("v", True, attempt=1) == []
    assert c.on_complete("v", False, "late", attempt=1) == []
    assert c.on_disk_done("v", 7, attempt=2) == []  # a disk no stream reads
    assert c.on_disk_done("nobody", 0) == [] and c.on_complete("nobody", True) == []
    assert (c.report(), c.running(), c.ledger.streams(), len(c.decisions)) == before
    (d,) = c.on_disk_done("v", b.disk, attempt=2)
    c.on_disk_done("v", d.disk, attempt=2)
    c.on_complete("v", True, attempt=2)
    assert c.on_complete("v", False, "after the end", attempt=2) == []
    assert outcome(c, "v").status is VmStatus.DONE


def test_start_twice_raises_and_duplicate_vms_are_refused() -> None:
    c = make([vm("v", (1, "ds-1"))], {"v": {"p1": S}}, [proxy("p1")])
    c.start()
    with pytest.raises(RuntimeError, match="already started"):
        c.start()
    with pytest.raises(ValueError, match="appears twice"):
        make([vm("v", (1, "ds-1")), vm("v", (2, "ds-2"))], {}, [proxy("p1")])


def test_schedule_before_start_does_nothing() -> None:
    c = make([vm("v", (1, "ds-1"))], {"v": {"p1": S}}, [proxy("p1")])
    assert c.schedule() == [] and c.ledger.streams() == ()


# ---- baselines ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [RoundRobinStrategy, LeastLoadedStrategy])
def test_the_baselines_also_finish_every_vm(strategy: type) -> None:
    vms = [vm(f"vm{i}", (10 + i, f"ds-{i % 3}"), (5, f"ds-{(i + 1) % 3}")) for i in range(9)]
    tiers = {v.name: {"p1": S, "p2": H if i % 2 else None, "p3": N} for i, v in enumerate(vms)}
    c = make(vms, tiers, [proxy("p1", ram_mb=300), proxy("p2", ram_mb=200), proxy("p3")], strategy=strategy())
    seen = run(c, lambda a: "flaky" if a.vm == "vm4" and a.round == 1 and a.opens else None)
    report = c.report()
    assert report.strategy == strategy.name and report.status == "complete"
    assert all(a.datastore_score is None and a.threshold is None for a in seen)
    assert {a.proxy for a in seen if a.round == 1} == {"p1"}  # round 1: only each VM's best tier
    assert outcome(c, "vm4").attempts == 2


def test_round_robin_rotates_through_the_proxies() -> None:
    vms = [vm(f"vm{i}", (10, "ds-1")) for i in range(7)]
    c = make(vms, {v.name: {"p1": N, "p2": N, "p3": N} for v in vms}, [proxy("p1"), proxy("p2"), proxy("p3")],
             Policy(max_streams=6), strategy=RoundRobinStrategy())
    first = c.start()
    assert [(a.vm, a.proxy) for a in first] == [(f"vm{i}", f"p{i % 3 + 1}") for i in range(6)]
    (last,) = c.on_disk_done("vm0", 0, 1)  # its stream is free
    assert (last.vm, last.proxy) == ("vm6", "p1")


# ---- regression: unusable proxies in the priority list ------------------------------------------------------


@pytest.mark.parametrize("p1", [proxy("p1", alive=False), proxy("p1", ram_mb=99)], ids=["down", "limit-0"])
def test_an_unusable_proxy_does_not_count_in_the_priority_list(p1: Proxy) -> None:
    # DESIGN §3: a proxy that is down is never eligible; the coordinator reports limit-0 proxies as not eligible.
    # a can only go to p2 (p1 is down or has limit 0); b can go to p2 or p3. With a first (1 usable proxy) both
    # run at once, a on p2 and b on p3; counting p1 puts the larger b first on p2, a waits and p3 stays idle.
    vms = [vm("a", (10, "ds-1")), vm("b", (100, "ds-2"))]
    c = make(vms, {"a": {"p1": S, "p2": S}, "b": {"p2": S, "p3": S}},
             [p1, proxy("p2", ram_mb=100), proxy("p3", ram_mb=100)])
    assert sorted((a.vm, a.proxy) for a in c.start()) == [("a", "p2"), ("b", "p3")]


def test_a_proxy_that_went_down_does_not_count_in_the_next_rounds_priority_list() -> None:
    vms = [vm("a", (10, "ds-1")), vm("b", (100, "ds-2"))]
    c = make(vms, {"a": {"p1": S, "p2": S}, "b": {"p2": S, "p3": S}},
             [proxy("p1"), proxy("p2", ram_mb=100), proxy("p3", ram_mb=100)])
    assert sorted((a.vm, a.proxy) for a in c.start()) == [("a", "p1"), ("b", "p2")]
    assert c.on_proxy_down("p1") == []
    again = c.on_complete("b", False, "snapshot failed", attempt=1)
    assert sorted((a.vm, a.proxy, a.round) for a in again) == [("a", "p2", 2), ("b", "p3", 2)]


# ---- the patent's blocks are what the coordinator runs ------------------------------------------------------


def test_the_stream_limits_are_max_streams_of_the_policys_formula() -> None:
    formula = StreamFormula(per_cpu=3, mb_per_stream=250)
    proxies = [proxy("p1", ram_mb=1000, cpus=4), proxy("p2", ram_mb=8000, cpus=2), proxy("p3", ram_mb=100)]
    c = make([vm("a", (10, "ds-1"))], {"a": {"p1": S}}, proxies, Policy(formula=formula))
    assert c.limits == {p.name: max_streams(p, formula) for p in proxies} == {"p1": 4, "p2": 6, "p3": 0}
    assert make([], {}, proxies).limits == {p.name: max_streams(p) for p in proxies}


def test_the_eligibility_of_every_vm_in_every_round_is_eligible_proxies() -> None:
    # A down proxy and a limit-0 proxy in every tier; VMs fail their first attempts so that rounds 2 and 3 run.
    proxies = [proxy("down", alive=False), proxy("zero", ram_mb=99), proxy("p1", ram_mb=200), proxy("p2", ram_mb=300),
               proxy("p3")]
    rows = [{"down": S, "zero": S, "p1": S, "p2": H, "p3": N}, {"down": S, "p1": H, "p2": N},
            {"zero": H, "p2": H, "p3": N}, {"down": N, "zero": N, "p1": N}, {"p3": S, "down": H}, {"down": S},
            {"zero": S, "p1": N}]
    vms = [vm(f"vm{i}", (10 + i, f"ds-{i % 3}")) for i in range(len(rows) * 2)]
    tiers = {v.name: rows[i % len(rows)] for i, v in enumerate(vms)}
    c = make(vms, tiers, proxies)
    table, unusable = c.job.table, {"down", "zero"}
    seen: set[tuple[str, int]] = set()

    def check() -> None:
        for entry in c.priority:
            expected = {cl.proxy for cl in eligible_proxies(entry.vm, c.round, table)} - unusable
            assert set(entry.eligible) == expected, (entry.vm, c.round)
            seen.add((entry.vm, c.round))

    ex = Executor([c], lambda a: "flaky" if a.round < 3 and a.vm in ("vm1", "vm2", "vm4", "vm8") else None)
    ex.start()
    check()
    while ex.queue:
        ex.step()
        check()
    assert c.done and {r for _, r in seen} == {1, 2, 3}
    assert all(a.proxy not in unusable for a in ex.seen)
    assert outcome(c, "vm5").error == "0/5 proxies eligible: 4 no access, 1 down"
