"""The job's event stream (`docs/events.md`) from real backups of the session's simulator: a job with failures
injected (every VM's first read fails once, one VM's every read fails) whose final report is rebuilt from its
events alone, equal to what `--json` prints; the stream's order, numbering, throttled progress and schema; and the
command line's `--events FILE` and `--events -`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.faults import FailingReads
from vsphere_proxy.cli.common import open_catalog, open_repository, read_config, vcenter
from vsphere_proxy.jobs.backup import BackupRun
from vsphere_proxy.jobs.job_events import SCHEMA_VERSION, EventWriter, rebuild_report
from vsphere_proxy.transports import BLOCK

pytestmark = pytest.mark.integration

VMS = ["web-01", "app-02", "dev-04", "db-01"]
BROKEN = "dev-04"
FIELDS = {
    "job_started": {"name", "engine", "vms", "proxies", "stream_limits"},
    "round_started": {"round"},
    "vm_assigned": {"vm", "proxy", "mode", "round", "attempt", "disks", "reason"},
    "vm_progress": {"vm", "bytes_read", "bytes_total", "percent"},
    "vm_attempt_ended": {"vm", "round", "attempt", "proxy", "mode", "ok", "error", "bytes_read", "bytes_written",
                         "seconds", "point", "read", "final"},
    "vm_stranded": {"vm", "round", "error"},
    "vm_ended": {"vm", "result"},
    "job_ended": {"summary"},
}


def write_config(vcsim: Any, work: Path) -> Path:
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository")}
    data["job"]["select"] = {"names": VMS}
    data["job"]["policy"] = {**data["job"].get("policy", {}), "rounds": 3}
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def check_stream(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["v"] == SCHEMA_VERSION for e in events)
    assert events[0]["type"] == "job_started" and events[-1]["type"] == "job_ended"
    job = events[0]["job"]
    for e in events:
        assert e["job"] == job and set(e) - {"v", "seq", "time", "type", "job"} == FIELDS[e["type"]], e
        datetime.fromisoformat(e["time"])
    last: dict[str, datetime] = {}
    for e in (e for e in events if e["type"] == "vm_progress"):
        at = datetime.fromisoformat(e["time"])
        if e["vm"] in last:
            assert (at - last[e["vm"]]).total_seconds() >= 0.99  # at most once a second per VM
        last[e["vm"]] = at


def test_the_report_rebuilt_from_the_events_of_a_failing_job_equals_its_json(vcsim: Any, tmp_path: Path) -> None:
    config_path = write_config(vcsim, tmp_path)
    config = read_config(str(config_path))
    repo = open_repository(config, create=True)
    stream = io.StringIO()
    events = EventWriter(stream)
    with vcenter(config) as found:
        failing = FailingReads(found.backend, lambda vm, offset: vm == BROKEN or (
            offset == BLOCK and vm not in failing.failed))
        catalog = open_catalog(config)
        try:
            report = BackupRun(config, failing, repo, catalog, inventory=found.inventory,
                               on_start=events.job_started).run(events)
        finally:
            catalog.close()
    events.job_ended(report)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    check_stream(lines)
    data = report.to_json()
    assert data["status"] == "partial" and data["counts"].get("failed") == 1
    assert rebuild_report(lines) == json.loads(json.dumps(data, default=str))

    kinds = [e["type"] for e in lines]
    assert kinds.count("job_started") == 1 and kinds.count("job_ended") == 1
    assert [e["round"] for e in lines if e["type"] == "round_started"] == [1, 2, 3]
    stranded = {(e["vm"], e["round"]) for e in lines if e["type"] == "vm_stranded"}
    assert (BROKEN, 1) in stranded and (BROKEN, 3) not in stranded  # failed for good after the last round
    ended = [e for e in lines if e["type"] == "vm_attempt_ended"]
    failed_first = {e["vm"] for e in ended if e["round"] == 1 and not e["ok"]}
    assert {vm for vm, r in stranded if r == 1} == failed_first and len(failed_first) >= 2
    assert any(not e["ok"] and e["error"] for e in ended) and any(e["ok"] and e["point"] for e in ended)
    for e in lines:
        if e["type"] == "vm_assigned":
            assert e["vm"] in VMS and e["mode"] in ("san", "direct-nfs", "hotadd", "nbd") and e["reason"]
    assert {e["vm"] for e in lines if e["type"] == "vm_ended"} == {v["vm"] for v in data["vms"]}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {"COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def test_events_to_a_file_beside_json_and_to_stdout(vcsim: Any, tmp_path: Path) -> None:
    config = write_config(vcsim, tmp_path)
    events = tmp_path / "events.jsonl"
    r = run("backup", "--config", str(config), "--json", "--events", str(events))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    check_stream(lines)
    assert rebuild_report(lines) == json.loads(r.stdout)

    r = run("backup", "--config", str(config), "--events", "-")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]  # stdout: nothing but events
    check_stream(lines)
    assert lines[-1]["summary"]["status"] == "complete" and "complete:" in r.stderr  # the report on stderr

    r = run("backup", "--config", str(config), "--events", "-", "--json")
    assert r.returncode == 2 and "--events -: stdout carries the events" in r.stderr
    r = run("backup", "--config", str(tmp_path / "missing.yaml"), "--events", str(events))
    failed = [json.loads(line) for line in events.read_text().splitlines()]
    assert r.returncode == 2 and failed[-1]["type"] == "job_ended" and failed[-1]["summary"] is None
    assert failed[-1]["exit_code"] == 2 and "missing.yaml" in failed[-1]["error"]
    r = run("backup", "--config", str(config), "--events", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert r.returncode == 2 and "--events: cannot write" in r.stderr
