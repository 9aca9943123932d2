"""Randomized nights of faults against the testbed, and the guarantees every job gives (DESIGN §9) checked after each.

One simulator (the default topology, seeded disk images) serves every night. A night is one `vsphere-proxy backup`
job into a fresh repository of its own (on a tmpfs of its own when the night fills it), with one or two faults
drawn from the list below, injected once a random number of VMs is done:

    pause      vCenter stopped with SIGSTOP for 1-20 s (longer or shorter than timeout x attempts), then SIGCONT
    sessions   every vCenter session but the bench's terminated (what a vCenter restart does to its clients)
    full-repo  the repository's (and catalog's) file system filled
    concurrent a second job over overlapping VMs started beside the first
    resume     `backup --resume` of the running job (must be refused, exit 2)
    manifest   a committed restore point's manifest truncated
    chunk      one byte of a stored chunk flipped
    sigterm    SIGTERM to the job's coordinator
    sigint     SIGINT to the job's coordinator

After the night: the job ended within its bound (else it is killed and counted); every selected VM is done or
reported with a reason; no snapshot or hot-added disk of an ended job remains, unless the job's report lists it as
left behind (then the sweep of the next job removes it, which the bench then checks); `verify` is clean or names
exactly the restore points the night damaged; every VM reported done restores bit for bit (from an undamaged
point). One line per night, then `nights N, invariant violations V`; exit 1 when V > 0.

    python3 bench/chaos.py [--nights 30] [--seed S] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from adapters.discovery import discover
from adapters.hotadd import left_behind_disks, sweep_attached
from adapters.session import Session, connect
from adapters.snapshots import list_snapshots, sweep_snapshots
from testbed.bed import USER, OwnTestbed, own_testbed
from testbed.images import sha256_file
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.repository import Repository

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ("pause", "sessions", "full-repo", "concurrent", "resume", "manifest", "chunk", "sigterm", "sigint")
TIMEOUT = 2.0  # vcenter.timeout of the nights' jobs; a call makes 4 attempts
GRACE = 30.0  # the embedded engine's grace for streams and for cleanup, each
BOUND = 40 + 4 * TIMEOUT * 3 + 2 * GRACE + 20  # a fault-free night, a hung call's bound (x3 margin), grace, slack
PROXY_VMS = ("proxy-prod", "proxy-dev")


@dataclass
class Outcome:
    faults: list[str]
    status: str = "?"
    code: int | None = None
    seconds: float = 0.0
    done: int = 0
    reported: int = 0
    violations: list[str] = field(default_factory=list)


def env(password: str) -> dict[str, str]:
    return {**os.environ, "VSPHERE_USERNAME": USER, "VSPHERE_PASSWORD": password}


def popen(argv: list[str], password: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vsphere_proxy", *argv], cwd=ROOT, env=env(password),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(argv: list[str], password: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *argv], cwd=ROOT, env=env(password),
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[bool]:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(1 << 20))
            f.flush()


class Night:
    def __init__(self, number: int, rng: random.Random, bed: OwnTestbed, admin: Session, moref: dict[str, str],
                 work: Path) -> None:
        self.n, self.rng, self.bed, self.admin, self.moref = number, rng, bed, admin, moref
        self.dir = work / f"night-{number}"
        self.damaged: set[str] = set()  # restore points this night damaged on purpose
        self.pause: threading.Thread | None = None
        self.reports: list[dict[str, Any]] = []

    def config(self, name: str, select: dict[str, Any] | None = None) -> Path:
        data = yaml.safe_load(self.bed.config.read_text())
        data["vcenter"]["timeout"] = TIMEOUT
        data["job"]["name"] = name
        if select is not None:
            data["job"]["select"] = select
        data["job"]["policy"] = {"stall_seconds": 20, "lease_seconds": 6, "incremental": False}
        data["repository"] = {"path": str(self.dir / "repository")}
        for p in data["proxies"]:
            p["stream_mb_s"] = 12
        path = self.dir.parent / f"night-{self.n}-{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def run(self) -> Outcome:
        faults = sorted(self.rng.sample(FAULTS, self.rng.choice((1, 2))))
        if "sigterm" in faults and "sigint" in faults:
            faults.remove("sigint")
        out = Outcome(faults)
        size = f"{self.rng.randint(40, 120)}m" if "full-repo" in faults else "1g"
        try:
            with tmpfs(self.dir, size) as mounted:
                if not mounted:
                    out.violations.append("cannot mount a tmpfs (run as root)")
                    return out
                self._night(out)
        finally:
            if self.pause is not None:
                self.pause.join()
            shutil.rmtree(self.dir, ignore_errors=True)
        return out

    def _night(self, out: Outcome) -> None:
        config = self.config(f"night{self.n}")
        job = popen(["backup", "--config", str(config), "--json"], self.bed.password)
        started = time.monotonic()
        second: subprocess.Popen[str] | None = None
        catalog_path = self.dir / "repository.catalog.sqlite"
        job_id = self._wait(lambda: self._job_id(catalog_path, f"night{self.n}"), 60, job)
        if job_id is None:
            out.violations.append("the job never appeared in the catalog")
        else:
            at = self.rng.randint(0, 5)
            self._wait(lambda: self._done(catalog_path, job_id) >= at, 60, job)
            for fault in out.faults:
                second = self._inject(fault, job, job_id, out) or second
        try:
            stdout, stderr = job.communicate(timeout=max(1.0, BOUND - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            job.kill()
            stdout, stderr = job.communicate()
            out.violations.append(f"the job did not end within {BOUND:.0f} s")
        out.seconds, out.code = time.monotonic() - started, job.returncode
        if second is not None:
            try:
                s_out, s_err = second.communicate(timeout=BOUND)
                self._report(s_out, s_err, second.returncode, out, "second job")
            except subprocess.TimeoutExpired:
                second.kill()
                out.violations.append("the second job did not end within its bound")
        report = self._report(stdout, stderr, job.returncode, out, "job")
        if report is not None:
            out.status = report["status"]
            out.done = sum(1 for v in report["vms"] if v["status"] == "done")
            out.reported = sum(1 for v in report["vms"] if v["status"] != "done")
        if self.pause is not None:
            self.pause.join()
        self._check_vcenter(out)
        self._check_repository(config, out)

    def _wait(self, check: Any, timeout: float, job: subprocess.Popen[str]) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and job.poll() is None:
            with contextlib.suppress(Exception):
                got = check()
                if got:
                    return got
            time.sleep(0.05)
        return None

    @staticmethod
    def _job_id(catalog_path: Path, name: str) -> str | None:
        if not catalog_path.exists():
            return None
        catalog = Catalog.open(catalog_path)
        try:
            return next((j.id for j in catalog.jobs() if j.name == name), None)
        finally:
            catalog.close()

    @staticmethod
    def _done(catalog_path: Path, job_id: str) -> int:
        catalog = Catalog.open(catalog_path)
        try:
            return sum(1 for r in catalog.results(job_id) if r.status == "done")
        finally:
            catalog.close()

    def _inject(self, fault: str, job: subprocess.Popen[str], job_id: str,
                out: Outcome) -> subprocess.Popen[str] | None:
        sim = self.bed.sim
        if fault == "pause":
            seconds = self.rng.uniform(1, 20)
            os.kill(sim.pid, signal.SIGSTOP)
            self.pause = threading.Timer(seconds, lambda: os.kill(sim.pid, signal.SIGCONT))
            self.pause.start()
            out.faults[out.faults.index("pause")] = f"pause {seconds:.0f}s"
        elif fault == "sessions":
            manager = self.admin.content.sessionManager
            own = manager.currentSession.key
            others = [s.key for s in manager.sessionList if s.key != own]
            if others:
                manager.TerminateSession(sessionId=others)
        elif fault == "full-repo":
            fill(self.dir)
        elif fault == "concurrent":
            return popen(["backup", "--config", str(self.config(f"night{self.n}b", {"names": ["web-*", "app-*"]})),
                          "--json"], self.bed.password)
        elif fault == "resume":
            done = cli(["backup", "--config", str(self.config(f"night{self.n}")), "--resume", job_id],
                       self.bed.password, timeout=120)
            if done.returncode != 2 and job.poll() is None:
                out.violations.append(f"--resume of the live job exited {done.returncode}, not 2")
        elif fault in ("manifest", "chunk"):
            self._damage(fault, out)
        elif fault in ("sigterm", "sigint"):
            job.send_signal(signal.SIGTERM if fault == "sigterm" else signal.SIGINT)
        return None

    def _damage(self, fault: str, out: Outcome) -> None:
        points = sorted((self.dir / "repository" / "points").glob("*.json"))
        if not points:
            out.faults[out.faults.index(fault)] = f"{fault} (no point yet)"
            return
        victim = self.rng.choice(points)
        if fault == "manifest":
            data = victim.read_bytes()
            victim.write_bytes(data[: len(data) // 2])
            self.damaged.add(victim.stem)
            return
        manifest = json.loads(victim.read_bytes())
        chunks = [c for d in manifest["disks"] for c in d["blocks"] if c]
        if not chunks:
            out.faults[out.faults.index(fault)] = f"{fault} (an all-zero point)"
            return
        chunk = self.rng.choice(chunks)
        path = self.dir / "repository" / "chunks" / chunk[:2] / chunk
        data = bytearray(path.read_bytes())
        data[self.rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
        self.damaged.add(f"chunk:{chunk}")

    def _report(self, stdout: str, stderr: str, code: int | None, out: Outcome, what: str) -> dict[str, Any] | None:
        if not stdout.strip().startswith("{"):
            if code not in (2, 4):
                out.violations.append(f"{what} exited {code} without a report: {stderr.strip()[-300:]}")
            elif not stderr.strip() or len(stderr.strip().splitlines()) > 3:
                out.violations.append(f"{what} exited {code} without a one-line reason")
            return None
        report: dict[str, Any] = json.loads(stdout)
        self.reports.append(report)
        for v in report["vms"]:
            if v["status"] != "done" and not v["error"]:
                out.violations.append(f"{what}: {v['vm']} {v['status']} without a reason")
            if v["status"] not in ("done", "skipped", "failed", "unprotected"):
                out.violations.append(f"{what}: {v['vm']} left {v['status']}")
        expected = {"complete": 0, "partial": 3, "failed": 4}.get(report["status"])
        if report["status"] == "interrupted":
            if code not in (130, 143):
                out.violations.append(f"{what}: interrupted but exit {code}")
        elif expected is not None and code != expected and not (code == 4 and report.get("problems")):
            out.violations.append(f"{what}: {report['status']} but exit {code}")
        return report

    def _check_vcenter(self, out: Outcome) -> None:
        listed = " ".join(item for r in self.reports for item in r.get("left_behind", []))
        left = {e.name: vm for vm, m in self.moref.items() for e in list_snapshots(self.admin, m) if e.ours}
        unlisted = [f"{vm}: {name}" for name, vm in left.items()
                    if name not in listed and f"a snapshot of {vm} may have been made" not in listed]
        if unlisted:
            out.violations.append(f"snapshots left and not reported: {unlisted}")
        proxies = [self.moref[p] for p in PROXY_VMS]
        attached = [d.file for ds in left_behind_disks(self.admin, proxies).values() for d in ds]
        if attached:
            out.violations.append(f"disks left hot-added: {attached}")
        if left or attached:  # what the next job's sweep would do: the sweep must be able to remove it
            sweep_snapshots(self.admin, list(self.moref.values()))
            sweep_attached(self.admin, proxies)
            if any(e.ours for m in self.moref.values() for e in list_snapshots(self.admin, m)):
                out.violations.append("the sweep could not remove what was left")

    def _check_repository(self, config: Path, out: Outcome) -> None:
        if not (self.dir / "repository" / "config").exists():
            return
        done = cli(["verify", "--config", str(config), "--json"], self.bed.password)
        if not done.stdout.strip().startswith("{"):
            out.violations.append(f"verify exited {done.returncode} without a report: {done.stderr.strip()[-300:]}")
            return
        verify = json.loads(done.stdout)
        chunks = {c[len("chunk:"):] for c in self.damaged if c.startswith("chunk:")}
        expected = {p for p in self.damaged if not p.startswith("chunk:")}
        expected |= {u["point"] for p in verify["problems"] if p["chunk"] in chunks for u in p["used_by"]}
        named = set(verify["damaged"]) | {b["id"] for b in verify["broken_points"]}
        if named != expected:
            out.violations.append(f"verify named {sorted(named)}, the night damaged {sorted(expected)}")
        if chunks and not {p["chunk"] for p in verify["problems"]} >= chunks:
            out.violations.append("verify missed a flipped chunk")
        if (done.returncode == 0) != (not named):
            out.violations.append(f"verify exited {done.returncode} with damaged points {sorted(named)}")
        repo = Repository.open(self.dir / "repository")  # restores in this process: one interpreter, not forty
        with tempfile.TemporaryDirectory() as scratch:
            for report in self.reports:
                for v in report["vms"]:
                    if v["status"] != "done" or not v["point"] or v["point"] in named:
                        continue
                    for (vm, index), digest in self.bed.images.items():
                        if vm != v["vm"]:
                            continue
                        target = Path(scratch) / f"{vm}-{index}.img"
                        try:
                            repo.restore(v["point"], index, target)
                            why = "" if sha256_file(target) == digest else "differs from its source"
                        except Exception as e:
                            why = str(e)
                        if why:
                            out.violations.append(f"{vm} disk {index} from {v['point']} does not restore: {why}")
                        target.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--work", type=Path, help="where the nights' files go (default: a temporary directory)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"seed {seed} (replay: python3 bench/chaos.py --nights {args.nights} --seed {seed}); "
          f"bound per night {BOUND:.0f} s", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="vsphere-proxy-chaos-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench still unmounts and stops vcsim
    violations = 0
    try:
        with own_testbed(work) as bed, connect(bed.sim.url, USER, bed.password, insecure=True) as admin:
            moref = {v.name: v.moref for v in discover(admin).vms}
            for n in range(args.nights):
                night = Night(n, random.Random(f"{seed}-{n}"), bed, admin, moref, work)
                o = night.run()
                violations += len(o.violations)
                print(f"night {n}: faults [{', '.join(o.faults)}]; job {o.status} exit {o.code} in {o.seconds:.1f} s "
                      f"(bound {BOUND:.0f} s); {o.done} VMs done, {o.reported} reported; violations: "
                      f"{'; '.join(o.violations) or 'none'}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"nights {args.nights}, invariant violations {violations}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
