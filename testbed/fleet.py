"""A distributed-engine testbed: the vcsim launcher with seeded disks, a throwaway `redis-server` (broker, results,
ledger), a throwaway PostgreSQL for the catalog (SQLite beside the repository when PostgreSQL is not installed),
the config for all of it, and `vsphere-proxy worker` processes started and stopped by PID. Tests and
bench/distributed.py use it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.bed import own_testbed
from testbed.launcher import Vcsim
from testbed.postgres_server import PostgresServer, postgres_bindir
from testbed.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
WORKER_PROXIES = ("proxy-prod", "proxy-dev", "phys-01")  # phys-02's agent is inactive in the default topology


@dataclass
class FleetBed:
    sim: Vcsim
    redis: RedisServer
    postgres: PostgresServer | None
    work: Path
    config: Path
    catalog_url: str
    topology: dict[str, Any]
    images: dict[tuple[str, int], str]  # (vm, disk) -> sha256 of the seeded image
    password: str
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def variant(self, name: str, select: dict[str, Any] | None = None, **policy: Any) -> Path:
        """The config with another job name (and selection, policy fields)."""
        data = yaml.safe_load(self.config.read_text())
        data["job"]["name"] = name
        data["job"]["policy"].update(policy)
        if select is not None:
            data["job"]["select"] = select
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def command(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "vsphere_proxy", *argv]

    def start_worker(self, proxy: str, timeout: float = 60) -> None:
        """Start `vsphere-proxy worker --proxy` and wait for its first heartbeat."""
        from vsphere_proxy.engine.worker import heartbeat_key

        log_path = self.work / f"worker-{proxy}.log"
        with open(log_path, "ab") as log:
            self.workers[proxy] = subprocess.Popen(
                self.command("worker", "--config", str(self.config), "--proxy", proxy, "--log-level", "INFO"),
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        client = self.redis.client()
        deadline = time.monotonic() + timeout
        while not client.exists(heartbeat_key(proxy)):
            if self.workers[proxy].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {proxy} sent no heartbeat: {log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop_workers(self) -> None:
        """SIGTERM (running streams finish), then SIGKILL after 15 s."""
        for p in self.workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def backup(self, config: Path, *extra: str, engine: str = "celery") -> subprocess.Popen[str]:
        return subprocess.Popen(self.command("backup", "--config", str(config), "--engine", engine, "--json", *extra),
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


def finished(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, dict[str, Any]]:
    """Wait for a `backup --json` process; its exit code and report."""
    out, err = proc.communicate(timeout=timeout)
    if not out.strip().startswith("{"):
        raise RuntimeError(f"backup exited {proc.returncode} without a report: {err[-3000:]}")
    return proc.returncode, json.loads(out)


@contextlib.contextmanager
def fleet(work: Path, *, policy: dict[str, Any] | None = None, stream_mb_s: float | None = None,
          distributed: dict[str, Any] | None = None, disk_scale: float = 1.0,
          workers: tuple[str, ...] = WORKER_PROXIES) -> Iterator[FleetBed]:
    """Everything up, the workers started; everything stopped by PID at the end."""
    with contextlib.ExitStack() as stack:
        own = stack.enter_context(own_testbed(work, disk_scale=disk_scale))
        rs = stack.enter_context(RedisServer.start())
        pg = stack.enter_context(PostgresServer.start()) if postgres_bindir() else None
        config = own.config
        data = yaml.safe_load(config.read_text())
        catalog_url = pg.database_url() if pg else f"sqlite:///{work / 'catalog.sqlite'}"
        data["repository"]["catalog"] = catalog_url
        data["distributed"] = {"broker": rs.url, **(distributed or {})}
        data["job"]["policy"] = dict(policy or {})
        if stream_mb_s:
            for p in data["proxies"]:
                p["stream_mb_s"] = stream_mb_s
        config.write_text(yaml.safe_dump(data))
        bed = FleetBed(own.sim, rs, pg, work, config, catalog_url, own.topology, own.images, own.password)
        stack.callback(bed.stop_workers)
        for proxy in workers:
            bed.start_worker(proxy)
        yield bed
