"""A vCenter that stops answering, and one that forgets its sessions, against live simulators (DESIGN §9).

- a listener that accepts connections and never answers: `discover` ends within `timeout x retries` plus a
  margin, exit 4, one line "vCenter did not answer in N s";
- the simulator paused (SIGSTOP) in the middle of a backup: the job ends within its bound, exit 4, every VM not
  backed up reads "vCenter did not answer", the snapshots it could not remove are listed as left behind, and the
  next job (the simulator resumed) sweeps them;
- every session of the simulator terminated under a running job (as a vCenter restart does): the job logs in
  again and completes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.discovery import discover
from adapters.hotadd import left_behind_disks
from adapters.session import Session, connect
from adapters.snapshots import list_snapshots
from testbed.bed import USER, OwnTestbed, own_testbed
from testbed.images import sha256_file
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.repository import Repository

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, *argv: str, password: str, timeout: float = 300) -> tuple[int, str, str, float]:
    env = {**os.environ, "VSPHERE_USERNAME": USER, "VSPHERE_PASSWORD": password}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vsphere_proxy", *argv, "--config", str(config)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def start(config: Path, *argv: str, password: str) -> subprocess.Popen[str]:
    env = {**os.environ, "VSPHERE_USERNAME": USER, "VSPHERE_PASSWORD": password}
    return subprocess.Popen([sys.executable, "-m", "vsphere_proxy", *argv, "--config", str(config)], cwd=ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def variant(bed: OwnTestbed, name: str, *, vcenter: dict[str, Any] | None = None, mb_s: float | None = None,
            **policy: Any) -> Path:
    data = yaml.safe_load(bed.config.read_text())
    data["vcenter"].update(vcenter or {})
    data["job"]["name"] = name
    data["job"].setdefault("policy", {}).update(policy)
    if mb_s:
        for p in data["proxies"]:
            p["stream_mb_s"] = mb_s
    path = bed.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for(what: str, check: Any, timeout: float = 120, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return got


class Silent:
    """A TCP listener on loopback that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnTestbed]:
    with own_testbed(tmp_path_factory.mktemp("vcenter-faults")) as own:
        yield own


@pytest.fixture(scope="module")
def admin(bed: OwnTestbed) -> Iterator[Session]:
    with connect(bed.sim.url, USER, bed.password, insecure=True) as session:
        yield session


def test_a_vcenter_that_accepts_and_never_answers_fails_within_its_bound(bed: OwnTestbed) -> None:
    silent = Silent()
    try:
        config = variant(bed, "silent", vcenter={"url": f"http://127.0.0.1:{silent.port}/sdk", "timeout": 1,
                                                 "connect_retries": 2})
        code, _, err, took = run(config, "discover", password=bed.password, timeout=60)
    finally:
        silent.close()
    assert code == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "did not answer in" in lines[0], err
    assert took < 1 * 2 + 10, took  # timeout x retries, back-off and the interpreter's start-up


def ours(admin: Session, moref: dict[str, str]) -> set[str]:
    return {e.name for m in moref.values() for e in list_snapshots(admin, m) if e.ours}


