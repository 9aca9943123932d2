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
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.discovery import discover
from adapters.hotadd import left_behind_disks
from adapters.session import Session, connect
from adapters.snapshots import list_snapshots
from testbed import topology as topo
from testbed.config import credentials_path_for, write_config, write_credentials
from testbed.images import sha256_file, write_images
from testbed.launcher import Vcsim
from testbed.postgres_server import PostgresServer, postgres_bindir
from testbed.redis_server import RedisServer
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.engine.worker import heartbeat_key
from vsphere_proxy.ledger_redis import RedisLedger
from vsphere_proxy.repository import Repository

pytestmark = pytest.mark.integration

USER = "administrator@vsphere.local"
PROXIES = ("proxy-prod", "proxy-dev", "phys-01")
LIMITS = {"proxy-prod": 2, "proxy-dev": 1, "phys-01": 4}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fleet:
    sim: Vcsim
    session: Session
    redis: RedisServer
    postgres: PostgresServer
    work: Path
    config: Path
    catalog_url: str
    topology: dict[str, Any]
    images: dict[tuple[str, int], str]
    moref: dict[str, str]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def variant(self, name: str, select: dict[str, Any] | None = None, **policy: Any) -> Path:
        data = yaml.safe_load(self.config.read_text())
        data["job"]["name"] = name
        data["job"]["policy"].update(policy)
        if select is not None:
            data["job"]["select"] = select
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def ledger(self) -> RedisLedger:
        return RedisLedger(self.redis.client())

    def start_worker(self, proxy: str) -> None:
        log = open(self.work / f"worker-{proxy}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.workers[proxy] = subprocess.Popen(
            [sys.executable, "-m", "vsphere_proxy", "worker", "--config", str(self.config), "--proxy", proxy,
             "--log-level", "INFO"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        client = self.redis.client()
        deadline = time.monotonic() + 60
        while not client.exists(heartbeat_key(proxy)):
            assert self.workers[proxy].poll() is None, (self.work / f"worker-{proxy}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"worker {proxy} sent no heartbeat"
            time.sleep(0.1)

    def stop_workers(self) -> None:
        for p in self.workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def backup(self, config: Path, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "vsphere_proxy", "backup", "--config", str(config),
                                 "--engine", "celery", "--json", *extra], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def left_behind(self) -> tuple[list[str], list[str]]:
        snaps = [f"{vm}: {e.name}" for vm, m in self.moref.items() for e in list_snapshots(self.session, m)
                 if e.ours]
        attached = [d.file for ds in left_behind_disks(self.session, [self.moref[p] for p in ("proxy-prod",
                                                                                              "proxy-dev")]).values()
                    for d in ds]
        return snaps, attached

    def restored_ok(self, vms: set[str]) -> None:
        repo = Repository.open(self.work / "repository")
        latest = {}
        for m in repo.points():
            latest[m.vm.name] = m
        for (vm, index), digest in self.images.items():
            if vm not in vms:
                continue
            out = self.work / f"restore-{vm}-{index}.img"
            repo.restore(latest[vm].id, index, out)
            assert sha256_file(out) == digest, f"{vm} disk {index}"
            out.unlink()


def finished(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip().startswith("{"), f"exit {proc.returncode}: {err[-3000:]}"
    return proc.returncode, json.loads(out)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if postgres_bindir() is None and not os.environ.get("VSPHERE_PROXY_REQUIRE_SERVICES"):
        pytest.skip("PostgreSQL is not installed; run testbed/setup.sh")
    password = secrets.token_urlsafe(24)
    topology = topo.load(topo.DEFAULT_TOPOLOGY)
    work = tmp_path_factory.mktemp("distributed")
    with Vcsim.start(topo.DEFAULT_TOPOLOGY, USER, password) as sim, RedisServer.start() as rs, \
            PostgresServer.start() as pg:
        images = write_images(topo.disks(topology, sim.datastores))
        credentials = write_credentials(USER, password, credentials_path_for(work / "c.yaml"))
        config = write_config(topology, sim.url, credentials, work / "c.yaml", sim.datastores, work / "repository")
        data = yaml.safe_load(config.read_text())
        catalog_url = pg.database_url()
        data["repository"]["catalog"] = catalog_url
        data["distributed"] = {"broker": rs.url, "lease_seconds": 3, "heartbeat_seconds": 0.5, "idle_seconds": 3}
        data["job"]["policy"] = {"streams_per_cpu": 1, "mb_per_stream": 4096, "stall_seconds": 60}
        for p in data["proxies"]:
            p["stream_mb_s"] = 4
        config.write_text(yaml.safe_dump(data))
        with connect(sim.url, USER, password, insecure=True) as session:
            moref = {v.name: v.moref for v in discover(session).vms}
            bed = Fleet(sim, session, rs, pg, work, config, catalog_url, topology, images, moref)
            try:
                for proxy in PROXIES:
                    bed.start_worker(proxy)
                yield bed
            finally:
                bed.stop_workers()


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


def test_a_coordinator_killed_mid_job_is_resumed_without_reading_done_vms_again(fleet: Fleet) -> None:
    config = fleet.variant("resumable", incremental=False)  # every block is read again
    job = fleet.backup(config)
    catalog = Catalog.open(fleet.catalog_url)
    try:
        job_id = wait_for("the job in the catalog", lambda: next(
            (j.id for j in catalog.jobs() if j.name == "resumable"), None))
        wait_for("4 VMs done", lambda: sum(1 for r in catalog.results(job_id) if r.status == "done") >= 4,
                 every=0.05)
        job.send_signal(signal.SIGKILL)
        job.wait()
        killed_at = time.time()
        assert fleet.ledger().job_active(job_id) > 0  # it died with streams running
        code, report = finished(fleet.backup(config, "--resume", job_id))
        assert (code, report["status"], report["job_id"]) == (0, "complete", job_id), report
        assert len(backed_up(report)) == 20
        results = catalog.results(job_id)
        done_rows = Counter(r.vm for r in results if r.status == "done")
        assert set(done_rows) == backed_up(report) and set(done_rows.values()) == {1}  # no VM backed up twice
        done_before = {r.vm for r in results if r.status == "done" and r.ended.timestamp() < killed_at}
        assert len(done_before) >= 4
        assert not [r for r in results if r.vm in done_before and r.ended.timestamp() >= killed_at]
        roles = {(r.proxy, r.role, r.rescinded is not None) for r in catalog.roles(job_id)}
        assert sum(1 for r in roles if r[1] == "coordinator") == 1 and all(r[2] for r in roles)
        j = catalog.job(job_id)
        assert j is not None and j.status == "complete"
    finally:
        catalog.close()
    assert fleet.left_behind() == ([], [])
    assert fleet.ledger().streams() == ()
    fleet.restored_ok(backed_up(report))
