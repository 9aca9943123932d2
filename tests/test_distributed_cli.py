"""Bad input to the distributed engine's commands: one line naming the field and value, exit 2 (4 when Redis is
unreachable), and nothing started. Against the session's launcher; no Redis needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.redis_server import free_port
from vsphere_proxy.catalog import Catalog

pytestmark = pytest.mark.integration


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def config(tmp_path: Path, vcsim: Any, distributed: dict[str, Any] | None) -> Path:
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(tmp_path / "repo")}
    if distributed is not None:
        data["distributed"] = distributed
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_celery_engine_without_a_distributed_section_is_bad_input(vcsim: Any, tmp_path: Path) -> None:
    r = run("backup", "--engine", "celery", "--config", str(config(tmp_path, vcsim, None)))
    assert r.returncode == 2 and "distributed: not configured" in one_line(r)
    r = run("worker", "--proxy", "phys-01", "--config", str(config(tmp_path, vcsim, None)))
    assert r.returncode == 2 and "distributed: not configured" in one_line(r)


@pytest.mark.parametrize(("distributed", "expected"), [
    ({"broker": "redis://backup:s3cret@127.0.0.1:6379/0"}, "distributed.broker: must not contain a password"),
    ({"broker": "amqp://127.0.0.1//"}, "distributed.broker: must be a redis:// or rediss:// URL"),
    ({"broker": "redis://127.0.0.1/0", "lease_seconds": 3, "heartbeat_seconds": 5},
     "heartbeat_seconds: must be shorter than lease_seconds 3 (got 5)"),
])
def test_bad_distributed_settings_name_the_field(vcsim: Any, tmp_path: Path, distributed: dict[str, Any],
                                                 expected: str) -> None:
    r = run("backup", "--engine", "celery", "--config", str(config(tmp_path, vcsim, distributed)))
    line = one_line(r)
    assert r.returncode == 2 and expected in line and "s3cret" not in line, line


def test_unreachable_redis_is_exit_4_and_no_job_is_started(vcsim: Any, tmp_path: Path) -> None:
    path = config(tmp_path, vcsim, {"broker": f"redis://127.0.0.1:{free_port()}/0"})
    r = run("backup", "--engine", "celery", "--config", str(path))
    assert r.returncode == 4 and "cannot reach Redis" in one_line(r)
    catalog = Catalog.open(tmp_path / "repo.catalog.sqlite")
    try:
        assert catalog.jobs() == []
    finally:
        catalog.close()


def test_resume_of_an_unknown_or_ended_job_is_bad_input(vcsim: Any, tmp_path: Path) -> None:
    path = config(tmp_path, vcsim, None)
    r = run("backup", "--resume", "nightly-ghost", "--config", str(path))
    assert r.returncode == 2 and "--resume: job 'nightly-ghost' is not in the catalog" in one_line(r)
    catalog = Catalog.open(tmp_path / "repo.catalog.sqlite")
    try:
        catalog.start_job("testbed-old", "testbed", engine="embedded", policy={}, coordinator=None)
        catalog.finish_job("testbed-old", "complete", {})
        catalog.start_job("other-1", "other", engine="embedded", policy={}, coordinator=None)
    finally:
        catalog.close()
    r = run("backup", "--resume", "testbed-old", "--config", str(path))
    assert r.returncode == 2 and "already ended (complete)" in one_line(r)
    r = run("backup", "--resume", "other-1", "--config", str(path))
    assert r.returncode == 2 and "is a run of job 'other', not of 'testbed'" in one_line(r)


def test_worker_for_an_unknown_proxy_is_bad_input(vcsim: Any, tmp_path: Path) -> None:
    path = config(tmp_path, vcsim, {"broker": "redis://127.0.0.1:6379/0"})
    r = run("worker", "--proxy", "ghost", "--config", str(path))
    assert r.returncode == 2 and "--proxy: 'ghost' is not one of the configured proxies" in one_line(r)
