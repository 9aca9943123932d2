"""The backup job runner (`vsphere_proxy.jobs.backup.BackupRun`) on the in-memory `FakeBackend`, a real repository
and a real SQLite catalog: disks restore bit for bit, failures strand VMs for later rounds or fail them with the
reason, the start-of-job sweep spares live jobs, and a job that ends early (an observer that raises, a stop asked
from another thread) ends with its reason, no snapshot left, never a hang."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vsphere_proxy.backup_report import BackupReport
from vsphere_proxy.catalog import Catalog, lease_holder
from vsphere_proxy.config import Config, parse_config
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.protocol import JobObserver, Observer
from vsphere_proxy.jobs.backup import BackupRun
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.fake_backend import FakeBackend
from vsphere_proxy.repository import Repository
from vsphere_proxy.transports import BLOCK

BOUND = 60.0  # seconds any job here may take before the test calls it a hang


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog.open(tmp_path / "catalog.sqlite")
    yield cat
    cat.close()


def config_for(backend: FakeBackend, repo: Repository, names: tuple[str, ...] = ("vm-*",)) -> Config:
    return parse_config({
        "vcenter": {"url": "https://vc.fake.test/sdk",
                    "credentials": {"username_env": "FAKE_VC_USER", "password_env": "FAKE_VC_PASSWORD"}},
        "proxies": backend.proxy_configs(),
        "job": {"name": "nightly", "select": {"names": list(names)}},
        "repository": {"path": str(repo.path)},
    })


def run_bounded(run: BackupRun, observer: JobObserver | None = None) -> BackupReport:
    """Run the job in a thread; fail the test if it does not end within BOUND seconds."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["report"] = run.run(observer)
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=target, name="backup-run", daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"the job did not end within {BOUND:g} s"
    if "error" in out:
        raise out["error"]
    report: BackupReport = out["report"]
    return report


def lines(report: BackupReport) -> dict[str, Any]:
    return {v.vm: v for v in report.vms}


def expected_image(backend: FakeBackend, file: str, capacity: int) -> bytes:
    data = backend.contents[file]
    return data + bytes(capacity - len(data))


@pytest.mark.parametrize(("san", "mode"), [(False, "nbd"), (True, "san")])
def test_every_vm_is_backed_up_and_every_disk_restores_bit_for_bit(
        tmp_path: Path, repo: Repository, catalog: Catalog, san: bool, mode: str) -> None:
    backend = FakeBackend.build(3, (BLOCK + 65536, 2 * BLOCK + 4096), datastores=("ds-1", "ds-2"), san=san)
    report = run_bounded(BackupRun(config_for(backend, repo), backend, repo, catalog))

    assert (report.status, report.exit_code) == ("complete", 0)
    assert report.modes == {mode: 3}
    assert backend.present == []
    assert len(backend.made) == 3 and sorted(map(str, backend.removed)) == sorted(map(str, backend.made))
    for name, line in lines(report).items():
        assert line.status == "done" and line.point, (name, line.error)
        vm = backend.vm(name)
        manifest = repo.manifest(line.point)
        assert manifest.vm.name == name
        assert [d.index for d in manifest.disks] == [0, 1]
        for i, disk in enumerate(vm.backup_disks):
            out = tmp_path / f"{name}-{i}.img"
            result = repo.restore(line.point, i, out)
            assert result.bytes == disk.capacity_bytes
            assert out.read_bytes() == expected_image(backend, disk.file, disk.capacity_bytes), (name, i)
    job = catalog.job(report.job_id)
    assert job is not None and job.status == "complete"
    points = [p for p in catalog.points() if p.job_id == report.job_id]
    assert sorted(p.vm for p in points) == ["vm-01", "vm-02", "vm-03"]
    assert {p.id for p in points} == {v.point for v in report.vms}


def test_a_vm_whose_snapshot_always_fails_ends_failed_with_the_reason(repo: Repository, catalog: Catalog) -> None:
    backend = FakeBackend.build(3, snapshot_fails=["vm-02"])
    config = config_for(backend, repo)
    report = run_bounded(BackupRun(config, backend, repo, catalog))

    assert (report.status, report.exit_code) == ("partial", 3)
    by_vm = lines(report)
    assert by_vm["vm-02"].status == "failed"
    assert "CreateSnapshot_Task on vm-02 (vm-1002) failed: injected fault" in by_vm["vm-02"].error
    assert backend.creations["vm-02"] == config.job.policy.rounds  # tried again in every round
    assert by_vm["vm-01"].status == by_vm["vm-03"].status == "done"
    assert backend.present == []
    job = catalog.job(report.job_id)
    assert job is not None and job.status == "partial"
    assert "vm-02" in job.summary["not_backed_up"]


