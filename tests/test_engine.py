"""The embedded engine on local flat files: threads per proxy driven by the coordinator, every disk into the
repository and back bit for bit, a failing read strands the VM for the next round, a stalled read is failed."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from vsphere_proxy.coordinator import Assignment, Coordinator, Job, Policy, VmStatus, WorkDisk, WorkVM
from vsphere_proxy.engine.attempt import RepositorySink
from vsphere_proxy.engine.embedded import EmbeddedEngine
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.protocol import Observer
from vsphere_proxy.engine.session import Finished
from vsphere_proxy.engine.streams import StreamRunner
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.repository import Repository, VmIdentity
from vsphere_proxy.tiers import Tier, TierTable
from vsphere_proxy.transports import BLOCK, DiskSource
from vsphere_proxy.transports.file import FileTransport

MIB = 1 << 20


class LocalFilesSession:
    """A VM attempt whose disks are flat files already in place (no snapshot: there is no vCenter here)."""

    def __init__(self, root: Path, repo: Repository, a: Assignment, vm: WorkVM, fail: set[str],
                 hang: threading.Event | None) -> None:
        self.root, self.vm, self.fail, self.hang = root, vm, fail, hang
        self.point = repo.begin("job", VmIdentity(name=vm.name), {})
        self.writers = {d.index: self.point.disk(d.index, f"disk {d.index}", d.bytes) for d in vm.disks}
        self.finished: bool | None = None

    def source(self, disk: int) -> DiskSource:
        d = self.vm.disks[disk]
        return DiskSource(self.vm.name, disk, f"[{d.datastore}] {self.vm.name}/{self.vm.name}_{disk}.vmdk",
                          d.datastore, d.bytes)

    def transport(self) -> Any:
        session = self

        class Transport(FileTransport):
            def read_block(self, offset: int, length: int) -> bytes:
                if session.vm.name in session.fail:
                    session.fail.discard(session.vm.name)
                    raise OSError("injected read error")
                if session.hang is not None and session.vm.name == "hangs":
                    session.hang.wait(5)
                return super().read_block(offset, length)

        return Transport("san", {ds: self.root / ds for ds in ("ds1", "ds2")})

    def sink(self, disk: int) -> Any:
        return RepositorySink(self.writers[disk], None)  # every block

    def finish(self, ok: bool) -> Finished:
        self.finished = ok
        if not ok:
            self.point.abort()
            return Finished(None, 0)
        m = self.point.commit()
        return Finished(m.id, sum(w.stats.new_bytes_stored for w in self.writers.values()))


def setup(tmp_path: Path, sizes: dict[str, list[tuple[int, str]]]) -> tuple[list[WorkVM], dict[tuple[str, int], str]]:
    vms, digests = [], {}
    for name, disks in sizes.items():
        work = []
        for i, (size, ds) in enumerate(disks):
            path = tmp_path / ds / name / f"{name}_{i}-flat.vmdk"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = os.urandom(size // 2) + bytes(size - size // 2)
            path.write_bytes(data)
            digests[(name, i)] = hashlib.sha256(data).hexdigest()
            work.append(WorkDisk(i, size, ds))
        vms.append(WorkVM(name, tuple(work)))
    return vms, digests


class Ends(Observer):
    """Every attempt's end, in order."""

    def __init__(self) -> None:
        self.ends: list[AttemptEnd] = []

    def attempt_ended(self, end: AttemptEnd) -> None:
        self.ends.append(end)


def run(tmp_path: Path, vms: list[WorkVM], fail: set[str] = frozenset(), stall: float = 60,
        hang: threading.Event | None = None) -> tuple[Any, Repository, list[AttemptEnd]]:
    repo = Repository.init(tmp_path / "repo")
    proxies = (Proxy("p1", ProxyKind.PHYSICAL, 1, 300), Proxy("p2", ProxyKind.PHYSICAL, 1, 200))
    table = TierTable.declared({vm.name: {"p1": Tier.SAN, "p2": Tier.NBD} for vm in vms})
    coordinator = Coordinator(Job("job", tuple(vms), table, proxies, Policy(max_streams=4)), InMemoryLedger())
    by_name = {vm.name: vm for vm in vms}
    fail = set(fail)

    class Preparer:
        def prepare(self, a: Assignment) -> LocalFilesSession:
            return LocalFilesSession(tmp_path, repo, a, by_name[a.vm], fail, hang)

    ends = Ends()
    report = EmbeddedEngine(Preparer(), stall_seconds=stall, tick=0.05).run(coordinator, ends)
    return report, repo, ends.ends


