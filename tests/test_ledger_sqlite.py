"""The embedded engine's shared ledger: the Ledger contract (held to the same assertions as the in-memory one),
limits that hold across OS processes, leases renewed while held, a killed holder that blocks nothing, a locked or
unusable file (or one on a full disk) that fails in one line within its bound, and two embedded jobs in two
processes sharing a proxy."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vsphere_proxy.config import RepositoryConfig
from vsphere_proxy.coordinator import Assignment, Coordinator, Job, Policy, WorkDisk, WorkVM
from vsphere_proxy.engine.embedded import EmbeddedEngine
from vsphere_proxy.engine.session import Finished
from vsphere_proxy.ledger import InMemoryLedger, Ledger, Stream
from vsphere_proxy.ledger_sqlite import RECHECK, LedgerUnavailable, SqliteLedger
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.tiers import Tier, TierTable
from vsphere_proxy.transports import BLOCK, DiskSource

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=["memory", "sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "memory":
        yield InMemoryLedger()
    else:
        with SqliteLedger(tmp_path / "ledger.sqlite") as sqlite:
            yield sqlite


def stream(i: int | str, proxy_name: str, *datastores: str, job: str = "job-1") -> Stream:
    return Stream(f"{job}/{i}", job, proxy_name, datastores)


# ---- the contract: the assertions tests/test_scheduler_blocks.py holds the in-memory ledger to ------------------


def test_counts_limits_and_idempotent_release(ledger: Ledger) -> None:
    assert ledger.acquire(stream(1, "p1", "ds-a", "ds-b"), proxy_limit=2)
    assert ledger.acquire(stream(2, "p1", "ds-a"), proxy_limit=2)
    assert not ledger.acquire(stream(3, "p1", "ds-c"), proxy_limit=2)
    assert not ledger.acquire(stream(4, "p2", "ds-a"), proxy_limit=9, datastore_limit=2), "ds-a is at its cap"
    assert ledger.acquire(stream(5, "p2", "ds-c"), proxy_limit=9, datastore_limit=2)
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds-a"), ledger.datastore_active("ds-c")) == (2, 2, 1)
    assert (ledger.job_active("job-1"), ledger.job_active("job-9")) == (3, 0)
    assert [s.id for s in ledger.streams()] == ["job-1/1", "job-1/2", "job-1/5"]
    assert ledger.release("job-1/1") == stream(1, "p1", "ds-a", "ds-b")
    assert ledger.release("job-1/1") is None
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds-a"), ledger.datastore_active("ds-b")) == (1, 1, 0)
    with pytest.raises(ValueError, match="already active"):
        ledger.acquire(stream(2, "p1"), proxy_limit=9)


def test_a_stream_stops_counting_on_datastores_it_is_done_with(ledger: Ledger) -> None:
    assert ledger.acquire(stream(1, "p1", "ds-a", "ds-b"), proxy_limit=2)
    narrowed = ledger.narrow("job-1/1", {"ds-b", "ds-c"})
    assert narrowed is not None and narrowed.datastores == ("ds-b",)  # never adds ds-c
    assert (ledger.datastore_active("ds-a"), ledger.datastore_active("ds-b"), ledger.datastore_active("ds-c")) == (
        0, 1, 0)
    assert ledger.proxy_active("p1") == 1 and ledger.narrow("job-1/9", {"ds-a"}) is None
    assert ledger.release("job-1/1") == stream(1, "p1", "ds-b")
    assert ledger.datastore_active("ds-b") == 0


def test_a_proxy_never_exceeds_its_limit_when_jobs_race(ledger: Ledger) -> None:
    limit, peak, lock = 5, [0], threading.Lock()
    start = threading.Barrier(6)

    def job(j: int) -> None:
        start.wait()
        for i in range(100):
            s = stream(i, "p1", "ds", job=f"job-{j}")
            if ledger.acquire(s, limit):
                with lock:
                    peak[0] = max(peak[0], ledger.proxy_active("p1"))
                ledger.release(s.id)

    threads = [threading.Thread(target=job, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= peak[0] <= limit
    assert ledger.proxy_active("p1") == 0 and ledger.datastore_active("ds") == 0 and ledger.streams() == ()


# ---- across processes -------------------------------------------------------------------------------------------


def _hammer(path: str, who: str, limit: int, seconds: float, out: Any) -> None:
    ledger = SqliteLedger(path)
    worst, taken, i, until = 0, 0, 0, time.monotonic() + seconds
    while time.monotonic() < until:
        sid = f"{who}/{i}"
        i += 1
        if ledger.acquire(Stream(sid, who, "p1", ("ds1",)), limit):
            taken += 1
            worst = max(worst, ledger.proxy_active("p1"))
            time.sleep(0.002)
            ledger.release(sid)
    out.put((worst, taken))


def test_processes_hammering_one_proxy_never_hold_more_than_its_limit(tmp_path: Path) -> None:
    path, limit = tmp_path / "ledger.sqlite", 2
    sampler = SqliteLedger(path)
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_hammer, args=(str(path), f"job{n}", limit, 2.0, out)) for n in range(3)]
    for p in procs:
        p.start()
    seen: list[int] = []
    while any(p.is_alive() for p in procs):
        seen.append(sampler.proxy_active("p1"))
        time.sleep(0.002)
    results = [out.get(timeout=10) for _ in procs]
    assert all(p.exitcode == 0 for p in procs)
    assert all(taken > 0 for _, taken in results), results
    assert max(max(w for w, _ in results), *seen) == limit, (results, max(seen))  # reached, never passed
    assert sampler.streams() == ()


def _hold(path: str, ready: Any) -> None:
    ledger = SqliteLedger(path, ttl=3600)
    assert ledger.acquire(Stream("dead/a", "dead", "p1", ("ds1",)), 2)
    assert ledger.acquire(Stream("dead/b", "dead", "p1", ("ds1",)), 2)
    ready.set()
    time.sleep(3600)


def test_a_killed_holder_blocks_no_proxy(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ready = SPAWN.Event()
    holder = SPAWN.Process(target=_hold, args=(str(path), ready))
    holder.start()
    assert ready.wait(60)
    ledger = SqliteLedger(path)
    assert ledger.proxy_active("p1") == 2
    assert not ledger.acquire(Stream("live/a", "live", "p1", ()), 2), "the holder is alive: p1 is full"
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    deadline = time.monotonic() + RECHECK + 2
    while ledger.proxy_active("p1") and time.monotonic() < deadline:  # a reader alone sees it gone
        time.sleep(0.05)
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds1"), ledger.streams()) == (0, 0, ())
    assert ledger.acquire(Stream("live/a", "live", "p1", ()), 2), "a dead holder's streams do not count"
    with sqlite3.connect(path) as raw:  # and the writer removed them
        assert raw.execute("SELECT id FROM streams").fetchall() == [("live/a",)]
        assert raw.execute("SELECT COUNT(*) FROM stream_datastores").fetchone() == (0,)


def test_leases_are_renewed_while_held_and_run_out_when_not(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    reader = SqliteLedger(path)
    with SqliteLedger(path, ttl=0.6, holder="job-a@host") as holder:
        assert holder.acquire(Stream("a/1", "a", "p1", ("ds1",)), 2)
        time.sleep(1.5)  # the keeper renewed it, every 0.2 s
        assert reader.holds("a/1") and reader.proxy_active("p1") == 1
        assert holder.renew_streams(["a/1", "a/unknown"]) == {"a/1"}
        assert reader.renew_streams(["a/1"]) == set(), "only its holder renews a stream"
    time.sleep(1.0)  # closed: nobody renews it any more
    assert not reader.holds("a/1") and reader.proxy_active("p1") == 0
    assert reader.acquire(Stream("b/1", "b", "p1", ()), 1)


# ---- bounded, one line ------------------------------------------------------------------------------------------


def test_a_locked_ledger_fails_in_one_line_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = SqliteLedger(path, busy_seconds=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        began = time.monotonic()
        with pytest.raises(LedgerUnavailable, match=f"ledger {path}: database is locked") as caught:
            ledger.acquire(Stream("j/a", "j", "p1", ()), 2)
        assert time.monotonic() - began < 2
        assert "\n" not in str(caught.value)
        assert ledger.proxy_active("p1") == 0, "readers do not wait for a writer"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.acquire(Stream("j/a", "j", "p1", ()), 2)


def test_the_file_is_its_owners_and_a_path_that_cannot_be_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    SqliteLedger(path).acquire(Stream("j/a", "j", "p1", ()), 2)
    for f in (path, tmp_path / "ledger.sqlite-wal", tmp_path / "ledger.sqlite-shm"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    for bad, why in ((tmp_path / "missing" / "ledger.sqlite", "cannot create it"),
                     (tmp_path, "not a file"), (Path(__file__), "file is not a database")):
        with pytest.raises(LedgerUnavailable, match=f"^ledger {bad}: .*{why}") as caught:
            SqliteLedger(bad)
        assert "\n" not in str(caught.value)


def test_on_a_full_disk_taking_fails_in_one_line_and_giving_back_lets_the_lease_run_out(tmp_path: Path) -> None:
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ledger = SqliteLedger(where / "ledger.sqlite")
        assert ledger.acquire(Stream("j/a", "j", "p1", ("ds1",)), 2)
        with open(where / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        with pytest.raises(LedgerUnavailable, match=f"^ledger {where}/ledger.sqlite: database or disk is full$"):
            ledger.acquire(Stream("j/b", "j", "p1", ()), 2)
        assert ledger.release("j/a") == Stream("j/a", "j", "p1", ("ds1",)), "no error: the job can end"
        assert ledger.renew() == set(), "and it is no longer renewed"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_the_default_file_is_beside_the_sqlite_catalog_else_in_the_state_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    repo = tmp_path / "repo"

    def where(**kw: Any) -> Path:
        return RepositoryConfig(path=repo, **kw).ledger_path()

    assert where() == tmp_path / "repo.ledger.sqlite"  # beside repo.catalog.sqlite
    assert where(catalog=str(tmp_path / "db" / "cat.sqlite")) == tmp_path / "db" / "ledger.sqlite"
    assert where(catalog=f"sqlite:///{tmp_path}/db/cat.sqlite") == tmp_path / "db" / "ledger.sqlite"
    assert where(catalog="postgresql+psycopg://backup@db/vp") == tmp_path / "state" / "vsphere-proxy" / "ledger.sqlite"
    assert where(catalog="postgresql+psycopg://backup@db/vp", ledger=tmp_path / "l.sqlite") == tmp_path / "l.sqlite"


# ---- two embedded jobs in two processes, one proxy -------------------------------------------------------------


class _SlowZeros:
    """A transport reading zeros, 50 ms a block."""

    mode = "san"

    def open(self, disk: DiskSource) -> None:
        pass

    def read_block(self, offset: int, length: int) -> bytes:
        time.sleep(0.05)
        return bytes(length)

    def close(self) -> None:
        pass

    def __enter__(self) -> _SlowZeros:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Sink:
    def offsets(self) -> None:
        return None

    def write(self, offset: int, data: bytes) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class _Session:
    def __init__(self, vm: WorkVM) -> None:
        self.vm = vm

    def source(self, disk: int) -> DiskSource:
        d = self.vm.disks[disk]
        return DiskSource(self.vm.name, disk, f"[{d.datastore}] {self.vm.name}/disk{disk}.vmdk", d.datastore, d.bytes)

    def transport(self) -> _SlowZeros:
        return _SlowZeros()

    def sink(self, disk: int) -> _Sink:
        return _Sink()

    def finish(self, ok: bool) -> Finished:
        return Finished(None, 0)


def _embedded_job(path: str, job_id: str, ready: Any, go: Any, out: Any) -> None:
    """Six VMs of one disk each (2 to 7 blocks) on three datastores, all through proxy p1 (its limit: 3 streams;
    the job's: 2, so that the other job always has room)."""
    vms = tuple(WorkVM(f"{job_id}-vm{i}", (WorkDisk(0, (2 + i) * BLOCK, f"ds{i % 3}"),)) for i in range(6))
    table = TierTable.declared({vm.name: {"p1": Tier.SAN} for vm in vms})
    job = Job(job_id, vms, table, (Proxy("p1", ProxyKind.PHYSICAL, 1, 300),),
              Policy(max_streams=2, threshold=1, datastore_cap=1))
    by_name = {vm.name: vm for vm in vms}

    class Preparer:
        def prepare(self, a: Assignment) -> _Session:
            return _Session(by_name[a.vm])

    ledger = SqliteLedger(path)
    ready.release()
    go.wait(60)  # both jobs start together
    began = time.monotonic()
    report = EmbeddedEngine(Preparer(), tick=0.05, stall_seconds=30).run(Coordinator(job, ledger))
    out.put((job_id, report.status, time.monotonic() - began))


def test_two_embedded_jobs_in_two_processes_share_a_proxys_limit_and_each_others_releases(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    sampler = SqliteLedger(path)
    out, ready, go = SPAWN.Queue(), SPAWN.Semaphore(0), SPAWN.Event()
    procs = [SPAWN.Process(target=_embedded_job, args=(str(path), job, ready, go, out)) for job in ("job-a", "job-b")]
    for p in procs:
        p.start()
    assert all(ready.acquire(timeout=60) for _ in procs)
    go.set()
    seen: list[tuple[int, int, set[str]]] = []
    while any(p.is_alive() for p in procs):
        streams = sampler.streams()
        busiest = max((sampler.datastore_active(f"ds{i}") for i in range(3)), default=0)
        seen.append((sampler.proxy_active("p1"), busiest, {s.job for s in streams}))
        time.sleep(0.005)
    ends = sorted(out.get(timeout=10) for _ in procs)
    assert [(job, status) for job, status, _ in ends] == [("job-a", "complete"), ("job-b", "complete")], ends
    assert all(p.exitcode == 0 for p in procs)
    assert max(n for n, _, _ in seen) == 3, "p1's limit, reached and never passed by the two jobs together"
    assert max(ds for _, ds, _ in seen) == 1, "the datastore cap holds across them too"
    assert any(len(jobs) == 2 for _, _, jobs in seen), "the jobs held streams at the same time"
    # 54 blocks of 50 ms, 3 streams at a time: 0.9 s of work; a job that missed the other's releases would stall
    assert all(seconds < 15 for _, _, seconds in ends), ends
