"""The distributed engine end to end on real services: the vcsim launcher, a throwaway `redis-server` (broker,
results, ledger), a throwaway PostgreSQL (catalog), three `vsphere-proxy worker` processes (proxy-prod, proxy-dev,
phys-01; phys-02's agent is inactive) and coordinators as `vsphere-proxy backup --engine celery` processes.

Stream limits are made small (1 per CPU, 4 GiB of memory per stream: proxy-prod 2, proxy-dev 1, phys-01 4) and
every stream is throttled to 4 MB/s, so that jobs contend for proxies and last long enough to kill something in
the middle.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.discovery import discover
from adapters.hotadd import left_behind_disks
from adapters.session import Session, connect
from adapters.snapshots import list_snapshots
from testbed.bed import USER
from testbed.fleet import WORKER_PROXIES, FleetBed, finished
from testbed.fleet import fleet as fleet_of
from testbed.images import sha256_file
from testbed.postgres_server import postgres_bindir
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.ledger_redis import RedisLedger
from vsphere_proxy.repository import Repository

pytestmark = pytest.mark.integration

PROXIES = WORKER_PROXIES
LIMITS = {"proxy-prod": 2, "proxy-dev": 1, "phys-01": 4}


@dataclass
class Fleet:
    bed: FleetBed
    session: Session
    moref: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bed, name)

    def ledger(self) -> RedisLedger:
        return RedisLedger(self.bed.redis.client())

    def left_behind(self) -> tuple[list[str], list[str]]:
        snaps = [f"{vm}: {e.name}" for vm, m in self.moref.items() for e in list_snapshots(self.session, m)
                 if e.ours]
        proxies = [self.moref[p] for p in ("proxy-prod", "proxy-dev")]
        attached = [d.file for ds in left_behind_disks(self.session, proxies).values() for d in ds]
        return snaps, attached

    def restored_ok(self, vms: set[str], repository: Path | None = None) -> None:
        repo = Repository.open(repository or self.bed.work / "repository")
        latest = {m.vm.name: m for m in repo.points()}  # oldest first: the last one wins
        for (vm, index), digest in self.bed.images.items():
            if vm in vms:
                out = self.bed.work / f"restore-{vm}-{index}.img"
                repo.restore(latest[vm].id, index, out)
                assert sha256_file(out) == digest, f"{vm} disk {index}"
                out.unlink()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not os.environ.get("VSPHERE_PROXY_REQUIRE_SERVICES") and (postgres_bindir() is None
                                                                  or not shutil.which("redis-server")):
        pytest.skip("PostgreSQL or Redis is not installed; run testbed/setup.sh")
    policy = {"streams_per_cpu": 1, "mb_per_stream": 4096, "stall_seconds": 60}
    distributed = {"lease_seconds": 3, "heartbeat_seconds": 0.5, "idle_seconds": 3}
    with fleet_of(tmp_path_factory.mktemp("distributed"), policy=policy, stream_mb_s=4,
                  distributed=distributed) as bed, connect(bed.sim.url, USER, bed.password, insecure=True) as session:
        yield Fleet(bed, session, {v.name: v.moref for v in discover(session).vms})


class Sampler(threading.Thread):
    """Reads every proxy's active streams (over all jobs) from Redis, as often as it can, until stopped."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.ledger = fleet.ledger()
        self.peak: Counter[str] = Counter()
        self.shared: Counter[str] = Counter()  # samples where one proxy held streams of two jobs
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            streams = self.ledger.streams()
            jobs: dict[str, set[str]] = {}
            for s in streams:
                jobs.setdefault(s.proxy, set()).add(s.job)
            for proxy in PROXIES:
                n = sum(1 for s in streams if s.proxy == proxy)
                self.peak[proxy] = max(self.peak[proxy], n, self.ledger.proxy_active(proxy))
                if len(jobs.get(proxy, ())) > 1:
                    self.shared[proxy] += 1
            self.samples += 1
            time.sleep(0.01)


def backed_up(report: dict[str, Any]) -> set[str]:
    return {v["vm"] for v in report["vms"] if v["status"] == "done"}


def test_two_jobs_at_once_never_exceed_a_proxy_limit_and_both_complete(fleet: Fleet) -> None:
    web_db = fleet.variant("web-db", {"names": ["web-*", "db-*"]})
    rest = fleet.variant("rest", {"folders": ["/"], "exclude": ["web-*", "db-*"]})
    sampler = Sampler(fleet)
    sampler.start()
    try:
        a, b = fleet.backup(web_db), fleet.backup(rest)
        (code_a, report_a), (code_b, report_b) = finished(a), finished(b)
    finally:
        sampler.stop.set()
        sampler.join()
    assert (code_a, report_a["status"]) == (0, "complete"), report_a
    assert (code_b, report_b["status"]) == (0, "complete"), report_b
    assert sampler.samples > 50
    print(f"samples {sampler.samples}, peaks {dict(sampler.peak)}, shared {dict(sampler.shared)}, "
          f"dispatch {report_a['dispatch']} {report_b['dispatch']}")
    for proxy in PROXIES:
        assert sampler.peak[proxy] <= LIMITS[proxy], (proxy, sampler.peak)
    assert any(sampler.peak[p] == LIMITS[p] for p in PROXIES), sampler.peak  # the limits were binding
    assert sum(sampler.shared.values()) > 0, "no proxy ever served both jobs at once"
    done_a, done_b = backed_up(report_a), backed_up(report_b)
    assert done_a == {"web-01", "web-02", "web-03", "web-04", "db-01", "db-02", "db-03"}
    assert len(done_b) == 13 and not done_a & done_b  # 22 VMs: 7 in the first job, 2 proxy VMs, 13 here
    fleet.restored_ok(done_a | done_b)
    assert fleet.left_behind() == ([], [])
    assert fleet.ledger().streams() == ()
    catalog = Catalog.open(fleet.catalog_url)
    try:
        for report in (report_a, report_b):
            job = catalog.job(report["job_id"])
            assert job is not None and job.status == "complete" and job.engine == "celery"
            assert {r.vm for r in catalog.results(report["job_id"]) if r.status == "done"} == backed_up(report)
            assert {s.status for s in catalog.states(report["job_id"]).values()} == {"done"}
    finally:
        catalog.close()