def test_reads_failing_once_per_vm_strand_each_vm_once_and_round_2_backs_it_up(
        repo: Repository, catalog: Catalog) -> None:
    backend = FakeBackend.build(3)
    backend.read_fails = lambda vm, offset: offset == BLOCK and vm not in backend.reads.failed
    report = run_bounded(BackupRun(config_for(backend, repo), backend, repo, catalog))

    assert (report.status, report.exit_code) == ("complete", 0)
    assert set(backend.reads.failed) == {"vm-01", "vm-02", "vm-03"}
    for name, line in lines(report).items():
        assert (line.status, line.round, line.attempts) == ("done", 2, 2), name
    results = catalog.results(report.job_id)
    for name in ("vm-01", "vm-02", "vm-03"):
        assert [(r.round, r.status) for r in results if r.vm == name] == [(1, "stranded"), (2, "done")]
        stranded = next(r for r in results if r.vm == name and r.status == "stranded")
        assert f"injected read failure of {name} at offset {BLOCK}" in stranded.error
    assert len(backend.made) == 6 and backend.present == []


def test_the_start_sweep_removes_a_dead_jobs_snapshot_and_spares_a_live_jobs(
        repo: Repository, catalog: Catalog) -> None:
    backend = FakeBackend.build(3)
    dead = backend.plant("vm-01", "nightly-20240101T000000Z-dead")
    live = backend.plant("vm-02", "weekly-20240101T000000Z-live")
    foreign = backend.plant("vm-03", None)  # an admin's snapshot: never ours to remove
    catalog.take_lease(live.owner or "", lease_holder(), 600)

    report = run_bounded(BackupRun(config_for(backend, repo), backend, repo, catalog))

    assert report.swept_snapshots == (str(dead),)
    assert report.to_json()["swept"]["snapshots"] == [f"{dead.name} (vm-1001)"]
    assert dead in backend.removed
    assert backend.present == [live, foreign]
    assert report.status == "complete"


class BreaksOnFirstEnd(Observer):
    def __init__(self) -> None:
        self.calls = 0

    def attempt_ended(self, end: AttemptEnd) -> None:
        self.calls += 1
        raise RuntimeError(f"observer broke on {end.vm}")


def test_an_observer_that_raises_ends_the_job_failed_with_the_reason(repo: Repository, catalog: Catalog) -> None:
    backend = FakeBackend.build(3, streams=1)  # one VM at a time: the others are still to do
    observer = BreaksOnFirstEnd()
    report = run_bounded(BackupRun(config_for(backend, repo), backend, repo, catalog), observer)

    assert report.status == "failed" and report.exit_code == 4
    assert observer.calls >= 1
    failed = [v for v in report.vms if v.status == "failed"]
    assert failed, "the VMs after the first end failed"
    for v in failed:
        assert "RuntimeError: observer broke on vm-01" in v.error, v.error
    assert backend.present == []
    job = catalog.job(report.job_id)
    assert job is not None and job.status == "failed"


def test_an_observer_that_raises_on_the_last_end_makes_the_job_exit_4_with_the_reason(
        repo: Repository, catalog: Catalog) -> None:
    backend = FakeBackend.build(1)  # the first end is the last: every VM is backed up when the observer breaks
    report = run_bounded(BackupRun(config_for(backend, repo), backend, repo, catalog), BreaksOnFirstEnd())
    assert report.exit_code == 4, report.to_json()
    assert any("observer broke on vm-01" in p for p in report.problems), report.problems
    assert backend.present == []


def test_a_selection_matching_no_vm_is_a_bad_job_naming_the_field(repo: Repository, catalog: Catalog) -> None:
    backend = FakeBackend.build(2)
    run = BackupRun(config_for(backend, repo, names=("db-*",)), backend, repo, catalog)
    with pytest.raises(BadJob, match=r"^job\.select: job 'nightly' selects no VM"):
        run.run()
    assert backend.made == [] and catalog.jobs() == []


def test_a_stop_from_another_thread_ends_the_job_interrupted_with_no_snapshot_left(
        repo: Repository, catalog: Catalog) -> None:
    hang = threading.Event()
    backend = FakeBackend.build(3, streams=1, hang=hang, hang_on=lambda vm, offset: offset == BLOCK)
    control = JobControl()
    run = BackupRun(config_for(backend, repo), backend, repo, catalog, control=control)
    out: dict[str, Any] = {}

    def stop_mid_job() -> None:
        try:
            if backend.reads.waiting.wait(BOUND):  # a disk is being read, and stops answering
                out["first"] = control.stop("stopped by the test")
        finally:
            hang.set()  # the disk answers again: its stream leaves at its next block

    stopper = threading.Thread(target=stop_mid_job, name="stopper", daemon=True)
    stopper.start()
    try:
        report = run_bounded(run)
    finally:
        hang.set()
    stopper.join(BOUND)

    assert out.get("first") is True, "the stop came while the job ran"
    assert report.status == "interrupted"
    by_vm = lines(report)
    assert by_vm["vm-03"].status == "failed" and "stopped by the test" in by_vm["vm-03"].error
    assert backend.present == []
    job = catalog.job(report.job_id)
    assert job is not None and job.status == "interrupted"