def test_every_disk_is_backed_up_and_restores_bit_for_bit(tmp_path: Path) -> None:
    vms, digests = setup(tmp_path, {"a": [(3 * BLOCK + 5, "ds1"), (BLOCK, "ds2")], "b": [(2 * MIB, "ds1")],
                                    "c": [(BLOCK, "ds2"), (BLOCK, "ds2"), (MIB, "ds1")]})
    report, repo, ends = run(tmp_path, vms)
    assert report.status == "complete" and report.count(VmStatus.DONE) == 3
    for end in ends:
        assert end.ok and end.point_id and end.bytes_read > 0
        for i in range(len(repo.manifest(end.point_id).disks)):
            restored = repo.restore(end.point_id, i, tmp_path / f"{end.vm}-{i}.img")
            assert restored.sha256 == digests[(end.vm, i)]


def test_a_failing_read_strands_the_vm_and_a_later_round_backs_it_up(tmp_path: Path) -> None:
    vms, _ = setup(tmp_path, {"a": [(BLOCK, "ds1")], "b": [(BLOCK, "ds2")]})
    report, repo, ends = run(tmp_path, vms, fail={"a"})
    failed = [e for e in ends if not e.ok]
    assert [(e.vm, e.round) for e in failed] == [("a", 1)] and "injected read error" in failed[0].error
    assert report.status == "complete" and report.rounds == 2
    assert {p.vm.name for p in repo.points()} == {"a", "b"}  # the failed attempt left no restore point


def test_a_stalled_stream_is_failed_and_its_vm_stranded(tmp_path: Path) -> None:
    vms, _ = setup(tmp_path, {"hangs": [(BLOCK, "ds1")]})
    release = threading.Event()
    try:
        report, _, ends = run(tmp_path, vms, stall=0.3, hang=release)
    finally:
        release.set()
    assert any("no progress for" in e.error for e in ends)
    assert report.count(VmStatus.DONE) + report.count(VmStatus.FAILED) == 1


def test_a_disk_read_fine_after_another_disk_of_its_attempt_failed_still_ends_the_attempt(tmp_path: Path) -> None:
    # both disks of "a" are read at once; disk 0 reads its only block, then, while its transport closes, disk 1
    # fails: disk 0's stream ends last, read fine, and must still end the attempt or the job waits forever
    vms, digests = setup(tmp_path, {"a": [(BLOCK, "ds1"), (3 * BLOCK, "ds1")]})
    read_done, failed = threading.Event(), threading.Event()
    first_attempt = True

    class Ordered(FileTransport):
        def open(self, disk: DiskSource) -> None:
            super().open(disk)
            self.index = disk.index

        def read_block(self, offset: int, length: int) -> bytes:
            nonlocal first_attempt
            if first_attempt and self.index == 1 and offset == BLOCK:
                read_done.wait(5)
                first_attempt = False
                failed.set()
                raise OSError("injected read error")
            return super().read_block(offset, length)

        def close(self) -> None:
            if first_attempt and getattr(self, "index", None) == 0:
                read_done.set()
                failed.wait(5)
                time.sleep(0.2)  # the failing stream's end is handled before this one's
            super().close()

    outcome: list[Any] = []

    def job() -> None:
        original = LocalFilesSession.transport
        LocalFilesSession.transport = lambda self: Ordered("san", {"ds1": tmp_path / "ds1"})  # type: ignore
        try:
            outcome.append(run(tmp_path, vms))
        finally:
            LocalFilesSession.transport = original  # type: ignore[method-assign]

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    worker.join(30)
    assert outcome, "the job did not end"
    report, repo, ends = outcome[0]
    assert report.status == "complete" and [e.ok for e in ends] == [False, True]
    point = ends[-1].point_id
    assert [repo.restore(point, i, tmp_path / f"r{i}").sha256 for i in range(2)] == [digests[("a", 0)],
                                                                                    digests[("a", 1)]]


def test_a_stream_handed_out_as_its_attempt_ended_stops_at_once(tmp_path: Path) -> None:
    """Stream 0 reads disk 0 while stream 1 fails on disk 1 and ends the attempt; the coordinator, told of disk 0
    first, hands stream 0 disk 2 of the attempt that has ended: that stream must not wait for a snapshot."""
    vms, _ = setup(tmp_path, {"a": [(BLOCK, "ds1"), (BLOCK, "ds1"), (BLOCK, "ds1")]})
    repo = Repository.init(tmp_path / "repo")
    vm = vms[0]

    class Preparer:
        def prepare(self, a: Assignment) -> LocalFilesSession:
            return LocalFilesSession(tmp_path, repo, a, vm, set(), None)

    def assignment(stream: int, disk: int, opens: bool) -> Assignment:
        return Assignment("job", "a", "p1", "san", Tier.SAN, 1, 1, f"job/a/1/{stream}", disk, 3, opens, False,
                          None, None, "test")

    runner = StreamRunner(Preparer(), ready_timeout=30)
    first = runner.run(assignment(0, 0, True))
    assert first.disk_done and first.end is None
    assert runner.end(("job", "a", 1), "disk 1 failed") is not None  # the other stream ended the attempt
    t = time.monotonic()
    late = runner.run(assignment(0, 2, False))
    assert time.monotonic() - t < 5 and not late.disk_done and late.end is None and late.error


