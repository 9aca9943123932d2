"""The window pictures in a real browser: Debian's headless Chromium driven by selenium through Debian's
chromedriver. Reports of the skewed simulation and of a real testbed job (with failures injected so that VMs
are stranded, then recovered), and the live dashboard of a running job. Screenshots go to test-artifacts/."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.bed import own_testbed
from testbed.faults import backup_with, each_vm_once
from testbed.redis_server import free_port
from vsphere_proxy.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
COLOURS = {"san": "#1f77b4", "direct-nfs": "#17becf", "hotadd": "#2ca02c", "nbd": "#ff7f0e"}


@dataclass
class Bed:
    """This module's own simulator (its jobs snapshot and hot-add, and one is stopped mid-way)."""

    config: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with own_testbed(tmp_path_factory.mktemp("browser")) as own:
        yield Bed(own.config, {**os.environ})


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if (CHROMIUM is None or DRIVER is None) and not os.environ.get("VSPHERE_PROXY_REQUIRE_SERVICES"):
        pytest.skip("Debian's chromium and chromium-driver are not installed; run testbed/setup.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1650,1400", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER or "/usr/bin/chromedriver"), options=options)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def page_facts(driver: Any) -> dict[str, Any]:
    """What the page drew, read from its DOM."""
    return driver.execute_script("""
        const lanes = [...document.querySelectorAll('g.lane')].map(g => ({proxy: g.dataset.proxy,
            limit: +g.dataset.limit, rows: +g.dataset.rows, bars: g.querySelectorAll('rect.bar').length}));
        const bars = [...document.querySelectorAll('rect.bar')].map(r => ({cls: r.getAttribute('class'),
            fill: r.getAttribute('fill'), i: +r.dataset.i, y: +r.getAttribute('y'), x: +r.getAttribute('x'),
            w: +r.getAttribute('width')}));
        return {lanes, bars, data: JSON.parse(document.getElementById('data').textContent),
                recovered: (document.getElementById('recovered') || {}).textContent || ''};""")


def check_picture(driver: Any, proxies: list[str]) -> dict[str, Any]:
    facts = page_facts(driver)
    assert [lane["proxy"] for lane in facts["lanes"]] == proxies  # one lane per proxy
    assert len(facts["bars"]) == len(facts["data"]["bars"]) > 0  # one bar per stream
    for lane in facts["lanes"]:
        assert lane["rows"] <= max(1, lane["limit"]), lane  # never more at once than the proxy's max streams
    for bar in facts["bars"]:
        stream = facts["data"]["bars"][bar["i"]]
        assert bar["fill"] == COLOURS[stream[3]] and f"mode-{stream[3]}" in bar["cls"]  # colour = access mode
        assert f" r{min(stream[5], 5)} " in f" {bar['cls']} "  # marked by round
    # bars sharing a row of a lane never overlap in time
    by_row: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for bar in facts["bars"]:
        stream = facts["data"]["bars"][bar["i"]]
        by_row.setdefault((stream[2], bar["y"]), []).append((stream[7], stream[8]))
    for spans in by_row.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(spans))
    return facts


def click_first_bar_of(driver: Any, vm: str) -> str:
    driver.execute_script("""const D = JSON.parse(document.getElementById('data').textContent);
        const i = D.bars.findIndex(b => b[0] === arguments[0]);
        document.querySelector('rect.bar[data-i="' + i + '"]').dispatchEvent(new MouseEvent('click'));""", vm)
    return str(driver.find_element("id", "panel").text)


def test_the_skewed_simulation_report(browser: Any, capsys: pytest.CaptureFixture[str]) -> None:
    page = ARTIFACTS / "report-skewed-simulation.html"
    assert main(["simulate", "--scenario", str(ROOT / "testbed/scenarios/skewed.yaml"), "--html", str(page),
                 "--json", "--strategy", "scheduler"]) == 0
    capsys.readouterr()
    browser.get(page.as_uri())
    facts = check_picture(browser, ["phys-01", "vp-01", "vp-02", "vp-03", "vp-04"])
    assert {b[3] for b in facts["data"]["bars"]} == {"san", "nbd"}
    assert "Decisions about erp-01" in click_first_bar_of(browser, "erp-01")
    browser.save_screenshot(str(ARTIFACTS / "report-skewed-simulation.png"))


def test_a_real_job_report_shows_its_stranded_then_recovered_vms(browser: Any, bed: Bed, tmp_path: Path) -> None:
    data = yaml.safe_load(bed.config.read_text())
    data["repository"] = {"path": str(tmp_path / "repository")}
    data["job"]["policy"] = {"incremental": False}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    code, report, backend = backup_with(config, each_vm_once)
    assert code == 0, report
    failed, job_id = backend.failed, report["job_id"]
    page = ARTIFACTS / "report-testbed-job.html"
    assert main(["report", "--config", str(config), "--job", job_id, "--html", str(page)]) == 0
    browser.get(page.as_uri())
    facts = check_picture(browser, ["proxy-prod", "proxy-dev", "phys-01", "phys-02"])
    assert failed and set(facts["recovered"].split(", ")) == set(failed)  # stranded in round 1, then recovered
    assert any("failed" in b["cls"] and " r1 " in f" {b['cls']} " for b in facts["bars"])
    assert any(" r2 " in f" {b['cls']} " for b in facts["bars"])
    vm = sorted(failed)[0]
    text = click_first_bar_of(browser, vm)
    assert f"Decisions about {vm}" in text and "strand" in text and "injected failure" in text
    browser.save_screenshot(str(ARTIFACTS / "report-testbed-job.png"))


def test_the_dashboard_shows_a_running_job_move(browser: Any, bed: Bed, tmp_path: Path) -> None:
    data = yaml.safe_load(bed.config.read_text())
    data["repository"] = {"path": str(tmp_path / "repository")}
    data["job"]["policy"] = {"incremental": False, "max_streams": 2}
    for p in data["proxies"]:
        p["stream_mb_s"] = 4  # the job lasts a while
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump(data))
    env = bed.env
    job = subprocess.Popen([sys.executable, "-m", "vsphere_proxy", "backup", "--config", str(config), "--json"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "vsphere_proxy", "serve", "--config", str(config), "--listen",
                              f"127.0.0.1:{port}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"

        def state() -> dict[str, Any]:
            with urllib.request.urlopen(url + "api/state", timeout=5) as r:
                return dict(json.load(r))

        deadline = time.monotonic() + 60
        while True:  # the server is up and the job has VMs running
            try:
                s = state()
                if any(j["status"] == "running" for j in s["jobs"]) and any(s["lanes"].values()):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no running job appeared on the dashboard"
            time.sleep(0.2)
        def shown() -> str:  # the job's progress, or its status once it ended
            return str(browser.execute_script(
                "const p = document.querySelector('tr.job .progress');"
                "return p ? p.textContent : document.querySelector('tr.job .status').textContent;"))

        browser.get(url)
        time.sleep(0.5)
        first = shown()
        assert first.endswith(" done"), first
        shot1 = ARTIFACTS / "dashboard-1.png"
        browser.save_screenshot(str(shot1))
        assert browser.find_elements("css selector", "div.lane span.bar")  # VMs running in the lanes
        deadline = time.monotonic() + 60
        while shown() == first:
            assert time.monotonic() < deadline, f"progress stayed at {first!r}"
            time.sleep(0.5)
        shot2 = ARTIFACTS / "dashboard-2.png"
        browser.save_screenshot(str(shot2))
        assert shot1.read_bytes() != shot2.read_bytes()  # the page redrew itself as the job moved
        assert shown() != first
    finally:
        for p in (serve, job):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
