"""The job's hooks (`hooks:`) on real backups of the session's simulator: real scripts written here record their
event, environment and output; the order of the calls, the context in `VSPHERE_PROXY_*`, no secret in any hook's
environment, timeouts enforced, each failure policy, output cut to its bound and kept in the report."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from vsphere_proxy.repository import Repository

pytestmark = pytest.mark.integration

VMS = ["web-01", "app-02", "dev-04"]
SECRET = "hunter2-not-for-hooks"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {
        "COLUMNS": "1000", "BACKUP_DB_PASSWORD": SECRET, "SOME_API_TOKEN": SECRET, "HOOK_TEST_PLAIN": "kept"}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def recorder(work: Path) -> str:
    """A hook that appends its event line to `calls` and dumps its environment to `env/<event>-<vm>-<n>`."""
    (work / "env").mkdir(exist_ok=True)
    return script(work / "record.sh", f"""
echo "$VSPHERE_PROXY_EVENT ${{VSPHERE_PROXY_VM:--}} $VSPHERE_PROXY_STATUS" >> {work}/calls
env > "{work}/env/$VSPHERE_PROXY_EVENT-${{VSPHERE_PROXY_VM:-job}}-$$"
echo "hello from $VSPHERE_PROXY_EVENT"
""")


def backup(vcsim: Any, work: Path, hooks: dict[str, Any], *, vms: list[str] = VMS) -> tuple[int, dict[str, Any], str]:
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository")}
    data["job"]["select"] = {"names": vms}
    data["job"]["policy"] = {**data["job"].get("policy", {}), "rounds": 2}
    data["hooks"] = hooks
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    r = run("backup", "--config", str(config), "--json")
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r.returncode, report, r.stderr


def calls(work: Path) -> list[str]:
    path = work / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_hooks_run_in_order_with_the_jobs_context_and_no_secret(vcsim: Any, tmp_path: Path) -> None:
    hook = recorder(tmp_path)
    code, report, err = backup(vcsim, tmp_path, {e: {"command": [hook]} for e in
                                                 ("before_job", "before_vm", "after_vm", "after_job", "on_failure")})
    assert code == 0, err
    seen = calls(tmp_path)
    assert seen[0] == "before_job - starting" and seen[-1] == "after_job - complete"
    assert not [c for c in seen if c.startswith("on_failure")]  # the job completed
    for vm in VMS:
        assert seen.index(f"before_vm {vm} starting") < seen.index(f"after_vm {vm} done")
    assert len(seen) == 2 + 2 * len(VMS)
    points = {v["vm"]: v["point"] for v in report["vms"]}
    for path in (tmp_path / "env").iterdir():
        env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        assert SECRET not in path.read_text()
        assert "BACKUP_DB_PASSWORD" not in env and "SOME_API_TOKEN" not in env and env["HOOK_TEST_PLAIN"] == "kept"
        assert env["VSPHERE_PROXY_JOB_ID"] == report["job_id"] and env["VSPHERE_PROXY_JOB_NAME"]
        event = env["VSPHERE_PROXY_EVENT"]
        if event in ("before_vm", "after_vm"):
            assert env["VSPHERE_PROXY_VM"] in VMS and env["VSPHERE_PROXY_VM_MOREF"].startswith("vm-")
            assert env["VSPHERE_PROXY_PROXY"] and env["VSPHERE_PROXY_MODE"] in ("san", "direct-nfs", "hotadd", "nbd")
        if event == "after_vm":
            assert env["VSPHERE_PROXY_POINT"] == points[env["VSPHERE_PROXY_VM"]]
        if event == "after_job":
            assert env["VSPHERE_PROXY_EXIT_CODE"] == "0"
            assert "VSPHERE_PROXY_REPORT" in env and not Path(env["VSPHERE_PROXY_REPORT"]).exists()  # removed after
    runs = report["hooks"]
    assert len(runs) == len(seen) and all(r["ok"] and r["output"].startswith("hello from ") for r in runs)


def test_after_job_gets_the_report_and_on_failure_runs_for_a_partial_job(vcsim: Any, tmp_path: Path) -> None:
    keep = script(tmp_path / "keep.sh", f'cp "$VSPHERE_PROXY_REPORT" {tmp_path}/report-$VSPHERE_PROXY_EVENT.json\n'
                                        f'echo "$VSPHERE_PROXY_EVENT $VSPHERE_PROXY_STATUS $VSPHERE_PROXY_EXIT_CODE"'
                                        f' >> {tmp_path}/calls\n')
    refuse = script(tmp_path / "refuse.sh", '[ "$VSPHERE_PROXY_VM" = app-02 ] || exit 0\n'
                                            'echo "app-02 is in maintenance" >&2\nexit 3\n')
    code, report, err = backup(vcsim, tmp_path, {
        "before_vm": {"command": [refuse], "on_error": "skip_vm"},
        "after_job": {"command": [keep]}, "on_failure": {"command": [keep]}})
    assert code == 3, err
    line = next(v for v in report["vms"] if v["vm"] == "app-02")
    assert line["status"] == "failed" and line["attempts"] == 1  # not tried again in round 2
    assert "skipped: before_vm hook 1" in line["error"] and line["error"].endswith("exited 3: app-02 is in maintenance")
    assert sorted(v["vm"] for v in report["vms"] if v["status"] == "done") == ["dev-04", "web-01"]
    assert calls(tmp_path) == ["after_job partial 3", "on_failure partial 3"]
    saved = json.loads((tmp_path / "report-after_job.json").read_text())
    assert saved["job_id"] == report["job_id"] and saved["status"] == "partial"
    assert Repository.open(tmp_path / "repository").latest("app-02") is None


def test_a_failing_before_job_hook_stops_the_job_before_any_snapshot(vcsim: Any, tmp_path: Path) -> None:
    fail = script(tmp_path / "fail.sh", "echo 'storage array not ready'\nexit 1\n")
    hook = recorder(tmp_path)
    code, report, err = backup(vcsim, tmp_path, {"before_job": [{"command": [fail]}, {"command": [hook]}],
                                                 "before_vm": {"command": [hook]},
                                                 "on_failure": {"command": [hook]}})
    assert code == 4, err
    reason = f"before_job hook 1 ({fail}) exited 1: storage array not ready"
    assert report["status"] == "failed" and reason in report["problems"]
    assert all(v["status"] == "failed" and v["error"] == reason and v["attempts"] == 0 for v in report["vms"])
    assert calls(tmp_path) == ["on_failure - failed"]  # neither the second before_job hook nor any before_vm ran
    assert Repository.open(tmp_path / "repository").points() == []


def test_a_hook_past_its_timeout_is_stopped_and_its_policy_applied(vcsim: Any, tmp_path: Path) -> None:
    slow = script(tmp_path / "slow.sh", f"echo started\nsleep 60\necho never >> {tmp_path}/calls\n")
    t0 = time.monotonic()
    code, report, err = backup(vcsim, tmp_path, {
        "before_vm": {"command": [slow], "timeout_seconds": 1, "on_error": "ignore"},
        "after_job": {"command": [slow], "timeout_seconds": 1, "on_error": "fail_job"}}, vms=["web-01"])
    elapsed = time.monotonic() - t0
    assert code == 4, err  # the after_job hook failed with fail_job: a job problem
    assert report["counts"] == {"done": 1}
    runs = {r["event"]: r for r in report["hooks"]}
    assert runs["before_vm"]["timed_out"] and runs["before_vm"]["exit_code"] is None
    assert runs["before_vm"]["output"].startswith("started")
    assert any("after_job hook 1" in p and "ran past its timeout of 1 s" in p for p in report["problems"])
    assert elapsed < 40 and calls(tmp_path) == []  # stopped, its process group with it


def test_a_hooks_output_is_cut_to_its_bound(vcsim: Any, tmp_path: Path) -> None:
    loud = script(tmp_path / "loud.sh", "head -c 200000 /dev/zero | tr '\\0' x\necho\n")
    code, report, err = backup(vcsim, tmp_path, {"after_job": {"command": [loud], "output_bytes": 1000}},
                               vms=["web-01"])
    assert code == 0, err
    output = report["hooks"][0]["output"]
    assert output.startswith("x" * 1000) and "(199001 more bytes not kept)" in output and len(output) < 1100


@pytest.mark.parametrize(("hooks", "message"), [
    ({"before_job": {"command": "echo hi"}}, "a string runs through a shell only with `shell: true` written"),
    ({"after_vm": {"command": ["/bin/true"], "on_error": "skip_vm"}}, "skip_vm is for before_vm hooks only"),
    ({"before_vm": {"command": []}}, "command"),
    ({"before_job": {"command": ["/bin/true"], "timeout_seconds": 0}}, "timeout_seconds"),
])
def test_bad_hooks_are_exit_2_in_one_line(vcsim: Any, tmp_path: Path, hooks: dict[str, Any], message: str) -> None:
    code, _, err = backup(vcsim, tmp_path, hooks)
    assert code == 2 and err.count("\n") == 1 and message in err and "hooks" in err


def test_a_shell_hook_runs_when_shell_is_written(vcsim: Any, tmp_path: Path) -> None:
    code, _, err = backup(vcsim, tmp_path, {"after_job": {
        "command": f"echo \"$VSPHERE_PROXY_STATUS\" > {tmp_path}/status", "shell": True}}, vms=["web-01"])
    assert code == 0, err
    assert (tmp_path / "status").read_text() == "complete\n"


# -- notifications at the job's end ----------------------------------------------------------------------------------


class _Inbox(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_partial_job_notifies_its_summary_and_an_unreachable_target_never_fails_a_job(vcsim: Any,
                                                                                       tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Inbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refuse = script(tmp_path / "refuse.sh", '[ "$VSPHERE_PROXY_VM" = app-02 ] || exit 0\necho no >&2\nexit 3\n')
        data = yaml.safe_load(vcsim.config_path.read_text())
        port = server.server_address[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = closed.getsockname()[1]  # nothing listens there once closed
        data["notify"] = {"on": ["partial", "failed"], "urls": [f"json://127.0.0.1:{port}/inbox"],
                          "urls_env": ["NOTIFY_TEST_URL"], "timeout_seconds": 10}
        data["hooks"] = {"before_vm": {"command": [refuse], "on_error": "skip_vm"}}
        data["repository"] = {"path": str(tmp_path / "repository")}
        data["job"]["select"] = {"names": VMS}
        config = tmp_path / "notify.yaml"
        config.write_text(yaml.safe_dump(data))
        env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {
            "NOTIFY_TEST_URL": f"json://127.0.0.1:{dead}/nobody?token=sekrit-token"}
        r = subprocess.run([sys.executable, "-m", "vsphere_proxy", "backup", "--config", str(config), "--json"],
                           capture_output=True, text=True, env=env, timeout=600, check=False)
        assert r.returncode == 3, r.stderr  # partial, as without a notification: a failed target changes nothing
        report = json.loads(r.stdout)
        assert report["notify"]["wanted"] and report["notify"]["targets"] == 2 and report["notify"]["sent"] == 1
        assert len(report["notify"]["problems"]) == 1 and "sekrit" not in r.stdout + r.stderr
        (message,) = _Inbox.received
        assert report["job_id"] in message["title"] and "partial" in message["title"]
        assert "app-02: " in message["message"] and "skipped: before_vm hook 1" in message["message"]
        assert "2 done, 1 failed" in message["message"]
    finally:
        server.shutdown()


def test_a_complete_job_whose_only_target_is_unreachable_still_exits_0(vcsim: Any, tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["notify"] = {"on": ["complete"], "urls": [f"json://127.0.0.1:{dead}/nobody"], "timeout_seconds": 5}
    data["repository"] = {"path": str(tmp_path / "repository")}
    data["job"]["select"] = {"names": ["web-01"]}
    config = tmp_path / "notify.yaml"
    config.write_text(yaml.safe_dump(data))
    r = run("backup", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "notification problems: notify: json://127.0.0.1" in r.stdout and "not delivered" in r.stdout