def engine_for(tmp_path: Path, vms: list[WorkVM], prepare: Any, **kwargs: Any) -> tuple[EmbeddedEngine, Coordinator,
                                                                                       Repository]:
    repo = Repository.init(tmp_path / "repo")
    proxies = (Proxy("p1", ProxyKind.PHYSICAL, 1, 300), Proxy("p2", ProxyKind.PHYSICAL, 1, 200))
    table = TierTable.declared({vm.name: {"p1": Tier.SAN, "p2": Tier.NBD} for vm in vms})
    coordinator = Coordinator(Job("job", tuple(vms), table, proxies, Policy(max_streams=4)), InMemoryLedger())
    by_name = {vm.name: vm for vm in vms}

    class Preparer:
        def prepare(self, a: Assignment) -> LocalFilesSession:
            prepare(a)
            return LocalFilesSession(tmp_path, repo, a, by_name[a.vm], set(), None)

    return EmbeddedEngine(Preparer(), tick=0.05, **kwargs), coordinator, repo


def run_bounded(engine: EmbeddedEngine, coordinator: Coordinator, seconds: float = 30,
                observer: Observer | None = None) -> Any:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(engine.run(coordinator, observer)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert out, "the job did not end"
    return out[0]


def test_a_fault_that_ends_the_job_fails_every_vm_left_with_its_reason(tmp_path: Path) -> None:
    from vsphere_proxy.faults import Unresponsive

    vms, _ = setup(tmp_path, {f"vm{i}": [(BLOCK, "ds1")] for i in range(6)})

    def prepare(a: Assignment) -> None:
        if a.vm == "vm2":
            raise Unresponsive("vCenter did not answer in 4 s")

    engine, coordinator, repo = engine_for(tmp_path, vms, prepare)
    report = run_bounded(engine, coordinator)
    assert report.status == "failed" and report.rounds == 1  # no second round after the fault
    failed = [v for v in report.vms if v.status is VmStatus.FAILED]
    assert failed and all("vCenter did not answer in 4 s" in v.error for v in failed)
    assert {v.vm for v in report.vms if v.status is VmStatus.DONE} == {p.vm.name for p in repo.points()}


def test_an_observer_that_raises_ends_the_job_instead_of_hanging_it(tmp_path: Path) -> None:
    vms, _ = setup(tmp_path, {f"vm{i}": [(BLOCK, "ds1")] for i in range(4)})

    class FullCatalog(Observer):
        def attempt_ended(self, end: AttemptEnd) -> None:
            raise OSError(28, "database or disk is full")

    engine, coordinator, _ = engine_for(tmp_path, vms, lambda a: None)
    report = run_bounded(engine, coordinator, observer=FullCatalog())
    assert report.status == "failed" and engine.stopped is not None
    assert "disk is full" in engine.stopped.reason
    assert all(v.status in (VmStatus.DONE, VmStatus.FAILED) for v in report.vms)
    assert any("disk is full" in v.error for v in report.vms if v.status is VmStatus.FAILED)


def test_stop_ends_the_job_interrupted_and_finishes_the_running_attempts(tmp_path: Path) -> None:
    vms, _ = setup(tmp_path, {f"vm{i}": [(4 * BLOCK, "ds1")] for i in range(4)})
    started = threading.Event()
    engine_box: list[EmbeddedEngine] = []

    def prepare(a: Assignment) -> None:
        started.set()

    observer = Ends()
    ends = observer.ends
    engine, coordinator, repo = engine_for(tmp_path, vms, prepare, throttle={"p1": 2 * BLOCK, "p2": 2 * BLOCK})
    engine_box.append(engine)
    threading.Thread(target=lambda: (started.wait(10), engine.stop("interrupted by SIGTERM")), daemon=True).start()
    report = run_bounded(engine, coordinator, observer=observer)
    assert report.status == "interrupted"
    assert any(v.status is VmStatus.FAILED and v.error == "interrupted by SIGTERM" for v in report.vms)
    assert ends and all(not e.ok for e in ends if "interrupted" in e.error)
    assert not any(p.id for p in repo.points() if p.vm.name in {e.vm for e in ends if not e.ok})


def test_the_watchdog_ends_a_job_whose_coordinator_stopped_moving(tmp_path: Path) -> None:
    vms, _ = setup(tmp_path, {"a": [(BLOCK, "ds1")]})
    engine, coordinator, _ = engine_for(tmp_path, vms, lambda a: None, stall_seconds=0.3)
    coordinator.start = lambda: []  # type: ignore[method-assign]  # a coordinator that hands nothing out
    coordinator._started = True
    report = run_bounded(engine, coordinator)
    assert report.status == "failed" and engine.stopped is not None
    assert "made no progress" in engine.stopped.reason
