"""What every job guarantees when the night goes wrong (DESIGN §9), on real services: the vcsim launcher, Redis,
PostgreSQL and three proxy workers (the distributed tests' fleet, streams throttled to 4 MB/s so that jobs last
long enough to be hit in the middle).

- two jobs over overlapping VMs never touch each other: the second skips the VMs the first is backing up, its
  sweep leaves the first's snapshots and hot-added disks alone, both jobs' points restore bit for bit;
- `--resume` of a job whose coordinator is alive is refused (exit 2), on both engines;
- SIGTERM and SIGINT end a job `interrupted` (exit 143 / 130) on both engines, nothing left in vCenter, nothing
  held in the ledger, and `--resume` then finishes it;
- a catalog whose file system fills mid-job ends the job (exit 4) with the reason, nothing left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.discovery import discover
from adapters.session import connect
from adapters.snapshots import list_snapshots
from testbed.bed import USER
from testbed.fleet import finished
from testbed.fleet import fleet as fleet_of
from testbed.postgres_server import postgres_bindir
from tests.test_distributed import Fleet, backed_up, wait_for
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.repository import Repository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not os.environ.get("VSPHERE_PROXY_REQUIRE_SERVICES") and (postgres_bindir() is None
                                                                  or not shutil.which("redis-server")):
        pytest.skip("PostgreSQL or Redis is not installed; run testbed/setup.sh")
    policy = {"streams_per_cpu": 1, "mb_per_stream": 4096, "stall_seconds": 60, "lease_seconds": 6}
    distributed = {"lease_seconds": 3, "heartbeat_seconds": 0.5, "idle_seconds": 3}
    with fleet_of(tmp_path_factory.mktemp("faults"), policy=policy, stream_mb_s=4,
                  distributed=distributed) as bed, connect(bed.sim.url, USER, bed.password, insecure=True) as session:
        yield Fleet(bed, session, {v.name: v.moref for v in discover(session).vms})


def job_in_catalog(catalog: Catalog, name: str) -> str:
    return str(wait_for(f"job {name} in the catalog", lambda: next(
        (j.id for j in catalog.jobs() if j.name == name), None)))


def done_count(catalog: Catalog, job_id: str) -> int:
    return sum(1 for r in catalog.results(job_id) if r.status == "done")


def test_two_jobs_over_overlapping_vms_never_touch_each_other(fleet: Fleet) -> None:
    first = fleet.variant("overlap-a", {"names": ["web-*", "db-*", "app-*"]}, incremental=False)
    second = fleet.variant("overlap-b", {"names": ["app-*", "dev-*"]}, incremental=False)
    catalog = Catalog.open(fleet.catalog_url)
    try:
        a = fleet.backup(first, engine="embedded")
        a_id = job_in_catalog(catalog, "overlap-a")
        wait_for("a snapshot of job a", lambda: any(
            e.job == a_id for m in fleet.moref.values() for e in list_snapshots(fleet.session, m)), every=0.1)
        b = fleet.backup(second, engine="embedded")
        (code_a, report_a), (code_b, report_b) = finished(a), finished(b)
    finally:
        catalog.close()
    assert (code_a, report_a["status"]) == (0, "complete"), report_a  # none of its snapshots went under it
    assert not [e for e in report_b["swept"]["snapshots"] if a_id in e]
    skipped = {v["vm"]: v["error"] for v in report_b["vms"] if v["status"] == "skipped"}
    apps = {vm for vm in fleet.moref if vm.startswith("app-")}
    assert set(skipped) == apps and all(why == f"being backed up by job {a_id}" for why in skipped.values()), skipped
    assert (code_b, backed_up(report_b)) == (0, {vm for vm in fleet.moref if vm.startswith("dev-")}), report_b
    assert fleet.left_behind() == ([], [])
    fleet.restored_ok(backed_up(report_a) | backed_up(report_b))
    # the next run of the second job, the first having ended, backs the shared VMs up
    code, report = finished(fleet.backup(second, engine="embedded"))
    assert code == 0 and apps <= backed_up(report), report


@pytest.mark.parametrize("engine", ["embedded", "celery"])
def test_resume_of_a_live_job_is_refused(fleet: Fleet, engine: str) -> None:
    name = f"live-{engine}"
    config = fleet.variant(name, {"names": ["web-*", "db-*"]}, incremental=False)
    catalog = Catalog.open(fleet.catalog_url)
    try:
        job = fleet.backup(config, engine=engine)
        job_id = job_in_catalog(catalog, name)
        wait_for("a VM running", lambda: "running" in {s.status for s in catalog.states(job_id).values()})
        resumed = subprocess.run(fleet.command("backup", "--config", str(config), "--engine", engine, "--resume",
                                               job_id), capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 2, resumed.stderr
        assert "still running" in resumed.stderr and len(resumed.stderr.strip().splitlines()) == 1
        code, report = finished(job)
        assert (code, report["status"]) == (0, "complete"), report
        results = catalog.results(job_id)
        assert len(results) == len({r.vm for r in results})  # nothing was backed up twice
    finally:
        catalog.close()


@pytest.mark.parametrize(("engine", "sig"), [("embedded", signal.SIGTERM), ("embedded", signal.SIGINT),
                                             ("celery", signal.SIGTERM), ("celery", signal.SIGINT)])
def test_a_signal_ends_the_job_interrupted_and_cleans_up(fleet: Fleet, engine: str, sig: signal.Signals) -> None:
    name = f"signalled-{engine}-{sig.name.lower()}"
    config = fleet.variant(name, incremental=False)
    catalog = Catalog.open(fleet.catalog_url)
    try:
        job = fleet.backup(config, engine=engine)
        job_id = job_in_catalog(catalog, name)
        try:
            wait_for("2 VMs done", lambda: done_count(catalog, job_id) >= 2, every=0.05)
        except AssertionError:
            job.kill()
            out, err = job.communicate()
            print(out[-2000:], err[-2000:])
            raise
        running = {vm for vm, s in catalog.states(job_id).items() if s.status == "running"}
        assert running  # it is hit in the middle
        sent = time.monotonic()
        job.send_signal(sig)
        code, report = finished(job, timeout=120)
        took = time.monotonic() - sent
        assert code == 128 + sig, report
        assert report["status"] == "interrupted" and took < 60, (took, report)
        failed = {v["vm"]: v["error"] for v in report["vms"] if v["status"] == "failed"}
        assert failed and all(why == f"interrupted by {sig.name}" for why in failed.values()), failed
        row = catalog.job(job_id)
        assert row is not None and row.status == "interrupted"
        assert not catalog.live(job_id)
        assert fleet.left_behind() == ([], [])
        assert not [s for s in fleet.ledger().streams() if s.job == job_id]
        print(f"{engine} {sig.name}: exit {code} after {took:.1f} s; {len(backed_up(report))} done, "
              f"{len(failed)} interrupted")
        if engine == "embedded" and sig == signal.SIGTERM:  # an interrupted job is taken over and finished
            code, resumed = finished(fleet.backup(config, "--resume", job_id, engine=engine))
            assert (code, resumed["status"]) == (0, "complete"), resumed
            fleet.restored_ok(backed_up(resumed))
    finally:
        catalog.close()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> None:
    """Write zeros into `directory` until its file system has no space left."""
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())


def fill_mid_job(fleet: Fleet, config: Path, name: str, catalog: Catalog,
                 mount: Path) -> tuple[int, dict[str, Any], float]:
    """Run the job, fill `mount` once a VM is done; exit code, report, seconds from the filling to the end."""
    try:
        job = fleet.backup(config, engine="embedded")
        job_id = job_in_catalog(catalog, name)
        wait_for("a VM done", lambda: done_count(catalog, job_id) >= 1, every=0.05)
        fill(mount)
        started = time.monotonic()
        code, report = finished(job, timeout=180)
        return code, report, time.monotonic() - started
    finally:
        catalog.close()


def test_a_catalog_that_fills_mid_job_ends_the_job_with_the_reason(fleet: Fleet) -> None:
    with small_tmpfs(fleet.work / "small-catalog", "4m") as mount:
        config = fleet.variant("full-catalog", incremental=False)
        data: dict[str, Any] = yaml.safe_load(config.read_text())
        data["repository"]["catalog"] = f"sqlite:///{mount / 'catalog.sqlite'}"
        config.write_text(yaml.safe_dump(data))
        code, report, took = fill_mid_job(fleet, config, "full-catalog", Catalog.open(mount / "catalog.sqlite"),
                                          mount)
    assert code == 4, report
    assert report["status"] == "failed" and took < 120, (took, report)
    failed = [v["error"] for v in report["vms"] if v["status"] == "failed"]
    assert failed and all("full" in why for why in failed), failed
    assert report["problems"], report  # the job's end could not be written: the report says so
    assert fleet.left_behind() == ([], [])
    print(f"catalog full: exit {code} {took:.1f} s after the disk filled; {len(backed_up(report))} done; "
          f"{failed[0]}")


def test_a_repository_that_fills_mid_job_ends_the_job_and_still_restores(fleet: Fleet) -> None:
    with small_tmpfs(fleet.work / "small-repository", "64m") as mount:
        config = fleet.variant("full-repository", incremental=False)
        data: dict[str, Any] = yaml.safe_load(config.read_text())
        data["repository"]["path"] = str(mount / "repository")
        config.write_text(yaml.safe_dump(data))
        code, report, took = fill_mid_job(fleet, config, "full-repository", Catalog.open(fleet.catalog_url), mount)
        assert code == 4 and report["status"] == "failed" and took < 120, (took, report)
        failed = [v["error"] for v in report["vms"] if v["status"] == "failed"]
        assert failed and any("repository full: " in why and str(mount) in why for why in failed), failed
        assert fleet.left_behind() == ([], [])
        repo_dir = mount / "repository"
        assert not list((repo_dir / "tmp").iterdir())  # nothing half-written
        verify = subprocess.run(fleet.command("verify", "--config", str(config), "--json"), capture_output=True,
                                text=True, env={**os.environ, "VSPHERE_USERNAME": USER,
                                                "VSPHERE_PASSWORD": fleet.password})
        assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stderr  # on the full disk
        done = backed_up(report)
        assert done
        repo = Repository.open(repo_dir)
        points = {m.vm.name for m in repo.points()}
        assert points == done  # a point for each VM done, none for the others
        fleet.restored_ok(done, repo_dir)
        print(f"repository full: exit {code} {took:.1f} s after the disk filled; {len(done)} done; {failed[0]}")
