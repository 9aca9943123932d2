"""`vsphere-proxy serve`: the dashboard page, /api/state and /metrics over a real SQLite catalog and a real Redis
ledger; the token; GET only; the command's bad input; the server itself in a subprocess."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from testbed.redis_server import RedisServer, free_port
from vsphere_proxy.catalog import Catalog, VmResult, VmState, now
from vsphere_proxy.dashboard import FleetCollector, make_app
from vsphere_proxy.ledger import Stream
from vsphere_proxy.ledger_redis import RedisLedger

with warnings.catch_warnings():  # newer Starlette prefers httpx2 for its test client; httpx still works
    warnings.filterwarnings("ignore", message=r".*install `httpx2`")
    from starlette.testclient import TestClient

TOKEN_ENV = "VSPHERE_PROXY_DASHBOARD_TOKEN"
LIMITS = {"p1": 10, "p3": 4}


def fill(catalog: Catalog) -> None:
    """An ended job (2 attempts) and a running one: 5 VMs, 2 done, 2 running (b<x> on p1, c on p2), 1 pending."""
    catalog.start_job("nightly-1", "nightly", engine="embedded", policy={}, coordinator=None)
    catalog.start_round("nightly-1", 1, vms=2)
    catalog.record("nightly-1", VmResult("a", 1, 1, "p1", "san", "done", 1000, 400))
    catalog.record("nightly-1", VmResult("b<x>", 1, 1, "p2", "nbd", "failed", 50, 0, error="snapshot failed"))
    catalog.finish_job("nightly-1", "partial", {"counts": {"done": 1, "failed": 1}})
    catalog.start_job("nightly-2", "nightly", engine="celery", policy={}, coordinator=None)
    catalog.start_round("nightly-2", 1, vms=5)
    catalog.set_states("nightly-2", [
        VmState("a", "done", 1, 1, "p1", "san"), VmState("b<x>", "running", 1, 1, "p1", "hotadd"),
        VmState("c", "running", 1, 1, "p2", "nbd"), VmState("d", "pending"), VmState("e", "done", 1, 1, "p2", "nbd"),
    ])
    catalog.record("nightly-2", VmResult("a", 1, 1, "p1", "san", "done", 2000, 500))
    catalog.record("nightly-2", VmResult("e", 1, 1, "p2", "nbd", "done", 3000, 600))


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer.start() as s:
        yield s


@pytest.fixture
def catalog_url(tmp_path: Path) -> str:
    path = tmp_path / "repo.catalog.sqlite"
    catalog = Catalog.open(path)
    try:
        fill(catalog)
    finally:
        catalog.close()
    return str(path)


@pytest.fixture
def ledger(server: RedisServer) -> RedisLedger:
    """b<x> reads two disks on p1 (ds1; ds1 and ds2), c one on p2 (ds3)."""
    led = RedisLedger(server.client(), prefix=f"dash{secrets.token_hex(4)}:", ttl=60)
    for stream in (Stream("nightly-2/b<x>/0", "nightly-2", "p1", ("ds1",)),
                   Stream("nightly-2/b<x>/1", "nightly-2", "p1", ("ds1", "ds2")),
                   Stream("nightly-2/c/0", "nightly-2", "p2", ("ds3",))):
        assert led.acquire(stream, proxy_limit=10)
    return led


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Dom(HTMLParser):
    """Just enough of a DOM to select elements by tag, class and attribute and read their text."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr"})

    def __init__(self, text: str) -> None:
        super().__init__()
        self.stack: list[dict[str, Any]] = []
        self.nodes: list[dict[str, Any]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = {"tag": tag, "attrs": {k: v or "" for k, v in attrs}, "text": "", "children": []}
        if self.stack:
            self.stack[-1]["children"].append(node)
        self.nodes.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()["tag"] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node["text"] += data

    def select(self, tag: str, cls: str | None = None, within: dict[str, Any] | None = None,
               **attrs: str) -> list[dict[str, Any]]:
        def walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for n in nodes:
                yield n
                yield from walk(n["children"])

        pool = walk(within["children"]) if within else iter(self.nodes)
        return [n for n in pool if n["tag"] == tag and (cls is None or cls in n["attrs"].get("class", "").split())
                and all(n["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]


def test_metrics_give_streams_limits_bytes_and_counts(catalog_url: str, ledger: RedisLedger) -> None:
    with TestClient(make_app(catalog_url, ledger=ledger, limits=LIMITS)) as client:
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    assert {p: got[("vsphere_proxy_active_streams", (("proxy", p),))] for p in ("p1", "p2", "p3")} == \
        {"p1": 2, "p2": 1, "p3": 0}
    assert got[("vsphere_proxy_proxy_max_streams", (("proxy", "p1"),))] == 10
    assert ("vsphere_proxy_proxy_max_streams", (("proxy", "p2"),)) not in got  # its limit is not known here
    assert {d: got[("vsphere_proxy_datastore_active_streams", (("datastore", d),))] for d in ("ds1", "ds2", "ds3")} \
        == {"ds1": 2, "ds2": 1, "ds3": 1}
    assert got[("vsphere_proxy_bytes_read_total", ())] == 1000 + 50 + 2000 + 3000
    assert got[("vsphere_proxy_bytes_written_total", ())] == 400 + 500 + 600
    assert got[("vsphere_proxy_vm_results", (("status", "done"),))] == 3
    assert got[("vsphere_proxy_vm_results", (("status", "failed"),))] == 1
    assert got[("vsphere_proxy_jobs", (("status", "partial"),))] == 1
    assert got[("vsphere_proxy_jobs", (("status", "running"),))] == 1
    assert got[("vsphere_proxy_ledger_up", ())] == 1
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    assert types["vsphere_proxy_bytes_read"] == "counter" and types["vsphere_proxy_active_streams"] == "gauge"


def test_bytes_stay_right_once_ended_jobs_are_remembered(catalog_url: str) -> None:
    catalog = Catalog.open(catalog_url)
    registry = CollectorRegistry()
    registry.register(FleetCollector(catalog, None, None, clock=lambda: now() + timedelta(days=1)))
    try:
        first = samples(generate_latest(registry).decode())
        catalog.record("nightly-2", VmResult("c", 1, 1, "p2", "nbd", "done", 700, 70))
        second = samples(generate_latest(registry).decode())
    finally:
        catalog.close()
    assert first[("vsphere_proxy_bytes_read_total", ())] == 6050
    assert second[("vsphere_proxy_bytes_read_total", ())] == 6050 + 700
    assert second[("vsphere_proxy_bytes_written_total", ())] == 1500 + 70
    assert second[("vsphere_proxy_vm_results", (("status", "done"),))] == 4


def test_state_gives_progress_and_lanes_and_moves_with_the_job(catalog_url: str, ledger: RedisLedger) -> None:
    with TestClient(make_app(catalog_url, ledger=ledger, limits=LIMITS)) as client:
        state = client.get("/api/state").json()
        assert [j["id"] for j in state["jobs"]] == ["nightly-2", "nightly-1"]
        assert state["progress"] == {"nightly-2": {"done": 2, "total": 5, "running": 2}}
        assert {p: [v["vm"] for v in vms] for p, vms in state["lanes"].items()} == \
            {"p1": ["b<x>"], "p2": ["c"], "p3": []}
        assert state["proxies"] == {"p1": {"active": 2, "max": 10}, "p2": {"active": 1, "max": None},
                                    "p3": {"active": 0, "max": 4}}
        assert state["datastores"] == {"ds1": 2, "ds2": 1, "ds3": 1} and state["streams_from"] == "ledger"

        catalog = Catalog.open(catalog_url)  # the job goes on: b<x> is done, d starts on p2
        try:
            catalog.set_states("nightly-2", [VmState("b<x>", "done", 1, 1, "p1", "hotadd"),
                                             VmState("d", "running", 1, 1, "p2", "nbd")])
        finally:
            catalog.close()
        state = client.get("/api/state").json()
        assert state["progress"]["nightly-2"] == {"done": 3, "total": 5, "running": 2}
        assert {p: [v["vm"] for v in vms] for p, vms in state["lanes"].items()} == \
            {"p1": [], "p2": ["c", "d"], "p3": []}


def test_without_a_ledger_streams_are_the_catalogs_running_vms(catalog_url: str) -> None:
    with TestClient(make_app(catalog_url)) as client:
        state = client.get("/api/state").json()
        got = samples(client.get("/metrics").text)
    assert state["proxies"] == {"p1": {"active": 1, "max": None}, "p2": {"active": 1, "max": None}}
    assert state["datastores"] == {} and state["streams_from"] == "catalog" and state["error"] is None
    assert got[("vsphere_proxy_active_streams", (("proxy", "p1"),))] == 1
    assert not any(name == "vsphere_proxy_ledger_up" for name, _ in got)


def test_an_unreachable_ledger_falls_back_to_the_catalog_and_says_so(catalog_url: str) -> None:
    dead = RedisLedger(redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=None), prefix="gone:")
    with TestClient(make_app(catalog_url, ledger=dead)) as client:
        state = client.get("/api/state").json()
        got = samples(client.get("/metrics").text)
    assert state["streams_from"] == "catalog" and state["error"].startswith("ledger unreachable")
    assert state["proxies"]["p1"]["active"] == 1
    assert got[("vsphere_proxy_ledger_up", ())] == 0


def test_the_page_shows_jobs_progress_lanes_proxies_and_datastores(catalog_url: str, ledger: RedisLedger) -> None:
    with TestClient(make_app(catalog_url, ledger=ledger, limits=LIMITS)) as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    dom = Dom(r.text)
    assert [n["attrs"]["data-job"] for n in dom.select("tr", "job")] == ["nightly-2", "nightly-1"]
    running, ended = (dom.select("tr", "job", data_job=j)[0] for j in ("nightly-2", "nightly-1"))
    assert [p["text"] for p in dom.select("div", "progress", within=running)] == ["2/5 done"]
    assert dom.select("div", "progress", within=ended) == []
    lane = dom.select("div", "lane", data_proxy="p1")[0]
    assert [(b["attrs"]["data-vm"], b["text"]) for b in dom.select("span", "bar", within=lane)] == [("b<x>", "b<x>")]
    assert dom.select("span", "bar", within=dom.select("div", "lane", data_proxy="p3")[0]) == []
    proxy = dom.select("tr", "proxy", data_proxy="p1")[0]
    assert (dom.select("td", "active", within=proxy)[0]["text"], dom.select("td", "max", within=proxy)[0]["text"]) \
        == ("2", "10")
    assert {d["attrs"]["data-datastore"]: dom.select("td", "active", within=d)[0]["text"]
            for d in dom.select("tr", "datastore")} == {"ds1": "2", "ds2": "1", "ds3": "1"}
    assert "b<x>" not in r.text  # names are escaped
    # self-contained: nothing fetched but /api/state, and the one inline script is the one the policy allows
    assert "http://" not in r.text and "https://" not in r.text and " src=" not in r.text
    script = dom.select("script")[0]["text"]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = r.headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "api/state" in script and "2000" in script


def test_a_token_protects_every_route(catalog_url: str) -> None:
    token = "dash-" + secrets.token_urlsafe(16)
    with TestClient(make_app(catalog_url, token=token)) as client:
        for path in ("/", "/api/state", "/metrics", "/missing"):
            denied = [client.get(path), client.get(path, headers={"Authorization": "Bearer wrong"}),
                      client.get(path, params={"token": "wrong"}),
                      client.get(path, headers={"Authorization": f"Basic {token}"})]
            assert [r.status_code for r in denied] == [401] * 4, path
            assert denied[0].headers["www-authenticate"].startswith("Bearer") and token not in denied[0].text
        for path in ("/", "/api/state", "/metrics"):
            assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert client.get(path, params={"token": token}).status_code == 200
        assert client.post("/api/state", headers={"Authorization": f"Bearer {token}"}).status_code == 405


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_only_get_is_served(catalog_url: str, method: str) -> None:
    with TestClient(make_app(catalog_url)) as client:
        for path in ("/", "/api/state", "/metrics"):
            assert client.request(method, path).status_code == 405, path
        assert client.head("/api/state").status_code == 200


# --- the command ---------------------------------------------------------------------------------------------


def config(tmp_path: Path, *, repository: bool = True) -> Path:
    data: dict[str, Any] = {
        "vcenter": {"url": "http://127.0.0.1:1/sdk", "insecure": True},
        "proxies": [{"name": "p1", "kind": "physical", "cpus": 1, "ram_mb": 1024}],
        "job": {"select": {"folders": ["/"]}},
    }
    if repository:
        data["repository"] = {"path": str(tmp_path / "repo")}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def environment(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | extra


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", "serve", *args], capture_output=True, text=True,
                          env=env or environment(), timeout=60, check=False)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_non_loopback_address_without_a_token_is_refused(tmp_path: Path) -> None:
    r = serve("--listen", "0.0.0.0:0", "--config", str(config(tmp_path)))
    assert r.returncode == 2
    assert one_line(r) == ("vsphere-proxy: error: --listen: 0.0.0.0 is not loopback; set "
                           f"{TOKEN_ENV} (a token clients must send) or dashboard.token_file")


def test_a_token_file_open_to_others_is_refused_and_a_private_one_guards_every_address(tmp_path: Path) -> None:
    token_file, token = tmp_path / "dashboard.token", secrets.token_urlsafe(16)
    token_file.write_text(token + "\n")
    token_file.chmod(0o644)
    port = free_port()
    data = yaml.safe_load(config(tmp_path).read_text())
    data["dashboard"] = {"listen": f"0.0.0.0:{port}", "token_file": str(token_file)}
    path = tmp_path / "dash.yaml"
    path.write_text(yaml.safe_dump(data))
    r = serve("--config", str(path))
    assert r.returncode == 2 and "dashboard.token_file" in one_line(r) and "chmod 600" in one_line(r)
    token_file.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "vsphere_proxy", "serve", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(f"{base}/api/state", proc).status_code == 401
        assert httpx.get(f"{base}/api/state", headers={"Authorization": f"Bearer {token}x"}, timeout=5).status_code \
            == 401
        assert httpx.get(f"{base}/api/state", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code \
            == 200
    finally:
        out, err = stop(proc)
    assert token not in out + err


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", "::1:8080", "[nope]:80"])
def test_a_bad_listen_value_is_named(tmp_path: Path, listen: str) -> None:
    r = serve("--listen", listen, "--config", str(config(tmp_path)))
    assert r.returncode == 2 and f"--listen: {listen!r}" in one_line(r)


def test_a_config_without_repository_is_bad_input(tmp_path: Path) -> None:
    r = serve("--config", str(config(tmp_path, repository=False)))
    assert r.returncode == 2 and "repository: not configured" in one_line(r)


def wait_for(url: str, proc: subprocess.Popen[str], headers: dict[str, str] | None = None) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"serve exited {proc.returncode}"
        try:
            return httpx.get(url, headers=headers, timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{url}: no answer in 30 s"
            time.sleep(0.1)


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.communicate()


def test_the_server_answers_on_loopback_and_asks_for_its_token(tmp_path: Path) -> None:
    path = config(tmp_path)
    catalog = Catalog.open(tmp_path / "repo.catalog.sqlite")
    try:
        fill(catalog)
    finally:
        catalog.close()
    port, token = free_port(), secrets.token_urlsafe(16)
    proc = subprocess.Popen([sys.executable, "-m", "vsphere_proxy", "serve", "--listen", f"127.0.0.1:{port}",
                             "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(**{TOKEN_ENV: token}))
    try:
        base = f"http://127.0.0.1:{port}"
        r = wait_for(f"{base}/api/state", proc, {"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["progress"]["nightly-2"]["done"] == 2
        assert r.json()["proxies"]["p1"]["max"] == 10  # min(10 x 1 CPU, 1024 MB // 100)
        assert httpx.get(f"{base}/api/state", timeout=5).status_code == 401
        assert 'vsphere_proxy_proxy_max_streams{proxy="p1"} 10.0' in \
            httpx.get(f"{base}/metrics", params={"token": token}, timeout=5).text
    finally:
        out, err = stop(proc)
    assert token not in out + err
    assert f"http://127.0.0.1:{port}/" in out


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_a_browser_runs_the_page_script_and_rerenders_from_the_api(catalog_url: str, tmp_path: Path) -> None:
    port = free_port()
    runner = ("import sys, uvicorn; from vsphere_proxy.dashboard import make_app; "
              "uvicorn.run(make_app(sys.argv[1], limits={'p1': 10}), host='127.0.0.1', port=int(sys.argv[2]), "
              "log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", runner, catalog_url, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())
    try:
        wait_for(f"http://127.0.0.1:{port}/api/state", proc)
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                              "--virtual-time-budget=5000", "--dump-dom", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=90, check=False).stdout
    finally:
        stop(proc)
    page = Dom(dom)
    assert int(page.select("body")[0]["attrs"]["data-refreshes"]) >= 1, "the script did not re-render"
    assert [p["text"] for p in page.select("div", "progress")] == ["2/5 done"]
    lane = page.select("div", "lane", data_proxy="p1")[0]
    assert [b["attrs"]["data-vm"] for b in page.select("span", "bar", within=lane)] == ["b<x>"]
    assert [r["attrs"]["data-proxy"] for r in page.select("tr", "proxy")] == ["p1", "p2"]
    assert page.select("div", id="error")[0]["text"] == ""
