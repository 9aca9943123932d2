"""Job-end notifications, delivered for real over HTTP to apprise's JSON target on a local server: what the message
says, which statuses notify, unreachable and silent targets, URLs with secrets from the environment and from a file,
and the bound on a long report."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from vsphere_proxy.notify import NotifyConfig, NotifyOutcome, job_message, notify_job

JOB_ID = "nightly-20261203T010000Z-ab12"


class _Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.received.append((self.path, json.loads(self.rfile.read(length))))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 recording the (path, JSON body) of every POST in `server.received`."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections, reads what comes and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.settimeout(0.2)
            held.append(conn)
            with contextlib.suppress(OSError):
                conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _url(srv: ThreadingHTTPServer, path: str = "backup") -> str:
    return f"json://127.0.0.1:{srv.server_address[1]}/{path}"


def _vm(name: str, status: str, **kw: Any) -> dict[str, Any]:
    line = {"vm": name, "status": status, "proxy": "proxy-1", "mode": "hotadd", "round": 1, "attempts": 1,
            "bytes_read": 0, "bytes_written": 0, "dedup_ratio": None, "seconds": 1.0, "read": "", "point": None,
            "error": "", "fell_back": "", "notes": []}
    return {**line, **kw}


def _report(status: str, vms: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """A dict shaped like BackupReport.to_json()."""
    counts: dict[str, int] = {}
    for v in vms:
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    report = {
        "job_id": JOB_ID, "job": "nightly", "status": status, "exit_code": {"complete": 0, "partial": 3}.get(status, 4),
        "rounds": 2, "job_limit": 8, "counts": counts, "modes": {"hotadd": counts.get("done", 0)},
        "bytes_read": sum(v["bytes_read"] for v in vms), "bytes_written": sum(v["bytes_written"] for v in vms),
        "swept": {"snapshots": [], "attached_disks": [], "errors": []}, "dispatch": {}, "left_behind": [],
        "problems": [], "retention": None, "vms": vms,
    }
    return {**report, **kw}


def _partial() -> dict[str, Any]:
    return _report("partial", [
        _vm("db-01", "failed", round=2, attempts=2, error="vCenter did not answer in 60 s"),
        _vm("web [prod] 06", "done", mode="nbd", bytes_read=3 * 1024**3, bytes_written=512 * 1024**2,
            fell_back="hot-add: no proxy on the VM's cluster; read over NBD"),
        _vm("web-01", "done", bytes_read=1024**3, bytes_written=100 * 1024**2),
    ], seconds=754.2)


def test_partial_job_is_posted_with_its_summary(server: ThreadingHTTPServer) -> None:
    outcome = notify_job(NotifyConfig(urls=[_url(server)]), _partial())

    assert outcome == NotifyOutcome(wanted=True, targets=1, sent=1, problems=())
    assert len(server.received) == 1
    path, posted = server.received[0]
    assert path == "/backup"
    assert posted["title"] == f"vsphere-proxy: job {JOB_ID} partial (2 done, 1 failed)"
    assert posted["type"] == "warning"
    body = posted["message"]
    assert "VMs: 2 done, 1 failed, 0 skipped, 0 unprotected" in body.splitlines()
    assert "  db-01: vCenter did not answer in 60 s" in body.splitlines()
    assert "  web [prod] 06: hot-add: no proxy on the VM's cluster; read over NBD" in body.splitlines()
    assert "read 4.0 GiB, stored 612.0 MiB, took 12 min 34 s" in body.splitlines()
    assert outcome.to_json() == {"wanted": True, "targets": 1, "sent": 1, "problems": []}


def test_failed_job_notifies_as_a_failure(server: ThreadingHTTPServer) -> None:
    report = _report("failed", [_vm("db-01", "unprotected", error="no eligible proxy")],
                     problems=["catalog: the job's end could not be recorded: disk full"])
    outcome = notify_job(NotifyConfig(urls=[_url(server)]), report)

    assert outcome.sent == 1
    posted = server.received[0][1]
    assert posted["type"] == "failure"
    assert posted["title"] == f"vsphere-proxy: job {JOB_ID} failed (1 unprotected)"
    lines = posted["message"].splitlines()
    assert "  db-01: unprotected: no eligible proxy" in lines
    assert "job problems (1):" in lines
    assert "  catalog: the job's end could not be recorded: disk full" in lines


def test_a_status_not_in_on_sends_nothing(server: ThreadingHTTPServer) -> None:
    outcome = notify_job(NotifyConfig(urls=[_url(server)]), _report("complete", [_vm("web-01", "done")]))

    assert outcome == NotifyOutcome(wanted=False, targets=0, sent=0, problems=())
    time.sleep(0.1)
    assert server.received == []


def test_complete_when_asked_is_a_success(server: ThreadingHTTPServer) -> None:
    config = NotifyConfig(on=["complete"], urls=[_url(server)])
    assert notify_job(config, _report("complete", [_vm("web-01", "done")])).sent == 1
    assert server.received[0][1]["type"] == "success"


def test_an_unreachable_target_is_a_problem_line(server: ThreadingHTTPServer) -> None:
    port = _closed_port()
    config = NotifyConfig(urls=[f"json://127.0.0.1:{port}/backup", _url(server)], timeout_seconds=10)

    start = time.monotonic()
    outcome = notify_job(config, _partial())

    assert time.monotonic() - start < 5
    assert outcome.targets == 2
    assert outcome.sent == 1
    assert outcome.problems == (f"notify: json://127.0.0.1:{port}/… (target 1): not delivered",)
    assert len(server.received) == 1


def test_only_unreachable_sends_nothing() -> None:
    outcome = notify_job(NotifyConfig(urls=[f"json://127.0.0.1:{_closed_port()}/x"]), _partial())
    assert (outcome.wanted, outcome.targets, outcome.sent, len(outcome.problems)) == (True, 1, 0, 1)


def test_a_target_that_never_answers_is_bounded_by_the_timeout(silent_port: int) -> None:
    config = NotifyConfig(urls=[f"json://127.0.0.1:{silent_port}/backup"], timeout_seconds=2)

    start = time.monotonic()
    outcome = notify_job(config, _partial())
    took = time.monotonic() - start

    assert took < 2.5
    assert outcome.sent == 0
    assert len(outcome.problems) == 1
    assert outcome.problems[0].startswith(f"notify: json://127.0.0.1:{silent_port}/… (target 1): timed out")


def test_url_from_the_environment_is_delivered_and_never_shown(server: ThreadingHTTPServer,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-value"
    port = _closed_port()
    environ = {"BACKUP_HOOK": f"{_url(server, 'hook')}?token={secret}",
               "BROKEN_HOOK": f"json://user:{secret}@127.0.0.1:{port}/hook?token={secret}"}
    config = NotifyConfig(urls_env=["BACKUP_HOOK", "BROKEN_HOOK", "MISSING_HOOK"])

    with caplog.at_level(logging.WARNING):
        outcome = notify_job(config, _partial(), environ=environ)

    assert outcome.targets == 2
    assert outcome.sent == 1
    assert [p for p in server.received if p[0].startswith("/hook")]
    assert outcome.problems == (
        "notify: environment variable MISSING_HOOK is not set",
        "notify: json://… (target 2, environment variable BROKEN_HOOK): not delivered",
    )
    for text in (repr(outcome), json.dumps(outcome.to_json()), caplog.text):
        assert secret not in text
    assert str(port) not in " ".join(outcome.problems)
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_an_empty_environment_variable_is_not_set(server: ThreadingHTTPServer) -> None:
    outcome = notify_job(NotifyConfig(urls_env=["HOOK"]), _partial(), environ={"HOOK": "  "})
    assert outcome == NotifyOutcome(True, 0, 0, ("notify: environment variable HOOK is not set",))


@pytest.mark.parametrize("url", [
    "json://user:hunter2@127.0.0.1:1/x",
    "json://127.0.0.1:1/x?token=hunter2",
    "json://127.0.0.1:1/x?+X-Api-Key=hunter2",
    "json://127.0.0.1:1/x?:client_secret=hunter2",
    "discord://4174216298/hunter2hunter2hunter2hunter2",
])
def test_urls_with_a_secret_are_refused(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        NotifyConfig(urls=["json://hooks.example.com/backup", url])
    text = str(raised.value)
    assert "urls" in text
    assert "urls[1]" in text
    assert "urls_env or urls_file" in text
    assert "hunter2" not in text


@pytest.mark.parametrize(("data", "says"), [
    ({}, "at least one of urls, urls_env or urls_file"),
    ({"urls": ["hooks.example.com/backup"]}, "is not a URL"),
    ({"urls": ["nosuchscheme://hooks.example.com/backup"]}, "cannot be loaded by apprise"),
    ({"urls_env": ["NOT-A-NAME"]}, "environment variable's name"),
    ({"urls_file": "notify.urls"}, "absolute"),
    ({"urls": ["json://h/x"], "on": ["done"]}, "on.0"),
    ({"urls": ["json://h/x"], "timeout_seconds": 0}, "timeout_seconds"),
    ({"urls": ["json://h/x"], "url": ["json://h/x"]}, "url"),
])
def test_bad_configuration_is_refused(data: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        NotifyConfig.model_validate(data)


def test_yaml_on_key_is_read_as_on() -> None:
    data = yaml.safe_load("on: [failed, interrupted]\nurls: ['json://hooks.example.com/backup']\n")
    config = NotifyConfig.model_validate(data)
    assert config.on == ["failed", "interrupted"]
    assert NotifyConfig(urls=["json://hooks.example.com/backup"]).on == ["failed", "partial"]


def _urls_file(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "notify.urls"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_urls_file_open_to_others_is_not_read(server: ThreadingHTTPServer, tmp_path: Path) -> None:
    path = _urls_file(tmp_path, f"{_url(server, 'file')}?token=s3cr3t-value\n", 0o644)
    outcome = notify_job(NotifyConfig(urls_file=path), _partial())

    assert outcome == NotifyOutcome(True, 0, 0, (
        f"notify: urls_file {path}: readable by group or others (mode 644); chmod 600 it",))
    assert server.received == []


def test_urls_file_of_its_owner_only_is_delivered(server: ThreadingHTTPServer, tmp_path: Path) -> None:
    text = f"# the team's webhook\n\n  {_url(server, 'file')}?token=s3cr3t-value  \n# json://ignored/x\n"
    path = _urls_file(tmp_path, text, 0o600)
    port = _closed_port()
    path.write_text(text + f"json://127.0.0.1:{port}/down?token=s3cr3t-value\n")
    outcome = notify_job(NotifyConfig(urls=[_url(server)], urls_file=path), _partial())

    assert outcome.targets == 3
    assert outcome.sent == 2
    assert outcome.problems == ("notify: json://… (target 3, urls_file line 5): not delivered",)
    assert sorted(p for p, _ in server.received) == ["/backup", "/file"]
    assert "s3cr3t" not in json.dumps(outcome.to_json())


def test_urls_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing.urls"
    assert notify_job(NotifyConfig(urls_file=missing), _partial()).problems == (
        f"notify: urls_file {missing}: cannot read (No such file or directory)",)
    assert notify_job(NotifyConfig(urls_file=tmp_path), _partial()).problems == (
        f"notify: urls_file {tmp_path}: not a regular file",)
    empty = _urls_file(tmp_path, "# nothing yet\n", 0o600)
    assert notify_job(NotifyConfig(urls_file=empty), _partial()).problems == (
        f"notify: urls_file {empty}: holds no URL",)
    writable = _urls_file(tmp_path, "json://h/x\n", 0o620)
    assert notify_job(NotifyConfig(urls_file=writable), _partial()).problems == (
        f"notify: urls_file {writable}: writable by group or others (mode 620); chmod 600 it",)


def test_a_url_apprise_cannot_load_names_only_its_scheme(tmp_path: Path) -> None:
    outcome = notify_job(NotifyConfig(urls_env=["HOOK"]), _partial(), environ={"HOOK": "nosuch://tok3n@h/x"})
    assert outcome.targets == 1
    assert outcome.sent == 0
    assert outcome.problems == ("notify: nosuch://… (target 1, environment variable HOOK): apprise cannot load this "
                                "URL (unknown scheme, malformed, or its plugin is unavailable here)",)


def test_a_long_report_is_bounded() -> None:
    vms = [_vm(f"vm-{i:03d}", "failed", error=f"snapshot of vm-{i:03d} failed: the datastore is full " + "x" * 40)
           for i in range(200)]
    title, body = job_message(_report("failed", vms))

    assert title == f"vsphere-proxy: job {JOB_ID} failed (200 failed)"
    assert len(body.encode()) <= 8 * 1024
    lines = body.splitlines()
    assert "failed or unprotected (200):" in lines
    assert "  … and 150 more" in lines
    assert sum(1 for line in lines if line.startswith("  vm-")) == 50


def test_huge_names_and_errors_stay_within_the_bound() -> None:
    vms = [_vm("v" * 300 + str(i), "failed", error="e" * 5000, fell_back="f" * 5000) for i in range(60)]
    title, body = job_message(_report("partial", vms, problems=["p" * 5000] * 60))
    assert len(title) <= 250
    assert len(body.encode()) <= 8 * 1024
    assert body.endswith("… (cut at 8 KiB)")


def test_control_characters_in_names_keep_one_vm_on_one_line() -> None:
    vms = [_vm("evil\nname\t[1]", "failed", error="line one\nline two"), _vm("ok", "done")]
    title, body = job_message(_report("partial", vms, job_id="job\r\nX-Injected: 1"))
    assert "\n" not in title
    assert "\r" not in title
    assert "  evil\\nname\\t[1]: line one\\nline two" in body.splitlines()
    assert "job job\\r\\nX-Injected: 1: partial" in body.splitlines()


def test_duration_is_shown_only_when_present() -> None:
    _, body = job_message(_report("complete", [_vm("web-01", "done", bytes_read=2048, bytes_written=512)]))
    assert "read 2.0 KiB, stored 512 B" in body.splitlines()
    _, body = job_message(_report("complete", [_vm("web-01", "done")], seconds=3725))
    assert "took 1 h 02 min" in body
    _, body = job_message(_report("complete", [_vm("web-01", "done", bytes_read=1024)], kind="restore", seconds=9))
    assert "restored 1.0 KiB, took 9 s" in body.splitlines()
