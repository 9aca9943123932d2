"""Randomized nights on the testbed: a backup job with one or two faults a real night brings, injected at a random
moment, and after it the guarantees every job keeps (README "When the night goes wrong").

One simulator (the default topology) serves every night; with `--engine celery` or `both` it is the distributed
testbed (Redis, PostgreSQL, 3 proxy workers), otherwise the embedded engine's, with a SQLite catalog. A night
starts by putting the simulator back as a night finds it: it is resumed if paused, every snapshot of ours and every
disk left hot-added is removed (what a night left there was counted against that night), dead workers are started
again, and 0-3 random extents of random disks are rewritten (the seeded images' digests follow). Nights share one
repository, on a tmpfs of its own (1 GiB) so that a night can fill it; each job reads every block
(`incremental: false`), so each night's points are full reads deduplicated against the earlier nights'. What a night
did to the repository is undone at its end, after its checks: the filler removed, damaged files put back, so every
night starts from a sound repository with room.

A night's job runs as `python3 -m vsphere_proxy backup --config C --json` (credentials in VSPHERE_USERNAME /
VSPHERE_PASSWORD) with short limits (vCenter timeout 2-3 s, 2 attempts a call, `stall_seconds` 10, job lease 6 s,
3 rounds, streams throttled to 8 MB/s so a job lasts some seconds). The faults, each at a random time after the
job's start or once a random number of its VMs are done (per the catalog):

- vCenter paused (SIGSTOP) for less than one call's timeout, for more but less than timeout x attempts, or for more
  than that, then resumed (SIGCONT); its sessions dropped (SIGUSR1, as a vCenter restart does);
- the repository's file system fills; the catalog's does (a fresh SQLite catalog on a small tmpfs; embedded engine);
- a second job over two groups of VMs: one the first job leaves out (both jobs back up at once) and one it backs
  up (the second must skip those); `backup --resume` of the running job;
- a truncated manifest, a flipped byte in a chunk file: before the job (a chunk so damaged is first found by a
  `verify`, as the admin's would) or in its middle;
- SIGTERM or SIGINT to the job's process; SIGKILL to a proxy worker (Celery).

A job still running `KILL_AFTER` seconds past its bound is killed (SIGTERM, then SIGKILL) and counted. The bound
of a night is 1.5 x the fault-free job's time + 10 s, plus what its faults may add: timeout x attempts x 2 when
vCenter is hit, the pause itself, the engine's grace time when a fault ends the job early, the other job's time.

After each night, the invariants (each breach is a violation):
- every job ended within its bound, with the exit code its report's status calls for (128 + the signal when
  interrupted), its report listing every VM it selects, each done with a restore point or reported with a reason;
  the catalog agrees (job ended, not live) unless the catalog's own disk was full;
- no snapshot of ours and no hot-added disk remains in vCenter but those a report lists as left behind; nothing
  of the night's jobs is held in the Redis ledger; nothing is left in the repository's `tmp/`;
- `verify --json` is clean, or names exactly the restore points the damage broke (those using a damaged chunk that
  is no longer stored, and truncated manifests), and leaves no corrupt chunk in place; a chunk found corrupt before
  the job is stored again by the job when it reads the same bytes;
- every disk of every VM a job backed up restores (`restore --vm V --disk D --point P --to F`) to the bytes the
  disk held; a point broken by the damage must fail to restore, never give other bytes;
- when it is the only fault that struck: a pause shorter than the timeout, dropped sessions, a damaged manifest or
  chunk, `--resume` (refused: exit 2, one line) and a second job leave the job(s) complete, exit 0; a signal ends
  the job interrupted, exit 128 + the signal, its VMs not done reading "interrupted by SIG..."; a full repository
  fails the VMs not done with "repository full: ...". Neither job may back up a VM while the other does, nor sweep
  what the other made, and no VM is skipped as busy by both.
A job refused before it began (exit 2, 4 or 5 with one line on stderr, never in the catalog: the second job when
the catalog is full) is what a hook sees, not a violation; the night's notes say so.

The seed is printed first; night i draws everything from random.Random(f"{seed}-{i}"), so `--seed S --start i
--nights 1` draws night i again (on a testbed that has not lived the nights before it). Restores run through the
CLI's `main` in one helper process (testbed/chaos.py), so that one costs milliseconds, not an interpreter start.

    python3 bench/chaos.py [--nights 30] [--seed S] [--engine embedded|celery|both] [--start 1] [--keep] [--plan]

`--plan` prints what the nights draw without running them; `--keep` keeps the work directory (each night's
configs, the jobs' JSON reports and stderr, the workers' logs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
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
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from testbed import topology as topo
from testbed.bed import USER, own_testbed
from testbed.chaos import (
    CliRunner,
    CliTimeout,
    Damage,
    MountError,
    PointFile,
    block_hash,
    chunk_path,
    chunk_state,
    fill,
    flip_byte,
    left_in_vcenter,
    read_points,
    small_tmpfs,
    sweep_everything,
    truncate,
)
from testbed.images import sha256_file
from testbed.writes import rewrite

ROOT = Path(__file__).resolve().parents[1]
STREAM_MB_S = 8.0
ATTEMPTS = 2  # vcenter.retries and vcenter.connect_retries of every night
WORKER_TIMEOUT = 3.0  # the proxy workers' vcenter.timeout (a Celery night uses it too)
STALL = 10.0
POLICY: dict[str, Any] = {"incremental": False, "stall_seconds": STALL, "lease_seconds": 6}
DISTRIBUTED: dict[str, Any] = {"lease_seconds": 3, "heartbeat_seconds": 0.5, "idle_seconds": 3}
# how long an ending job waits for its streams to leave (the distributed engine: at least 30 s for its workers)
GRACE = {"embedded": 30.0, "celery": max(float(DISTRIBUTED["idle_seconds"]), 30.0)}
KILL_AFTER = 20.0
REPOSITORY_MIB = 1024
GROUPS = ("web-*", "db-*", "app-*", "dev-*", "test-*")
VERIFY_TIMEOUT = 120.0


def shorten(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------------------- testbed

@dataclass
class Bed:
    """What every night shares."""

    work: Path
    sim: Any
    password: str
    topology: dict[str, Any]
    images: dict[tuple[str, int], str]  # (vm, disk) -> sha256 of what the disk holds now
    base: dict[str, Any]  # the config every night's is made from
    catalog_url: str
    repository: Path
    fleet: Any | None
    env: dict[str, str]
    cli: CliRunner
    moref: dict[str, str] = field(default_factory=dict)
    proxy_morefs: list[str] = field(default_factory=list)
    disks: dict[tuple[str, int], topo.DiskImage] = field(default_factory=dict)
    fault_free: dict[str, float] = field(default_factory=dict)
    repository_fs: Path | None = None  # the tmpfs the repository lives on

    def session(self) -> Any:
        from adapters.session import connect

        return connect(self.sim.url, USER, self.password, insecure=True, timeout=10)

    @property
    def machines(self) -> list[str]:
        return [m["Name"] for m in self.topology["Machine"]]

    @property
    def proxy_vms(self) -> list[str]:
        return [p["Name"] for p in self.topology.get("Proxy") or [] if p.get("Kind") == "vm"]


@contextlib.contextmanager
def testbed(work: Path, engines: tuple[str, ...]) -> Iterator[Bed]:
    from adapters.discovery import discover

    with contextlib.ExitStack() as stack:
        fs: Path | None = work / "repository-fs"
        try:
            stack.enter_context(small_tmpfs(work / "repository-fs", REPOSITORY_MIB))
        except MountError as e:
            print(f"note: {e}; the repository is not on a file system of its own and does not fill", flush=True)
            fs = None
        repository = (fs or work) / "repository"
        fleet_bed: Any = None
        if "celery" in engines:
            from testbed.fleet import fleet

            fleet_bed = stack.enter_context(fleet(work, policy=POLICY, stream_mb_s=STREAM_MB_S,
                                                  distributed=DISTRIBUTED))
            data = yaml.safe_load(fleet_bed.config.read_text())
            data["vcenter"].update(timeout=WORKER_TIMEOUT, retries=ATTEMPTS, connect_retries=ATTEMPTS)
            data["repository"]["path"] = str(repository)
            fleet_bed.config.write_text(yaml.safe_dump(data))
            fleet_bed.stop_workers()  # the workers' own vCenter calls are bounded as the jobs' are
            for proxy in list(fleet_bed.workers):
                fleet_bed.start_worker(proxy)
            sim, password, topology, images = fleet_bed.sim, fleet_bed.password, fleet_bed.topology, fleet_bed.images
            catalog_url = fleet_bed.catalog_url
        else:
            own = stack.enter_context(own_testbed(work))
            data = yaml.safe_load(own.config.read_text())
            sim, password, topology, images = own.sim, own.password, own.topology, own.images
            catalog_url = f"sqlite:///{work / 'catalog.sqlite'}"
        data["vcenter"]["credentials"] = {}  # from VSPHERE_USERNAME / VSPHERE_PASSWORD
        data["vcenter"].update(retries=ATTEMPTS, connect_retries=ATTEMPTS)
        for proxy in data["proxies"]:
            proxy["stream_mb_s"] = STREAM_MB_S
        env = {**os.environ, "VSPHERE_USERNAME": USER, "VSPHERE_PASSWORD": password}
        cli = CliRunner(env, work / "commands.log")
        stack.callback(cli.close)
        bed = Bed(work, sim, password, topology, images, data, catalog_url, repository, fleet_bed, env, cli,
                  repository_fs=fs)
        session = bed.session()
        try:
            bed.moref = {v.name: v.moref for v in discover(session).vms}
        finally:
            session.close()
        bed.proxy_morefs = [bed.moref[p] for p in bed.proxy_vms if p in bed.moref]
        bed.disks = {(d.vm, d.index): d for d in topo.disks(topology, sim.datastores)}
        yield bed


# -------------------------------------------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One `vsphere-proxy backup` process of a night."""

    name: str
    config: Path
    select: dict[str, Any]
    engine: str
    out: Path
    extra: tuple[str, ...] = ()
    refusal: bool = False  # a `--resume` of a live job: it must be refused
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ended: float | None = None
    code: int | None = None
    killed: bool = False
    signal: int | None = None  # sent by a fault
    report: dict[str, Any] | None = None
    stderr: str = ""
    job_id: str | None = None

    @property
    def seconds(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.ended is None and self.proc.poll() is None

    def start(self, env: dict[str, str]) -> None:
        argv = [sys.executable, "-m", "vsphere_proxy", "backup", "--config", str(self.config), "--engine",
                self.engine, "--json", *self.extra]
        with open(self.out.with_suffix(".json"), "wb") as stdout, open(self.out.with_suffix(".err"), "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                         stderr=err, start_new_session=True)
        self.started = time.monotonic()

    def reap(self) -> bool:
        """True once the process has ended (its code, report and stderr read)."""
        if self.ended is not None:
            return True
        if self.proc is None or self.proc.poll() is None:
            return False
        self.ended, self.code = time.monotonic(), self.proc.returncode
        text = self.out.with_suffix(".json").read_text(errors="replace")
        if text.strip().startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                self.report = json.loads(text)
        self.stderr = self.out.with_suffix(".err").read_text(errors="replace")
        if self.report:
            self.job_id = self.report.get("job_id")
        return True

    def kill(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def last_error(self) -> str:
        lines = [x for x in self.stderr.strip().splitlines() if x.strip()]
        return lines[-1][:200] if lines else "(no stderr)"


# ------------------------------------------------------------------------------------------------------------ nights

@dataclass
class Trigger:
    """When a fault strikes: `seconds` after the job started, or once `done` of its VMs are done."""

    seconds: float | None = None
    done: int | None = None

    @classmethod
    def draw(cls, rng: random.Random) -> Trigger:
        if rng.random() < 0.5:
            return cls(seconds=round(rng.uniform(1.0, 6.0), 1))
        return cls(done=rng.randint(1, 14))

    def __str__(self) -> str:
        return f"at {self.seconds:g} s" if self.seconds is not None else f"at {self.done} VMs done"


@dataclass
class Night:
    index: int
    rng: random.Random
    engine: str
    dir: Path
    timeout: float
    repository: Path
    catalog_url: str
    fault_free: float
    faults: list[Fault] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    over: threading.Event = field(default_factory=threading.Event)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damage: list[ChunkOrManifest] = field(default_factory=list)
    cleanups: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    bound: float = 0.0
    _catalog: Any = None

    @property
    def main(self) -> Job:
        return self.jobs[0]

    @property
    def timeout_x_attempts(self) -> float:
        return self.timeout * ATTEMPTS

    def catalog(self) -> Any:
        from vsphere_proxy.catalog import Catalog

        if self._catalog is None:
            self._catalog = Catalog.open(self.catalog_url)
        return self._catalog

    def close_catalog(self) -> None:
        if self._catalog is not None:
            with contextlib.suppress(Exception):
                self._catalog.close()
            self._catalog = None

    def add_job(self, job: Job, env: dict[str, str]) -> None:
        with self.lock:
            job.start(env)
            self.jobs.append(job)

    def job_id(self, job: Job) -> str | None:
        """The job's id, from its report or the catalog (by name)."""
        if job.job_id is None:
            with contextlib.suppress(Exception):
                job.job_id = next((j.id for j in self.catalog().jobs(200) if j.name == job.name), None)
        return job.job_id

    def done_count(self, job: Job) -> int:
        job_id = self.job_id(job)
        if job_id is None:
            return 0
        try:
            return sum(1 for r in self.catalog().results(job_id) if r.status == "done")
        except Exception:
            return 0

    def wait(self, trigger: Trigger) -> bool:
        """Wait for the trigger while the main job runs; False when it ended first."""
        job = self.main
        while job.alive:
            if trigger.seconds is not None and time.monotonic() - job.started >= trigger.seconds:
                return True
            if trigger.done is not None and self.done_count(job) >= trigger.done:
                return True
            time.sleep(0.05 if trigger.seconds is not None else 0.2)
        return False


@dataclass
class ChunkOrManifest:
    """Damage done to the repository, what it breaks and how it is checked."""

    damage: Damage
    found: bool = False  # found by a verify before the job
    points: set[str] = field(default_factory=set)  # the points it broke when it was done


# ------------------------------------------------------------------------------------------------------------ faults

class Fault:
    """One fault of a night: drawn from the night's generator, prepared before the job, injected at its trigger
    (in a thread of its own), checked after the night's jobs ended."""

    kind = ""
    engines: tuple[str, ...] = ("embedded", "celery")
    excludes: frozenset[str] = frozenset()
    ends_job = False  # may end the job early (the engine's grace time is in the bound)
    hits_vcenter = False

    def __init__(self, rng: random.Random) -> None:
        self.trigger: Trigger | None = Trigger.draw(rng)
        self.injected: float | None = None  # seconds after the main job's start
        self.missed = False
        self.skipped = ""  # why it could not be injected
        self.result = ""  # what it saw, for the night's line

    def describe(self) -> str:
        raise NotImplementedError

    def label(self) -> str:
        text = self.describe()
        if self.trigger is not None:
            text += f" {self.trigger}"
        if self.skipped:
            text += f" (not injected: {self.skipped})"
        elif self.missed:
            text += " (not injected: the job had ended)"
        if self.result:
            text += f": {self.result}"
        return text

    def setup(self, timeout: float) -> None:
        """Once the night's vCenter timeout is drawn."""

    def prepare(self, night: Night, bed: Bed) -> None:
        """Before the job starts."""

    def inject(self, night: Night, bed: Bed) -> None:
        """At the trigger."""

    def extra_bound(self, night: Night, bed: Bed) -> float:
        return 0.0

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        """After every job of the night ended; `sole` when it is the night's only fault."""
        return []

    def cleanup(self, night: Night, bed: Bed) -> None:
        """Always, at the end of the night."""

    @property
    def struck(self) -> bool:
        return self.injected is not None and not self.skipped


def main_complete(night: Night, what: str) -> list[str]:
    job = night.main
    status = (job.report or {}).get("status")
    if status != "complete" or job.code != 0:
        return [f"{what}: job {status or 'without report'} exit {job.code}, expected complete exit 0"]
    return []


class PauseVcenter(Fault):
    """SIGSTOP, then SIGCONT: shorter than one call's timeout (the job must not notice), between it and timeout x
    attempts (a call that changes nothing is made again; one that changes something is not), or longer."""

    kind = "pause"
    ends_job = True
    hits_vcenter = True

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.length = rng.choice(("short", "middle", "long"))
        self.factor = rng.uniform(*{"short": (0.3, 0.8), "middle": (1.2, 1.9), "long": (1.5, 3.0)}[self.length])
        self.seconds = 0.0
        self.paused = False
        self.than = ""

    def describe(self) -> str:
        return f"vCenter paused {self.seconds:.1f} s ({self.than})"

    def setup(self, timeout: float) -> None:
        if self.length == "long":
            self.seconds = self.factor * timeout * ATTEMPTS
            self.than = f"more than timeout x attempts {timeout * ATTEMPTS:g} s"
        else:
            self.seconds = self.factor * timeout
            self.than = (f"less than the timeout {timeout:g} s" if self.length == "short" else
                         f"more than the timeout {timeout:g} s, less than x attempts")
        self.seconds = round(self.seconds, 1)

    def inject(self, night: Night, bed: Bed) -> None:
        bed.sim.pause()
        self.paused = True
        until = time.monotonic() + self.seconds
        try:
            while time.monotonic() < until and not night.over.is_set():
                time.sleep(0.05)
        finally:
            bed.sim.resume()
            self.paused = False

    def extra_bound(self, night: Night, bed: Bed) -> float:
        return self.seconds

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        if sole and self.struck and self.length == "short":
            return main_complete(night, "vCenter paused less than the timeout")
        return []

    def cleanup(self, night: Night, bed: Bed) -> None:
        if self.paused:
            bed.sim.resume()
            self.paused = False


class DropSessions(Fault):
    kind = "drop"
    hits_vcenter = True

    def describe(self) -> str:
        return "vCenter sessions dropped"

    def prepare(self, night: Night, bed: Bed) -> None:
        if not hasattr(bed.sim, "drop_sessions"):
            self.skipped = "the simulator cannot drop its sessions"
            print(f"  night {night.index}: note: {self.skipped}; the fault is skipped", flush=True)

    def inject(self, night: Night, bed: Bed) -> None:
        if self.skipped:
            return
        dropped = bed.sim.drop_sessions(timeout=60)
        self.result = f"{dropped.get('soap', 0)} SOAP and {dropped.get('api', 0)} API sessions"

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        return main_complete(night, "sessions dropped") if sole and self.struck else []


class RepositoryFull(Fault):
    kind = "repository-full"
    ends_job = True

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.fillers: list[Path] = []

    def describe(self) -> str:
        return "repository's file system filled"

    def prepare(self, night: Night, bed: Bed) -> None:
        if bed.repository_fs is None:
            self.skipped = "the repository has no file system of its own"

    def inject(self, night: Night, bed: Bed) -> None:
        if bed.repository_fs is not None:
            filler = bed.repository_fs / f"filler-{night.index}"
            self.fillers.append(filler)
            self.result = f"{fill(bed.repository_fs, filler.name) >> 20} MiB written"

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        if not (sole and self.struck):
            return []
        report = night.main.report or {}
        bad = [f"{v['vm']}: {v['error']}" for v in report.get("vms", [])
               if v["status"] in ("failed", "unprotected") and "full" not in v["error"]]
        return [f"repository full, VMs failed for another reason: {shorten(bad, 2)}"] if bad else []

    def cleanup(self, night: Night, bed: Bed) -> None:
        """After the checks (restore and verify ran on the full file system): the space given back."""
        for filler in self.fillers:
            filler.unlink(missing_ok=True)


class CatalogFull(Fault):
    kind = "catalog-full"
    engines = ("embedded",)
    ends_job = True

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.mount: Path | None = None

    def describe(self) -> str:
        return "catalog on a 16 MiB tmpfs filled"

    def prepare(self, night: Night, bed: Bed) -> None:
        try:
            self.mount = night.cleanups.enter_context(small_tmpfs(night.dir / "catalog-fs", 16))
        except MountError as e:
            self.skipped = str(e)
            return
        night.catalog_url = f"sqlite:///{self.mount / 'catalog.sqlite'}"
        night.cleanups.callback(night.close_catalog)  # before the unmount

    def inject(self, night: Night, bed: Bed) -> None:
        if self.mount is not None:
            fill(self.mount)

    def extra_bound(self, night: Night, bed: Bed) -> float:
        return 15.0  # SQLite waits that long for a lock


class SecondJob(Fault):
    kind = "second-job"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.own = rng.choice(GROUPS)  # the first job leaves these VMs out: the second backs them up beside it
        self.groups = sorted([self.own, rng.choice([g for g in GROUPS if g != self.own])])
        self.trigger = Trigger(seconds=round(rng.uniform(0.5, 4.0), 1))
        self.job: Job | None = None

    def describe(self) -> str:
        return f"second job over {', '.join(self.groups)} (the first's without {self.own})"

    def prepare(self, night: Night, bed: Bed) -> None:
        select = {"names": self.groups}
        name = f"night-{night.index}-b"
        self.job = Job(name, write_config(bed, night, name, select), select, night.engine, night.dir / "second")

    def inject(self, night: Night, bed: Bed) -> None:
        assert self.job is not None
        night.add_job(self.job, bed.env)

    def extra_bound(self, night: Night, bed: Bed) -> float:
        return night.fault_free

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        b = self.job
        if b is None or b.proc is None:
            return []
        a = night.main
        self.result = f"{(b.report or {}).get('status', 'no report')} exit {b.code} in {b.seconds:.1f} s"
        out: list[str] = []
        ids = {j.name: night.job_id(j) for j in (a, b)}
        for one, other in ((a, b), (b, a)):
            swept = (one.report or {}).get("swept", {})
            theirs = [x for x in swept.get("snapshots", []) + swept.get("attached_disks", [])
                      if ids[other.name] and ids[other.name] in x]
            if theirs:
                out.append(f"{one.name} swept what the running {other.name} made: {shorten(theirs, 2)}")
        both = busy_in_both(a, b)
        if both:
            out.append(f"skipped by both jobs as busy: {shorten(both)}")
        if not any(f.kind == "catalog-full" for f in night.faults):
            twice = backed_up_at_once(night, a, b)
            if twice:
                out.append(f"backed up by both jobs at once: {shorten(twice)}")
        if sole and self.struck:
            out += main_complete(night, "second job")
            if (b.report or {}).get("status") != "complete" or b.code != 0:
                out.append(f"second job: {(b.report or {}).get('status')} exit {b.code}, expected complete exit 0")
        return out


def busy_in_both(a: Job, b: Job) -> list[str]:
    def busy(job: Job) -> set[str]:
        return {v["vm"] for v in (job.report or {}).get("vms", [])
                if v["status"] == "skipped" and "being backed up by job" in v["error"]}

    return sorted(busy(a) & busy(b))


def backed_up_at_once(night: Night, a: Job, b: Job) -> list[str]:
    def windows(job: Job) -> dict[str, tuple[Any, Any]]:
        job_id = night.job_id(job)
        if job_id is None:
            return {}
        out: dict[str, tuple[Any, Any]] = {}
        for s in night.catalog().streams(job_id):
            lo, hi = out.get(s.vm, (s.started, s.ended))
            out[s.vm] = (min(lo, s.started), max(hi, s.ended))
        return out

    try:
        wa, wb = windows(a), windows(b)
    except Exception:
        return []
    return sorted(vm for vm in wa.keys() & wb.keys() if wa[vm][0] < wb[vm][1] and wb[vm][0] < wa[vm][1])


class ResumeLive(Fault):
    kind = "resume"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.job: Job | None = None

    def describe(self) -> str:
        return "--resume of the running job"

    def inject(self, night: Night, bed: Bed) -> None:
        main = night.main
        while main.alive and night.job_id(main) is None:
            time.sleep(0.1)
        job_id = night.job_id(main)
        if job_id is None or not main.alive:
            self.missed = True
            return
        self.job = Job(f"{main.name}-resume", main.config, main.select, night.engine, night.dir / "resume",
                       extra=("--resume", job_id), refusal=True)
        night.add_job(self.job, bed.env)

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        job = self.job
        if job is None or job.proc is None:
            return []
        self.result = f"exit {job.code}"
        out: list[str] = []
        main_end = night.main.ended or time.monotonic()
        if job.code != 2:
            if main_end - job.started > 3.0:  # it was checked while the job ran
                out.append(f"--resume of the running job: exit {job.code} ({job.last_error()}), expected 2")
            else:
                self.result += " (the job was ending)"
        elif len(job.stderr.strip().splitlines()) != 1:
            out.append(f"--resume refused in {len(job.stderr.strip().splitlines())} lines, expected one")
        if sole and self.struck:
            out += main_complete(night, "--resume of the running job")
        return out


class DamageManifest(Fault):
    kind = "manifest"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.before = rng.random() < 0.5
        self.rng = random.Random(rng.random())
        if self.before:
            self.trigger = None

    def describe(self) -> str:
        return "truncated manifest" + (" before the job" if self.before else "")

    def prepare(self, night: Night, bed: Bed) -> None:
        if self.before:
            self._damage(night)
            self.injected = 0.0

    def inject(self, night: Night, bed: Bed) -> None:
        if not self.before:
            self._damage(night)

    def _damage(self, night: Night) -> None:
        points = sorted((night.repository / "points").glob("*.json"))
        if not points:
            self.skipped = "no restore point yet"
            return
        damage = truncate(self.rng.choice(points), self.rng)
        night.damage.append(ChunkOrManifest(damage, points={damage.name}))
        self.result = f"point {damage.name} cut to {damage.path.stat().st_size} of {len(damage.original)} bytes"

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        return main_complete(night, "truncated manifest") if sole and self.struck else []


class DamageChunk(Fault):
    kind = "chunk"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.before = rng.random() < 0.5
        self.rng = random.Random(rng.random())
        if self.before:
            self.trigger = None
        self.record: ChunkOrManifest | None = None

    def describe(self) -> str:
        return "flipped chunk byte" + (" before the job (found by verify)" if self.before else "")

    def prepare(self, night: Night, bed: Bed) -> None:
        if not self.before:
            return
        record = self._damage(night)
        self.injected = 0.0
        if record is None:
            return
        code, data, err = verify(night, night.main.config)
        named = set((data or {}).get("broken") or {})
        if code != 4 or not record.points <= named:
            night.violations.append(f"verify before the job did not find chunk {record.damage.name[:12]} flipped "
                                    f"(exit {code}; names {shorten(sorted(named)) or 'nothing'}) {err}".rstrip())
        record.found = True

    def inject(self, night: Night, bed: Bed) -> None:
        if not self.before:
            self._damage(night)

    def _damage(self, night: Night) -> ChunkOrManifest | None:
        points = read_points(night.repository)
        used = sorted({c for p in points.values() for c in p.chunks()
                       if chunk_path(night.repository, c).is_file()})
        if not used:
            self.skipped = "no chunk yet"
            return None
        chunk = self.rng.choice(used)
        damage = flip_byte(chunk_path(night.repository, chunk), self.rng)
        self.record = ChunkOrManifest(damage, points={p.id for p in points.values() if chunk in p.chunks()})
        night.damage.append(self.record)
        self.result = f"chunk {chunk[:12]} used by {len(self.record.points)} points"
        return self.record

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        record = self.record
        out: list[str] = []
        if record is not None and record.found:
            # the bytes it holds are read again by tonight's job: the job stores the chunk again
            chunk = record.damage.name
            readers = {(p.vm, d) for p in read_points(night.repository).values() if p.id in record.points
                       for d, blocks in (p.blocks or {}).items() if chunk in blocks}
            done = done_vms(night)
            again = [(vm, d) for vm, d in readers if vm in done and any(
                block_hash(bed.disks[(vm, d)].path, i) == chunk
                for i, c in enumerate(points_blocks(night, record, vm, d)) if c == chunk)]
            if again and chunk_state(night.repository, chunk) != "sound":
                out.append(f"chunk {chunk[:12]} found corrupt before the job was not stored again by the job "
                           f"that read its bytes ({again[0][0]} disk {again[0][1]})")
        if sole and self.struck:
            out += main_complete(night, "flipped chunk byte")
        return out


def points_blocks(night: Night, record: ChunkOrManifest, vm: str, disk: int) -> tuple[str | None, ...]:
    for p in read_points(night.repository).values():
        if p.id in record.points and p.vm == vm and p.blocks and disk in p.blocks:
            return p.blocks[disk]
    return ()


class SignalJob(Fault):
    kind = "signal"
    ends_job = True

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.signal = rng.choice((signal.SIGTERM, signal.SIGINT))

    def describe(self) -> str:
        return f"{self.signal.name} to the job"

    def inject(self, night: Night, bed: Bed) -> None:
        job = night.main
        if job.proc is None or not job.alive:
            self.missed = True
            return
        job.signal = int(self.signal)
        job.proc.send_signal(self.signal)

    def check(self, night: Night, bed: Bed, sole: bool) -> list[str]:
        job = night.main
        if not self.struck or job.killed:
            return []
        status = (job.report or {}).get("status")
        if (status, job.code) not in (("interrupted", 128 + self.signal), ("complete", 0)):
            return [f"{self.signal.name}: job {status or 'without report'} exit {job.code}, expected interrupted "
                    f"exit {128 + self.signal}"]
        if sole and status == "interrupted":
            why = f"interrupted by {self.signal.name}"
            other = [f"{v['vm']}: {v['error']}" for v in job.report["vms"] if v["status"] == "failed"
                     and v["error"] != why]
            if other:
                return [f"{self.signal.name}: VMs not reading '{why}': {shorten(other, 2)}"]
        return []


class KillWorker(Fault):
    kind = "kill-worker"
    engines = ("celery",)
    ends_job = True

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        from testbed.fleet import WORKER_PROXIES

        self.proxy = rng.choice(WORKER_PROXIES)

    def describe(self) -> str:
        return f"SIGKILL to worker {self.proxy}"

    def inject(self, night: Night, bed: Bed) -> None:
        assert bed.fleet is not None
        bed.fleet.workers[self.proxy].kill()

    def extra_bound(self, night: Night, bed: Bed) -> float:
        return STALL + DISTRIBUTED["lease_seconds"]


FAULTS: tuple[type[Fault], ...] = (PauseVcenter, DropSessions, RepositoryFull, CatalogFull, SecondJob, ResumeLive,
                                   DamageManifest, DamageChunk, SignalJob, KillWorker)


def draw_night(seed: str, index: int, engines: tuple[str, ...]) -> tuple[random.Random, str, float, list[Fault]]:
    """Night `index`'s generator, engine, vCenter timeout and faults: the same for the same seed."""
    rng = random.Random(f"{seed}-{index}")
    engine = rng.choice(engines)
    timeout = rng.choice((2.0, 2.5, 3.0))
    if engine == "celery":
        timeout = WORKER_TIMEOUT  # the workers' too
    kinds = [f for f in FAULTS if engine in f.engines]
    first = rng.choice(kinds)
    chosen = [first]
    if rng.random() < 0.4:
        rest = [f for f in kinds if f is not first and f.kind not in first.excludes
                and first.kind not in f.excludes]
        chosen.append(rng.choice(rest))
    faults = [f(rng) for f in chosen]
    for fault in faults:
        fault.setup(timeout)
    return rng, engine, timeout, faults


# ------------------------------------------------------------------------------------------------------------ a night

def write_config(bed: Bed, night: Night, name: str, select: dict[str, Any]) -> Path:
    data = copy.deepcopy(bed.base)
    data["vcenter"]["timeout"] = night.timeout
    data["job"] = {"name": name, "select": select, "policy": dict(POLICY)}
    data["repository"] = {"path": str(night.repository), "catalog": night.catalog_url}
    path = night.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def selected(bed: Bed, select: dict[str, Any]) -> set[str]:
    """The VMs a job's selection names (every VM of the testbed is under "/")."""
    def any_of(vm: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(vm, p) for p in patterns)

    return {vm for vm in bed.machines if ("/" in select.get("folders", []) or any_of(vm, select.get("names", [])))
            and not any_of(vm, select.get("exclude", []))}


def done_vms(night: Night) -> set[str]:
    return {v["vm"] for j in night.jobs for v in (j.report or {}).get("vms", []) if v["status"] == "done"}


def verify(night: Night, config: Path) -> tuple[int | None, dict[str, Any] | None, str]:
    """`verify --json` as its own process: (exit code, its JSON, its last stderr line)."""
    try:
        done = subprocess.run([sys.executable, "-m", "vsphere_proxy", "verify", "--config", str(config), "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=VERIFY_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return None, None, f"verify did not end in {VERIFY_TIMEOUT:g} s"
    data = None
    if done.stdout.strip().startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            data = json.loads(done.stdout)
    err = done.stderr.strip().splitlines()
    return done.returncode, data, err[-1][:200] if err else ""


def rewrite_disks(bed: Bed, night: Night, seed: str) -> None:
    """0-3 random extents of random disks written (as a guest would), the images' digests updated."""
    vms = [vm for vm in bed.machines if vm not in bed.proxy_vms]
    for vm in night.rng.sample(vms, night.rng.randint(0, 3)):
        indexes = sorted(d for v, d in bed.disks if v == vm)
        disk = bed.disks[(vm, night.rng.choice(indexes))]
        length = min(disk.capacity, night.rng.randint(1, 2 << 20))
        offset = night.rng.randrange(disk.capacity - length + 1)
        bed.images[(disk.vm, disk.index)] = rewrite(disk, [(offset, length)], seed=f"{seed}-{night.index}")


def restore_testbed(bed: Bed, night: Night) -> None:
    """The simulator as a night finds it: answering, nothing of ours in it, every worker up."""
    bed.sim.resume()
    if bed.fleet is not None:
        for proxy, proc in list(bed.fleet.workers.items()):
            if proc.poll() is not None:
                bed.fleet.start_worker(proxy)
    session = bed.session()
    try:
        removed = sweep_everything(session, bed.moref.values(), bed.proxy_morefs)
    finally:
        session.close()
    if removed:
        night.notes.append(f"the testbed's sweep removed {removed} snapshots and disks left before this night")


def run_night(bed: Bed, seed: str, index: int, engines: tuple[str, ...]) -> Night:
    rng, engine, timeout, faults = draw_night(seed, index, engines)
    directory = bed.work / f"night-{index}"
    directory.mkdir()
    night = Night(index, rng, engine, directory, timeout, bed.repository, bed.catalog_url, bed.fault_free[engine],
                  faults=faults)
    try:
        restore_testbed(bed, night)
        rewrite_disks(bed, night, seed)
        name = f"night-{index}"
        select: dict[str, Any] = {"folders": ["/"]}
        select["exclude"] = [f.own for f in night.faults if isinstance(f, SecondJob)]
        main = Job(name, night.dir / f"{name}.yaml", select, engine, night.dir / "job")
        night.jobs.append(main)
        for fault in night.faults:
            if fault.kind == "catalog-full":
                fault.prepare(night, bed)  # where the catalog is
        main.config = write_config(bed, night, name, select)
        for fault in night.faults:
            if fault.kind != "catalog-full":
                fault.prepare(night, bed)
        night.bound = bound(bed, night)
        with night.lock:
            main.start(bed.env)
        for fault in night.faults:
            if fault.trigger is not None and not fault.skipped:
                t = threading.Thread(target=strike, args=(fault, night, bed), daemon=True)
                t.start()
                night.threads.append(t)
        wait_all(night)
        check_night(bed, night)
    except Exception as e:  # the night could not be run or checked to its end: counted, the next one runs
        night.violations.append(f"bench error: {type(e).__name__}: {e}")
    finally:
        end_night(bed, night)
    return night


def bound(bed: Bed, night: Night) -> float:
    total = 1.5 * night.fault_free + 10.0
    if any(f.hits_vcenter for f in night.faults):
        total += night.timeout_x_attempts * 2
    if any(f.ends_job for f in night.faults):
        total += GRACE[night.engine]
    return total + sum(f.extra_bound(night, bed) for f in night.faults)


def strike(fault: Fault, night: Night, bed: Bed) -> None:
    assert fault.trigger is not None
    try:
        if not night.wait(fault.trigger):
            fault.missed = True
            return
        fault.injected = time.monotonic() - night.main.started
        fault.inject(night, bed)
    except Exception as e:
        fault.skipped = f"{type(e).__name__}: {e}"


def wait_all(night: Night) -> None:
    """Until every job of the night ended and every fault was injected; a job past its bound is killed."""
    while True:
        injecting = any(t.is_alive() for t in night.threads)
        with night.lock:
            jobs = list(night.jobs)
        running = False
        for job in jobs:
            if job.reap():
                continue
            running = True
            if time.monotonic() - job.started > night.bound + KILL_AFTER:
                job.kill()
                job.reap()
        if not running:
            night.over.set()
            if not injecting:
                return
        time.sleep(0.1)


def end_night(bed: Bed, night: Night) -> None:
    """Whatever happened: every process of the night ended, vCenter answering, mounts gone, damage put back."""
    night.over.set()
    with night.lock:
        jobs = list(night.jobs)
    for job in jobs:
        if job.alive:
            job.kill()
        job.reap()
    for t in night.threads:
        t.join(timeout=60)
    for fault in night.faults:
        with contextlib.suppress(Exception):
            fault.cleanup(night, bed)
    with contextlib.suppress(Exception):
        bed.sim.resume()
    night.close_catalog()
    night.cleanups.close()
    for record in night.damage:
        with contextlib.suppress(OSError):
            if record.damage.what == "manifest" or chunk_state(night.repository, record.damage.name) != "sound":
                record.damage.put_back()
    if bed.fleet is not None:
        for proxy, proc in list(bed.fleet.workers.items()):
            if proc.poll() is not None:
                with contextlib.suppress(Exception):
                    bed.fleet.start_worker(proxy)


# ------------------------------------------------------------------------------------------------------------ checks

def check_night(bed: Bed, night: Night) -> None:
    v = night.violations
    catalog_full = any(f.kind == "catalog-full" and f.struck for f in night.faults)
    for job in night.jobs:
        if job.proc is None:
            continue
        if job.refusal and job.code == 2:
            continue
        v += check_job(bed, night, job, catalog_full)
    struck = [f for f in night.faults if f.struck]
    for fault in night.faults:
        try:
            v += fault.check(night, bed, struck == [fault])
        except Exception as e:
            v.append(f"checking {fault.kind} failed: {type(e).__name__}: {e}")
    v += check_vcenter(bed, night)
    if night.engine == "celery":
        v += check_ledger(bed, night)
    tmp = [p for p in (night.repository / "tmp").rglob("*") if p.is_file()]
    if tmp:
        v.append(f"repository tmp/ holds {len(tmp)} files after the job")
    exempt = check_verify(night)
    v += check_restores(bed, night, exempt)


def check_job(bed: Bed, night: Night, job: Job, catalog_full: bool) -> list[str]:
    out: list[str] = []
    who = "job" if job is night.main else job.name
    if job.killed:
        out.append(f"{who} still running {night.bound + KILL_AFTER:.0f} s after its start: killed")
    elif job.seconds > night.bound:
        out.append(f"{who} took {job.seconds:.1f} s > bound {night.bound:.0f} s")
    report = job.report
    if report is None:
        lines = job.stderr.strip().splitlines()
        if (not job.killed and job.code in (2, 4, 5) and len(lines) == 1 and "error:" in lines[0]
                and night.job_id(job) is None):  # refused before it began (as a hook sees it: exit code, one line)
            night.notes.append(f"{job.name} did not begin: exit {job.code}, {job.last_error()}")
            return out
        if not job.killed:
            out.append(f"{who} exit {job.code} without a report: {job.last_error()}")
        out += check_catalog_vms(bed, night, job)
        return out
    status = report.get("status")
    if status == "interrupted":
        expected = {128 + job.signal} if job.signal else {130, 143}
    else:
        expected = {int(report.get("exit_code", -1))}
    if job.code not in expected and not job.killed:
        out.append(f"{who} {status} exit {job.code}, expected {' or '.join(map(str, sorted(expected)))}")
    if status == "interrupted" and job.signal is None and not job.killed:
        out.append(f"{who} interrupted without a signal")
    lines = {v["vm"]: v for v in report.get("vms", [])}
    missing = sorted(selected(bed, job.select) - lines.keys())
    if missing:
        out.append(f"{who}: selected VMs missing from its report: {shorten(missing)}")
    no_point = sorted(vm for vm, v in lines.items() if v["status"] == "done" and not v.get("point"))
    if no_point:
        out.append(f"{who}: done without a restore point: {shorten(no_point)}")
    unknown = sorted(f"{vm} {v['status']}" for vm, v in lines.items()
                     if v["status"] not in ("done", "failed", "unprotected", "skipped"))
    if unknown:
        out.append(f"{who}: VMs neither done nor reported: {shorten(unknown)}")
    no_reason = sorted(vm for vm, v in lines.items() if v["status"] != "done" and not v.get("error"))
    if no_reason:
        out.append(f"{who}: VMs not backed up without a reason: {shorten(no_reason)}")
    if not catalog_full and not report.get("problems"):
        out += check_catalog_job(night, job, status)
    return out


def check_catalog_job(night: Night, job: Job, status: str | None) -> list[str]:
    job_id = night.job_id(job)
    who = "job" if job is night.main else job.name
    try:
        row = night.catalog().job(job_id) if job_id else None
        live = night.catalog().live(job_id) if job_id else False
    except Exception as e:
        return [f"{who}: the catalog cannot be read: {type(e).__name__}: {e}"]
    out = []
    if row is None:
        out.append(f"{who}: not in the catalog")
    elif row.status != status:
        out.append(f"{who}: the catalog says {row.status}, its report {status}")
    if live:
        out.append(f"{who}: its lease is still live in the catalog after it ended")
    return out


def check_catalog_vms(bed: Bed, night: Night, job: Job) -> list[str]:
    """A job without a report: where the catalog says its VMs stand (`jobs --job ID --json`)."""
    who = "job" if job is night.main else job.name
    job_id = night.job_id(job)
    if job_id is None:
        return [f"{who}: not in the catalog"]
    try:
        code, text = bed.cli.run(["jobs", "--config", str(job.config), "--job", job_id, "--json"], timeout=60)
    except (CliTimeout, RuntimeError) as e:
        return [f"{who}: jobs --job: {e}"]
    if code != 0:
        return [f"{who}: jobs --job exit {code}"]
    data = json.loads(text)
    job.report = {"job_id": job_id, "status": data["status"], "exit_code": None, "left_behind": [],
                  "vms": [{"vm": s["vm"], "status": s["status"], "error": s["error"], "point": None}
                          for s in data["vms"]]}
    points = {a["vm"]: a["point"] for a in data["attempts"] if a["status"] == "done" and a["point"]}
    for line in job.report["vms"]:
        line["point"] = points.get(line["vm"])
    out = []
    if data["status"] == "running":
        out.append(f"{who}: left running in the catalog")
    open_ = sorted(f"{s['vm']} {s['status']}" for s in data["vms"] if s["status"] not in ("done", "failed",
                                                                                          "unprotected", "skipped"))
    if open_:
        out.append(f"{who}: VMs left {shorten(open_)} in the catalog")
    return out


def check_vcenter(bed: Bed, night: Night) -> list[str]:
    reported = [x for j in night.jobs for x in (j.report or {}).get("left_behind", [])]
    try:
        session = bed.session()
    except Exception as e:
        return [f"vCenter cannot be reached after the night: {type(e).__name__}: {e}"]
    try:
        left = left_in_vcenter(session, bed.moref, bed.proxy_morefs)
    finally:
        session.close()
    snaps = [f"{vm}: {name}" for vm, name in left.snapshots
             if not any(name in x or (f"snapshot of {vm}" in x) for x in reported)]
    disks = [file for _, file in left.disks if not any(file in x for x in reported)]
    out = []
    if snaps:
        out.append(f"{len(snaps)} snapshots left: {shorten(snaps, 2)}")
    if disks:
        out.append(f"{len(disks)} disks left hot-added: {shorten(disks, 2)}")
    if left:  # what the next job's sweep does: it must be able to remove all of it
        try:
            session = bed.session()
            try:
                sweep_everything(session, bed.moref.values(), bed.proxy_morefs)
                if left_in_vcenter(session, bed.moref, bed.proxy_morefs):
                    out.append("the sweep could not remove what was left")
            finally:
                session.close()
        except Exception as e:
            out.append(f"the sweep of what was left failed: {type(e).__name__}: {e}")
    return out


def check_ledger(bed: Bed, night: Night) -> list[str]:
    from vsphere_proxy.ledger_redis import RedisLedger

    ids = {night.job_id(j) for j in night.jobs} - {None}
    ledger = RedisLedger(bed.fleet.redis.client())
    deadline = time.monotonic() + DISTRIBUTED["lease_seconds"] + DISTRIBUTED["idle_seconds"] + 2
    held: list[Any] = []
    while time.monotonic() < deadline:
        held = [s for s in ledger.streams() if s.job in ids]
        if not held:
            return []
        time.sleep(0.5)
    return [f"the Redis ledger still holds {len(held)} streams of the night's jobs"]


def check_verify(night: Night) -> set[str]:
    """`verify` names exactly the points the damage broke; returns them (they must not restore)."""
    before = read_points(night.repository)
    code, data, err = verify(night, night.main.config)
    if data is None:
        night.violations.append(f"verify exit {code} without a report: {err}")
        return set()
    named = set(data.get("broken") or {}) | {b["id"] for b in data.get("broken_points") or []}
    broken: set[str] = set()
    for record in night.damage:
        damage = record.damage
        if damage.what == "manifest":
            broken.add(damage.name)
            continue
        state = chunk_state(night.repository, damage.name)
        if state == "corrupt":
            night.violations.append(f"verify left the corrupt chunk {damage.name[:12]} in place")
        if state != "sound":
            broken |= record.points if record.found else {p.id for p in before.values()
                                                          if damage.name in p.chunks()}
    extra, missed = sorted(named - broken), sorted(broken - named)
    if extra:
        night.violations.append(f"verify names undamaged points: {shorten(extra)} ({describe_points(before, extra)})")
    if missed:
        night.violations.append(f"verify does not name damaged points: {shorten(missed)}")
    if (code == 0) != (not named) or code not in (0, 4):
        night.violations.append(f"verify exit {code} naming {len(named)} points {err}".rstrip())
    return broken


def describe_points(points: dict[str, PointFile], ids: list[str]) -> str:
    vms = sorted({points[i].vm for i in ids if i in points and points[i].vm})
    return "of " + shorten(vms) if vms else "unreadable"


def check_restores(bed: Bed, night: Night, broken: set[str]) -> list[str]:
    """Every disk of every VM backed up tonight restores to the bytes the disk held; a broken point fails."""
    out: list[str] = []
    target = night.dir / "restored.img"
    config = str(night.main.config)
    for job in night.jobs:
        for line in (job.report or {}).get("vms", []):
            if line["status"] != "done" or not line.get("point"):
                continue
            vm, point = line["vm"], line["point"]
            for index in sorted(d for v, d in bed.disks if v == vm):
                try:
                    code, _ = bed.cli.run(["restore", "disk", "--config", config, "--vm", vm, "--disk", str(index),
                                           "--point", point, "--to", str(target), "--force", "--json"],
                                          timeout=120)
                except (CliTimeout, RuntimeError) as e:
                    out.append(f"restore of {vm} disk {index}: {e}")
                    continue
                right = code == 0 and target.exists() and sha256_file(target) == bed.images[(vm, index)]
                target.unlink(missing_ok=True)
                if point in broken:
                    if code == 0 and not right:
                        out.append(f"{vm} disk {index} (point {point}, broken) restored other bytes with exit 0")
                elif not right:
                    out.append(f"{vm} disk {index} (point {point}) " + (f"restore exit {code}" if code else
                                                                         "restored other bytes"))
    return out


# -------------------------------------------------------------------------------------------------------------- main

def fault_free(bed: Bed, engine: str) -> float:
    """One job without a fault: its time is each night's yardstick (and it fills the shared repository)."""
    directory = bed.work / f"fault-free-{engine}"
    directory.mkdir()
    night = Night(0, random.Random(0), engine, directory, WORKER_TIMEOUT, bed.repository, bed.catalog_url, 0.0)
    select = {"folders": ["/"]}
    job = Job(f"fault-free-{engine}", write_config(bed, night, f"fault-free-{engine}", select), select, engine,
              directory / "job")
    job.start(bed.env)
    try:
        assert job.proc is not None
        job.proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        job.kill()
    job.reap()
    report = job.report or {}
    done = sum(1 for v in report.get("vms", []) if v["status"] == "done")
    print(f"fault-free job ({engine}): {report.get('status', 'no report')} exit {job.code} in {job.seconds:.1f} s, "
          f"{done} VMs done, {report.get('bytes_read', 0) / 2**20:.0f} MiB read", flush=True)
    if job.code != 0:
        print(f"  the fault-free job did not complete: {job.last_error()}", flush=True)
    return job.seconds


def night_line(night: Night) -> str:
    job = night.main
    report = job.report or {}
    status = "killed" if job.killed else report.get("status", "without report")
    vms = report.get("vms", [])
    done = sum(1 for v in vms if v["status"] == "done")
    reported = sum(1 for v in vms if v["status"] != "done" and v.get("error"))
    faults = ", ".join(f.label() for f in night.faults)
    violations = "; ".join(night.violations) or "none"
    return (f"night {night.index} ({night.engine}): faults [{faults}]; job {status} exit {job.code} in "
            f"{job.seconds:.1f} s (bound {night.bound:.0f} s); {done} VMs done, {reported} reported; "
            f"violations: {violations}")


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--seed", type=int, help="default: a random one (printed)")
    ap.add_argument("--engine", choices=("embedded", "celery", "both"), default="both",
                    help="the engine of every night, or a random one per night (default both)")
    ap.add_argument("--start", type=int, default=1, help="the first night's number (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs, reports)")
    ap.add_argument("--plan", action="store_true", help="only print what each night draws (engine, timeout, faults)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    print(f"seed {seed}", flush=True)
    engines: tuple[str, ...] = ("embedded", "celery") if args.engine == "both" else (args.engine,)
    if args.plan:
        for index in range(args.start, args.start + args.nights):
            _, engine, timeout, faults = draw_night(str(seed), index, engines)
            print(f"night {index} ({engine}, vCenter timeout {timeout:g} s): faults "
                  f"[{', '.join(f.label() for f in faults)}]")
        return 0
    if "celery" in engines and not shutil.which("redis-server"):
        raise SystemExit("--engine celery needs redis-server (testbed/setup.sh installs it)")
    signal.signal(signal.SIGTERM, _stop)
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    violations = 0
    nights = 0
    interrupted = False
    started = first = time.monotonic()
    try:
        with testbed(work, engines) as bed:
            print(f"testbed: {len(bed.machines)} VMs, {len(bed.disks)} disks, "
                  f"{sum(d.capacity for d in bed.disks.values()) / 2**20:.0f} MiB; work {work}", flush=True)
            for engine in engines:
                bed.fault_free[engine] = fault_free(bed, engine)
            print("bound of a night: 1.5 x the fault-free job + 10 s; + timeout x attempts x 2 when vCenter is hit; "
                  f"+ the grace time (embedded {GRACE['embedded']:g} s, celery {GRACE['celery']:g} s) when a fault "
                  f"may end the job; + the pause, the second job, 15 s for a full catalog, {STALL:g} + "
                  f"{DISTRIBUTED['lease_seconds']:g} s for a killed worker; a job is killed {KILL_AFTER:g} s past it",
                  flush=True)
            first = time.monotonic()
            for index in range(args.start, args.start + args.nights):
                night = run_night(bed, str(seed), index, engines)
                nights += 1
                violations += len(night.violations)
                print(night_line(night), flush=True)
                for note in night.notes:
                    print(f"  night {index}: {note}", flush=True)
                if bed.sim.process.poll() is not None:
                    violations += 1
                    print(f"the simulator exited ({bed.sim.process.returncode}); no further night can run:\n"
                          f"{bed.sim.stderr_tail(10)}", flush=True)
                    break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", flush=True)
    if interrupted:
        print(f"interrupted after {nights} nights", flush=True)
    elif nights:
        print(f"{nights} nights in {time.monotonic() - first:.0f} s ({(time.monotonic() - first) / nights:.1f} s a "
              f"night; with the testbed's start {time.monotonic() - started:.0f} s)", flush=True)
    print(f"nights {nights}, invariant violations {violations}", flush=True)
    return 130 if interrupted else 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