def wait_for(what: str, check: Any, timeout: float = 60, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_a_worker_killed_mid_stream_has_its_vms_replanned_and_nothing_left_behind(fleet: Fleet) -> None:
    ledger = fleet.ledger()
    job = fleet.backup(fleet.variant("kill-worker", incremental=False))
    proxy_of = {fleet.moref[p]: p for p in ("proxy-prod", "proxy-dev")}

    def hot_adding() -> str | None:
        """A proxy VM with a disk hot-added and a stream running (it reads by hot-add right now)."""
        attached = left_behind_disks(fleet.session, list(proxy_of))
        return next((proxy_of[m] for m, disks in attached.items() if disks and ledger.proxy_active(proxy_of[m])),
                    None)

    victim = wait_for("a proxy VM reading by hot-add", hot_adding, every=0.05)
    fleet.workers[victim].send_signal(signal.SIGKILL)
    fleet.workers[victim].wait()
    running = {s.id.split("/")[1] for s in ledger.streams() if s.proxy == victim}
    attached_at_kill = fleet.left_behind()[1]
    try:
        code, report = finished(job)
    finally:
        fleet.start_worker(victim)
    assert (code, report["status"]) == (0, "complete"), report
    lines = {v["vm"]: v for v in report["vms"]}
    assert attached_at_kill and running
    for vm in running:  # re-planned on another proxy in a later round
        assert lines[vm]["status"] == "done" and lines[vm]["proxy"] != victim, lines[vm]
        assert lines[vm]["round"] >= 2 and lines[vm]["attempts"] >= 2, lines[vm]
    assert {v["vm"] for v in report["vms"] if v["status"] == "skipped"} == {"proxy-prod", "proxy-dev"}
    assert len(backed_up(report)) == 20
    assert fleet.left_behind() == ([], [])
    wait_for("the ledger to be empty", lambda: ledger.streams() == (), timeout=3 + 2)
    fleet.restored_ok(backed_up(report))
    catalog = Catalog.open(fleet.catalog_url)
    try:
        results = catalog.results(report["job_id"])
        assert {r.vm for r in results if r.status == "done"} == backed_up(report)
        assert not any(r.proxy == victim and r.status == "done" and r.vm in running for r in results)
        print(f"killed {victim} running {sorted(running)} with {len(attached_at_kill)} disks attached; after: "
              + ", ".join(f"{vm} {lines[vm]['proxy']} {lines[vm]['mode']} round {lines[vm]['round']}"
                          for vm in sorted(running)))
    finally:
        catalog.close()


@pytest.mark.parametrize("engine", ["celery", "embedded"])
def test_a_coordinator_killed_mid_job_is_resumed_without_reading_done_vms_again(fleet: Fleet, engine: str) -> None:
    name = f"resumable-{engine}"
    config = fleet.variant(name, incremental=False)  # every block is read again
    job = fleet.backup(config, engine=engine)
    catalog = Catalog.open(fleet.catalog_url)
    try:
        job_id = wait_for("the job in the catalog", lambda: next(
            (j.id for j in catalog.jobs() if j.name == name), None))
        wait_for("4 VMs done", lambda: sum(1 for r in catalog.results(job_id) if r.status == "done") >= 4,
                 every=0.05)
        job.send_signal(signal.SIGKILL)
        job.wait()
        killed_at = time.time()
        assert "running" in {s.status for s in catalog.states(job_id).values()}  # it died in the middle
        if engine == "celery":
            assert fleet.ledger().job_active(job_id) > 0  # with streams running on the workers
        code, report = finished(fleet.backup(config, "--resume", job_id, engine=engine))
        assert (code, report["status"], report["job_id"]) == (0, "complete", job_id), report
        assert len(backed_up(report)) == 20
        results = catalog.results(job_id)
        done_rows = Counter(r.vm for r in results if r.status == "done")
        twice = [(r.vm, r.attempt, r.round, r.proxy, r.status, r.ended.timestamp() - killed_at) for r in results
                 if done_rows[r.vm] > 1]
        assert set(done_rows) == backed_up(report) and not twice, twice  # no VM backed up twice
        done_before = {r.vm for r in results if r.status == "done" and r.ended.timestamp() < killed_at}
        assert len(done_before) >= 4
        assert not [r for r in results if r.vm in done_before and r.ended.timestamp() >= killed_at]
        roles = {(r.proxy, r.role, r.rescinded is not None) for r in catalog.roles(job_id)}
        assert sum(1 for r in roles if r[1] == "coordinator") == 1 and all(r[2] for r in roles)
        j = catalog.job(job_id)
        assert j is not None and j.status == "complete"
        shown = subprocess.run(fleet.command("jobs", "--config", str(config), "--job", job_id, "--json"),
                               capture_output=True, text=True, check=True)
        data = json.loads(shown.stdout)
        assert (data["engine"], data["status"]) == (engine, "complete")
        assert Counter(v["status"] for v in data["vms"]) == {"done": 20}
    finally:
        catalog.close()
    assert fleet.left_behind() == ([], [])
    assert fleet.ledger().streams() == ()
    fleet.restored_ok(backed_up(report))
