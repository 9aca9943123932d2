"""The `Engine` protocol's contract, held by every engine: the same small job run through `run(coordinator,
observer)` with a recording observer. Every VM ends done or failed with a reason; every attempt an engine opens
ends exactly once, after it opened; every stream it reports belongs to an attempt it ran; every VM's state is
reported; the ledger holds nothing afterwards; `stop` ends the job interrupted with its reason.

The simulated engine runs the job on its scenario's clock (an injected failure and a proxy going down on the way);
the embedded engine runs it on thread pools reading in-memory disks (an injected read error on the way)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from vsphere_proxy.coordinator import Assignment, Coordinator, Job, JobReport, Policy, VmStatus, WorkDisk, WorkVM
from vsphere_proxy.engine.embedded import EmbeddedEngine
from vsphere_proxy.engine.events import AttemptEnd, StreamResult
from vsphere_proxy.engine.protocol import Engine, Observer
from vsphere_proxy.engine.session import Finished
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.scenario import ProxyDown, Scenario, VmFailure
from vsphere_proxy.simulator import SimulatedEngine
from vsphere_proxy.tiers import Tier, TierTable
from vsphere_proxy.transports import BLOCK, DiskSource

FAILS_ONCE = "vm2"  # its first attempt fails, on every engine
REASON = "stopped by the test"


def small_job() -> Job:
    """Five VMs on two datastores, three proxies: vm1-vm3 by SAN on p1 or p2, vm4-vm5 by NBD on p1 or p3."""
    sizes = {"vm1": [(2 * BLOCK, "ds1"), (BLOCK, "ds2")], "vm2": [(BLOCK, "ds1")], "vm3": [(3 * BLOCK, "ds2")],
             "vm4": [(BLOCK, "ds1"), (BLOCK // 2, "ds1")], "vm5": [(2 * BLOCK, "ds2")]}
    vms = tuple(WorkVM(name, tuple(WorkDisk(i, size, ds) for i, (size, ds) in enumerate(disks)))
                for name, disks in sizes.items())
    proxies = (Proxy("p1", ProxyKind.PHYSICAL, 1, 300), Proxy("p2", ProxyKind.PHYSICAL, 1, 200),
               Proxy("p3", ProxyKind.VM, 1, 200))
    san, nbd = {"p1": Tier.SAN, "p2": Tier.SAN}, {"p1": Tier.NBD, "p3": Tier.NBD}
    table = TierTable.declared({vm.name: san if vm.name in ("vm1", "vm2", "vm3") else nbd for vm in vms})
    return Job("contract", vms, table, proxies, Policy(max_streams=3))


# ---- the engines, each on the same job ---------------------------------------------------------------------


def simulated(job: Job) -> SimulatedEngine:
    rates = {**{(p, "san"): float(BLOCK) for p in ("p1", "p2")}, **{(p, "nbd"): BLOCK / 2 for p in ("p1", "p3")}}
    scenario = Scenario("contract", "", job.policy, job.proxies, job.vms, job.table, rates, {},
                        {"ds1": 2.0 * BLOCK, "ds2": 2.0 * BLOCK}, (ProxyDown("p3", 1.0, "stopped answering"),),
                        {FAILS_ONCE: VmFailure(FAILS_ONCE, 1, 0.5)})
    return SimulatedEngine(scenario)


class MemoryTransport:
    """Reads zeros; the first read of a VM named in `fail` raises."""

    mode = "san"

    def __init__(self, vm: str, fail: set[str]) -> None:
        self.vm, self.fail = vm, fail

    def open(self, disk: DiskSource) -> None:
        pass

    def read_block(self, offset: int, length: int) -> bytes:
        if self.vm in self.fail:
            self.fail.discard(self.vm)
            raise OSError("injected read error")
        return bytes(length)

    def close(self) -> None:
        pass

    def __enter__(self) -> MemoryTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class MemorySink:
    def __init__(self) -> None:
        self.written = 0

    def offsets(self) -> None:
        return None

    def write(self, offset: int, data: bytes) -> None:
        self.written += len(data)

    def close(self, ok: bool) -> None:
        pass


@dataclass
class MemorySession:
    """A VM attempt whose disks are zeros in memory: nothing is snapshotted nor stored."""

    vm: WorkVM
    fail: set[str]

    def source(self, disk: int) -> DiskSource:
        d = self.vm.disks[disk]
        return DiskSource(self.vm.name, disk, f"[{d.datastore}] {self.vm.name}/{self.vm.name}_{disk}.vmdk",
                          d.datastore, d.bytes)

    def transport(self) -> MemoryTransport:
        return MemoryTransport(self.vm.name, self.fail)

    def sink(self, disk: int) -> MemorySink:
        return MemorySink()

    def finish(self, ok: bool) -> Finished:
        return Finished(None, 0)


class MemoryPreparer:
    def __init__(self, job: Job, fail: Iterable[str]) -> None:
        self.vms = {vm.name: vm for vm in job.vms}
        self.fail = set(fail)

    def prepare(self, assignment: Assignment) -> MemorySession:
        return MemorySession(self.vms[assignment.vm], self.fail)


def embedded(job: Job) -> EmbeddedEngine:
    return EmbeddedEngine(MemoryPreparer(job, {FAILS_ONCE}), tick=0.02, stall_seconds=30)


ENGINES = [pytest.param(simulated, id="simulated"), pytest.param(embedded, id="embedded")]


# ---- the recording observer and the contract -------------------------------------------------------------


class Recorder(Observer):
    """Every event, in the order the engine reported them (engines may report from several threads)."""

    def __init__(self, on_end: Callable[[AttemptEnd], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, Any]] = []
        self.states: set[str] = set()
        self.on_end = on_end

    def assignment_started(self, assignment: Assignment) -> None:
        with self.lock:
            self.events.append(("started", assignment))

    def stream_ended(self, assignment: Assignment, result: StreamResult) -> None:
        with self.lock:
            self.events.append(("stream", (assignment, result)))

    def attempt_ended(self, end: AttemptEnd) -> None:
        with self.lock:
            self.events.append(("ended", end))
        if self.on_end is not None:
            self.on_end(end)

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        with self.lock:
            self.states.update(vms)

    def proxy_lost(self, proxy: str, vms: Sequence[str]) -> None:
        with self.lock:
            self.events.append(("lost", (proxy, tuple(vms))))

    def of(self, kind: str) -> list[Any]:
        return [e for k, e in self.events if k == kind]


def run_bounded(engine: Engine, coordinator: Coordinator, observer: Recorder, seconds: float = 60) -> JobReport:
    out: list[JobReport] = []
    worker = threading.Thread(target=lambda: out.append(engine.run(coordinator, observer)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert out, f"the {engine.name} engine's job did not end within {seconds:g} s"
    return out[0]


def assert_contract(job: Job, coordinator: Coordinator, report: JobReport, rec: Recorder) -> None:
    names = {vm.name for vm in job.vms}
    outcomes = {v.vm: v for v in report.vms}
    assert set(outcomes) == names
    for vm, o in outcomes.items():
        assert o.status in (VmStatus.DONE, VmStatus.FAILED), f"{vm} ended {o.status}"
        if o.status is VmStatus.FAILED:
            assert o.error, f"{vm} failed without a reason"
        else:
            assert any(d.verdict == "done" and d.vm == vm and d.reason for d in coordinator.decisions)

    opened: dict[tuple[str, int], Assignment] = {}
    ends: dict[tuple[str, int], list[AttemptEnd]] = {}
    for kind, event in rec.events:
        if kind == "started":
            key = (event.vm, event.attempt)
            assert event.opens, f"assignment_started for {key} that opens no attempt"
            assert key not in opened, f"{key} started twice"
            opened[key] = event
        elif kind == "ended":
            key = (event.vm, event.attempt)
            assert key in opened, f"attempt_ended for {key} before (or without) its assignment_started"
            ends.setdefault(key, []).append(event)
        elif kind == "stream":
            a, result = event
            assert (a.vm, a.attempt) in opened, f"stream_ended for {a.stream}, an attempt the engine did not start"
            assert (result.vm, result.attempt, result.disk, result.stream) == (a.vm, a.attempt, a.disk, a.stream)
            assert a.proxy == opened[(a.vm, a.attempt)].proxy and 0 <= a.disk < a.disk_count
            assert not (result.disk_done and result.failed)
    assert opened, "the engine started nothing"
    for key in opened:
        assert len(ends.get(key, [])) == 1, f"{key} ended {len(ends.get(key, []))} times"
    for key, (end,) in ends.items():
        assert end.ok or end.error, f"{key} ended not ok without an error"
        o = outcomes[key[0]]
        if o.status is VmStatus.DONE and o.attempts == key[1]:
            assert end.ok, f"{key} is the attempt that backed {key[0]} up, but it ended not ok"
    for vm, o in outcomes.items():
        if o.status is VmStatus.DONE:  # its last attempt read every disk
            read = {r.disk for a, r in rec.of("stream") if (a.vm, a.attempt) == (vm, o.attempts) and r.disk_done}
            assert read == {d.index for d in next(v for v in job.vms if v.name == vm).disks}
    assert rec.states >= names, f"states_changed never mentioned {sorted(names - rec.states)}"
    assert not [s for s in coordinator.ledger.streams() if s.job == job.id], "streams left in the ledger"


@pytest.mark.parametrize("make", ENGINES)
def test_an_engine_runs_the_job_to_its_end_and_reports_every_event(make: Callable[[Job], Engine]) -> None:
    job = small_job()
    engine = make(job)
    coordinator = Coordinator(job, InMemoryLedger())
    rec = Recorder()
    report = run_bounded(engine, coordinator, rec)
    assert_contract(job, coordinator, report, rec)
    assert report.status == "complete"
    failed = [e for e in rec.of("ended") if e.vm == FAILS_ONCE and not e.ok]
    assert failed and report.rounds >= 2  # the injected failure, retried in a later round


@pytest.mark.parametrize("make", ENGINES)
def test_stop_ends_the_job_interrupted_and_fails_what_is_left_with_the_reason(make: Callable[[Job], Engine]) -> None:
    job = small_job()
    engine = make(job)
    coordinator = Coordinator(job, InMemoryLedger())
    rec = Recorder(on_end=lambda end: engine.stop(REASON))
    report = run_bounded(engine, coordinator, rec)
    assert_contract(job, coordinator, report, rec)
    assert report.status == "interrupted"
    failed = [v for v in report.vms if v.status is VmStatus.FAILED]
    assert failed and all(v.error == REASON for v in failed)  # more VMs than streams: some were left


def test_the_simulated_engine_reports_a_lost_proxy_and_its_streams_in_simulated_seconds() -> None:
    job = small_job()
    rec = Recorder()
    engine = simulated(job)
    report = engine.run(Coordinator(job, InMemoryLedger()), rec)
    assert report.status == "complete" and engine.name == "simulated" and engine.window is not None
    lost = rec.of("lost")
    assert lost and all(proxy == "p3" and vms for proxy, vms in lost)
    for _, vms in lost:
        for vm in vms:
            assert any(e.vm == vm and not e.ok and "p3 down" in e.error for e in rec.of("ended"))
    streams = [r for _, r in rec.of("stream")]
    assert all(0 <= r.started <= r.ended <= engine.window.seconds for r in streams)
    assert {r.outcome for r in streams} == {"read", "failed", "aborted"}
    assert all(r.bytes == d.bytes for a, r in rec.of("stream") if r.disk_done
               for d in [next(v for v in job.vms if v.name == a.vm).disks[a.disk]])


def test_an_observer_that_raises_ends_the_simulated_job_with_the_error_as_its_reason() -> None:
    class FullCatalog(Observer):
        def attempt_ended(self, end: AttemptEnd) -> None:
            raise OSError(28, "database or disk is full")

    job = small_job()
    engine = simulated(job)
    report = engine.run(Coordinator(job, InMemoryLedger()), FullCatalog())
    assert report.status == "failed" and engine.stopped is not None and "disk is full" in engine.stopped.reason
    assert any("disk is full" in v.error for v in report.vms if v.status is VmStatus.FAILED)
