"""A vCenter that stops answering, and one that forgets its sessions, against live simulators (DESIGN §9).

- a listener that accepts connections and never answers: `discover` ends within `timeout x retries` plus a
  margin, exit 4, one line "vCenter did not answer in N s";
- the simulator paused (SIGSTOP) in the middle of a backup: the job ends within its bound, exit 4, every VM not
  backed up reads "vCenter did not answer", the snapshots it could not remove are listed as left behind, and the
  next job (the simulator resumed) sweeps them;
- every session of the simulator terminated under a running job (as a vCenter restart does): the job logs in
  again and completes.

Call by call, through the adapters: a silent listener fails `connect` and the `vcenter` block within
`timeout x retries`; with the simulator paused, a property read, a snapshot's creation and an NBD read each raise
`Unresponsive` within their bound, and the same session works once it is resumed; with every session dropped
(SOAP and Automation API), a SOAP call, an NBD read and a tag read succeed after one login each (one for many
threads at once), the keep-alive renews a session by itself; a simulator restarted on its address is logged in
to again, and one restarted with another password is refused once, never in a loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.discovery import discover
from adapters.errors import AuthError, ConnectError, VCenterUnresponsive
from adapters.hotadd import left_behind_disks
from adapters.nbd import NbdTransport
from adapters.properties import read_one
from adapters.properties import vm as vm_ref
from adapters.session import Session, connect
from adapters.snapshots import create_snapshot, job_prefix, list_snapshots, sweep_snapshots
from testbed import topology as topo
from testbed.bed import USER, OwnTestbed, own_testbed
from testbed.images import sha256_file, write_images
from testbed.launcher import Vcsim
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.cli.common import CommandError, vcenter
from vsphere_proxy.config import load_config
from vsphere_proxy.faults import Unresponsive
from vsphere_proxy.repository import Repository
from vsphere_proxy.transports import DiskSource, read_blocks

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


# --- the adapters, call by call ---------------------------------------------------------------------------------

DC = "DC0"


def nbd_disk(bed_images: dict[str, Path], topology: dict[str, Any], vm: str, index: int = 0) -> DiskSource:
    image = next(d for d in topo.disks(topology, bed_images) if d.vm == vm and d.index == index)
    name = f"{vm}.vmdk" if index == 0 else f"{vm}_{index}.vmdk"
    return DiskSource(vm, index, f"[{image.datastore}] {vm}/{name}", image.datastore, image.capacity)


def nbd_digest(session: Session, disk: DiskSource) -> str:
    h = hashlib.sha256()
    with NbdTransport.for_session(session, DC) as t:
        t.open(disk)
        for _, block in read_blocks(t, disk.capacity):
            h.update(block)
    return h.hexdigest()


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, text
    return text


def test_connect_and_the_vcenter_block_give_up_on_a_silent_listener_within_timeout_x_retries(
        bed: OwnTestbed) -> None:
    silent = Silent()
    try:
        url = f"http://127.0.0.1:{silent.port}/sdk"
        started = time.monotonic()
        with pytest.raises(VCenterUnresponsive) as err:
            connect(url, USER, bed.password, insecure=True, timeout=1, retries=2, attempts=2)
        took_connect = time.monotonic() - started
        config = load_config(variant(bed, "silent-block", vcenter={"url": url, "timeout": 1, "connect_retries": 2,
                                                                    "retries": 2}))
        started = time.monotonic()
        with pytest.raises(CommandError) as failed, vcenter(config):
            pass
        took_block = time.monotonic() - started
    finally:
        silent.close()
    assert isinstance(err.value, Unresponsive) and isinstance(err.value, ConnectError)
    assert "vCenter did not answer in 2 s" in one_line(err.value) and bed.password not in str(err.value)
    assert failed.value.code == 4 and "vCenter did not answer in 2 s" in one_line(failed.value)
    assert took_connect < 2 + 1.5 and took_block < 2 + 1.5, (took_connect, took_block)
    print(f"silent listener: connect gave up after {took_connect:.2f} s, the vcenter block after {took_block:.2f} s "
          "(timeout 1 s x 2 attempts)")


def test_a_paused_vcenter_bounds_a_property_read_a_snapshot_and_an_nbd_read(bed: OwnTestbed) -> None:
    job = "faults-paused-calls"
    took: dict[str, float] = {}
    with connect(bed.sim.url, USER, bed.password, insecure=True, timeout=1, attempts=2) as s:
        vm = next(v.moref for v in discover(s).vms if v.name == "web-01")
        disk = nbd_disk(bed.sim.datastores, bed.topology, "web-01")
        nbd = NbdTransport.for_session(s, DC)
        nbd.open(disk)
        first = nbd.read_block(0, 1 << 16)
        calls: list[tuple[str, Any, float]] = [
            ("property read", lambda: read_one(s, vm_ref(s, vm), ["name"]), 1 * 2),
            ("snapshot creation", lambda: create_snapshot(s, vm, job), 1 * 2),
            ("nbd read", lambda: nbd.read_block(0, 1 << 16), 1 * 2),
        ]
        bed.sim.pause()
        try:
            for what, call, bound in calls:
                started = time.monotonic()
                with pytest.raises(Unresponsive) as err:
                    call()
                took[what] = time.monotonic() - started
                assert "vCenter did not answer in" in one_line(err.value), (what, err.value)
                assert took[what] < bound + 1.5, (what, took[what])
        finally:
            bed.sim.resume()
        # the same session answers again, without a new login
        assert read_one(s, vm_ref(s, vm), ["name"]) == {"name": "web-01"}
        assert nbd.read_block(0, 1 << 16) == first
        assert s.relogin is not None and s.relogin.logins == 0
        # the creation sent while paused is carried out once resumed: that snapshot is ours to remove
        wait_for("the snapshot made once resumed", lambda: any(e.name.startswith(job_prefix(job))
                                                               for e in list_snapshots(s, vm)), timeout=30)
        sweep_snapshots(s, [vm], job_id=job)
        assert not [e for e in list_snapshots(s, vm) if e.name.startswith(job_prefix(job))]
    print("paused vCenter (timeout 1 s, 2 attempts): " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items()))


def test_dropped_sessions_are_renewed_once_for_soap_the_datastore_and_the_sdk(bed: OwnTestbed) -> None:
    with connect(bed.sim.url, USER, bed.password, insecure=True) as s, s.tag_client() as tags:
        assert s.relogin is not None
        moref = {v.name: v.moref for v in discover(s).vms}
        disk = nbd_disk(bed.sim.datastores, bed.topology, "web-01")
        want = bed.images[("web-01", 0)]
        tagged = tags.vm_tags(list(moref.values()))
        logins = s.counter.calls["Login"]

        dropped = bed.sim.drop_sessions()
        assert dropped["soap"] >= 1 and dropped["api"] >= 1, dropped
        # the datastore refuses the dead cookie first: one login, the disk read whole
        assert nbd_digest(s, disk) == want and s.relogin.logins == 1
        # SOAP goes on with that session as it is
        assert read_one(s, vm_ref(s, moref["web-01"]), ["name"]) == {"name": "web-01"}
        assert s.si.CurrentTime() is not None and s.relogin.logins == 1
        # the SDK's session is its own: renewed once too
        assert tags.vm_tags(list(moref.values())) == tagged and tags.logins == 1
        assert s.counter.calls["Login"] == logins + 1

        # many threads at once after the next drop: one login for all of them
        bed.sim.drop_sessions()
        stale = NbdTransport.for_session(s, DC)  # holds the dead cookie: its first read is refused

        def work(i: int) -> tuple[str, str]:
            if i % 2:
                return "nbd", nbd_digest(s, disk)
            name = next(n for n in sorted(moref) if n != "web-01")
            return "soap", str(read_one(s, vm_ref(s, moref[name]), ["name"])["name"])

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(16)))
        stale.open(disk)
        assert stale.read_block(0, 4096)
        assert all(v == want for k, v in results if k == "nbd") and {k for k, _ in results} == {"nbd", "soap"}
        assert s.relogin.logins == 2 and s.counter.calls["Login"] == logins + 2
        assert bed.password not in repr(s) and bed.password not in repr(s.relogin) and "Secret('" in repr(s.password)


def test_the_keep_alive_renews_a_dropped_session_by_itself(bed: OwnTestbed) -> None:
    with connect(bed.sim.url, USER, bed.password, insecure=True) as s:
        assert s.relogin is not None
        with s.keep_alive(interval=0.2) as beating:
            wait_for("a beat", lambda: beating.beats >= 1, timeout=10)
            bed.sim.drop_sessions()
            wait_for("the session renewed by the keep-alive", lambda: s.relogin is not None and s.relogin.logins == 1,
                     timeout=10)
        wait_for("the keep-alive ended", lambda: not beating.running, timeout=5)
        assert s.relogin.logins == 1 and s.si.CurrentTime() is not None


def test_a_restarted_vcenter_is_logged_in_to_again_and_a_changed_password_is_refused_once(tmp_path: Path) -> None:
    password, changed = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    topology = topo.load(topo.DEFAULT_TOPOLOGY)
    sim = Vcsim.start(topo.DEFAULT_TOPOLOGY, USER, password)
    try:
        write_images(topo.disks(topology, sim.datastores))
        with connect(sim.url, USER, password, insecure=True, timeout=5, attempts=2) as s, s.tag_client() as tags:
            assert s.relogin is not None
            moref = {v.name: v.moref for v in discover(s).vms}
            tagged = tags.vm_tags(list(moref.values()))
            address = sim.address
            sim.stop()
            sim = Vcsim.start(topo.DEFAULT_TOPOLOGY, USER, password, listen=address)
            images = write_images(topo.disks(topology, sim.datastores))
            # the same session object after the restart: one login, the same inventory and references
            assert {v.name: v.moref for v in discover(s).vms} == moref and s.relogin.logins == 1
            assert nbd_digest(s, nbd_disk(sim.datastores, topology, "app-03", 1)) == images[("app-03", 1)]
            assert tags.vm_tags(list(moref.values())) == tagged and tags.logins == 1
            assert s.relogin.logins == 1

            # restarted with another password: logging in again is refused, once, whatever is called next
            sim.stop()
            sim = Vcsim.start(topo.DEFAULT_TOPOLOGY, USER, changed, listen=address)
            write_images(topo.disks(topology, sim.datastores))
            logins = s.counter.calls["Login"]
            errors: list[BaseException] = []
            for call in (s.si.CurrentTime, lambda: read_one(s, vm_ref(s, moref["web-01"]), ["name"]),
                         lambda: nbd_digest(s, nbd_disk(sim.datastores, topology, "web-01")), tags.categories):
                with pytest.raises(AuthError) as err:
                    call()
                errors.append(err.value)
            assert s.counter.calls["Login"] == logins + 1, s.counter.calls["Login"] - logins
            assert tags.logins == 1
            for e in errors:
                assert "refused" in one_line(e) and password not in str(e) and changed not in str(e)
    finally:
        sim.stop()