def test_a_vcenter_paused_mid_job_ends_the_job_within_its_bound(bed: OwnTestbed, admin: Session) -> None:
    moref = {v.name: v.moref for v in discover(admin).vms}
    config = variant(bed, "paused", vcenter={"timeout": 2}, mb_s=4, incremental=False)
    catalog = Catalog.open(bed.work / "repository.catalog.sqlite")
    job = start(config, "backup", "--json", password=bed.password)
    paused = False
    try:
        job_id = wait_for("the job", lambda: next((j.id for j in catalog.jobs() if j.name == "paused"), None))
        wait_for("a VM done", lambda: any(r.status == "done" for r in catalog.results(job_id)))
        os.kill(bed.sim.pid, signal.SIGSTOP)
        paused, stopped_at = True, time.monotonic()
        out, err = job.communicate(timeout=240)
        took = time.monotonic() - stopped_at
    finally:
        if paused:
            os.kill(bed.sim.pid, signal.SIGCONT)
        if job.poll() is None:
            job.kill()
        catalog.close()
    report = json.loads(out)
    # 4 attempts of 2 s per call, the back-off, the streams' grace and the cleanup's: well under two minutes
    assert job.returncode == 4 and report["status"] == "failed" and took < 120, (took, err[-2000:])
    failed = {v["vm"]: v["error"] for v in report["vms"] if v["status"] == "failed"}
    assert failed and all("vCenter did not answer" in why for why in failed.values()), failed
    left = {e.name: vm for vm, m in moref.items() for e in list_snapshots(admin, m) if e.ours}
    listed = " ".join(report["left_behind"])
    # each snapshot still there is listed, by name, or as one whose creation got no answer
    unlisted = {name: vm for name, vm in left.items()
                if name not in listed and f"a snapshot of {vm} may have been made" not in listed}
    assert not unlisted, (unlisted, report["left_behind"])
    print(f"paused vCenter: exit 4 {took:.1f} s after SIGSTOP; {len(failed)} VMs failed; "
          f"{len(report['left_behind'])} left behind: {report['left_behind'][:3]}")
    # the next job (vCenter answering again) removes what the paused one left
    code, out, err, _ = run(variant(bed, "after-pause"), "backup", "--json", password=bed.password)
    assert code == 0, err[-2000:]
    assert ours(admin, moref) == set()
    swept = json.loads(out)["swept"]["snapshots"]
    # what the sweep removed was left by the paused job (vCenter, resumed, also carries out the requests it had
    # queued while paused: removals make snapshots go by themselves, creations make them appear late)
    assert all(s.startswith("vsphere-proxy-paused-") for s in swept), (left, swept)


def test_sessions_terminated_under_a_running_job_are_renewed(bed: OwnTestbed, admin: Session) -> None:
    config = variant(bed, "relogin", mb_s=8, incremental=False)
    catalog = Catalog.open(bed.work / "repository.catalog.sqlite")
    job = start(config, "backup", "--json", password=bed.password)
    terminated = 0
    try:
        job_id = wait_for("the job", lambda: next((j.id for j in catalog.jobs() if j.name == "relogin"), None))
        for n in (1, 4):  # twice: the renewed session must be renewable too
            wait_for(f"{n} VMs done", lambda n=n: sum(r.status == "done" for r in catalog.results(job_id)) >= n)
            manager = admin.content.sessionManager
            own = manager.currentSession.key
            others = [s.key for s in manager.sessionList if s.key != own]
            assert others, "the job holds a session"
            manager.TerminateSession(sessionId=others)
            terminated += len(others)
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        catalog.close()
    report = json.loads(out)
    assert job.returncode == 0 and report["status"] == "complete", err[-2000:]
    catalog = Catalog.open(bed.work / "repository.catalog.sqlite")
    try:
        failed = [(r.vm, r.error) for r in catalog.results(job_id) if r.status != "done"]
    finally:
        catalog.close()
    assert not failed, failed  # no call failed: each was repeated after a new login
    proxies = [v.moref for v in discover(admin).vms if v.name in ("proxy-prod", "proxy-dev")]
    assert not [d for ds in left_behind_disks(admin, proxies).values() for d in ds]
    repo = Repository.open(bed.work / "repository")
    latest = {m.vm.name: m for m in repo.points()}
    for (vm, index), digest in bed.images.items():
        if vm in {v["vm"] for v in report["vms"] if v["status"] == "done"}:
            out_path = bed.work / f"r-{vm}-{index}.img"
            repo.restore(latest[vm].id, index, out_path)
            assert sha256_file(out_path) == digest, (vm, index)
            out_path.unlink()
    print(f"terminated {terminated} sessions under the job; it completed")


def test_every_kind_of_call_after_the_session_was_terminated_logs_in_again_once(bed: OwnTestbed,
                                                                                admin: Session) -> None:
    from adapters.properties import read_one
    from adapters.properties import vm as vm_ref

    with connect(bed.sim.url, USER, bed.password, insecure=True) as job:
        moref = next(v.moref for v in discover(job).vms if v.name == "web-01")
        manager = admin.content.sessionManager
        manager.TerminateSession(sessionId=[s.key for s in manager.sessionList
                                            if s.key != manager.currentSession.key])
        # a property read of a dead session answers "missing: NotAuthenticated" instead of raising: renewed too
        devices = read_one(job, vm_ref(job, moref), ["config.hardware.device"]).get("config.hardware.device")
        assert devices and job.relogin is not None and job.relogin.logins == 1
        assert job.si.CurrentTime() is not None and job.relogin.logins == 1  # the new session is used as is
        assert "password" not in repr(job).lower() and bed.password not in repr(job)
