"""Names are data, never markup: VMs renamed in vCenter to names with brackets, rich markup, emoji codes, quotes,
backslashes, non-ASCII letters and 255 characters go through every text command, which exits 0 and prints each
name exactly as vCenter holds it.

The module renames VMs on a simulator of its own; one backup job of every VM feeds the commands that read the
repository and the catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.discovery import discover
from adapters.properties import vm as vm_ref
from adapters.session import connect
from adapters.tasks import wait_for_task
from testbed.bed import USER, own_testbed

pytestmark = pytest.mark.integration

LONG = "long-" + "x" * 244 + "-[end]"
RENAMED = {  # the VM in the topology -> its name in vCenter for this module
    "web-01": "web-05 [/]",
    "web-02": "web [prod] 06",
    "web-03": "bäckup-ü-雪",
    "web-04": "o'neil \"db\"",
    "app-01": LONG,
    "app-02": "[bold]x[/bold]",
    "app-03": "c:\\vms\\db [1]",
    "app-04": ":thumbs_up: 100% [red]",
}
NAMES = tuple(RENAMED.values())


@dataclass
class Bed:
    config: Path
    work: Path
    images: dict[tuple[str, int], str]  # (VM as the topology names it, disk) -> sha256 of the seeded image


@dataclass
class Job:
    id: str
    stdout: str


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a hook runs it: no terminal, credentials from the config's file; wide lines, unwrapped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {"COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def ok(*args: str) -> str:
    r = run(*args)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def missing(text: str, names: tuple[str, ...] = NAMES) -> list[str]:
    return [n for n in names if n not in text]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with own_testbed(tmp_path_factory.mktemp("hostile")) as own:
        with connect(own.sim.url, USER, own.password, insecure=True) as session:
            moref = {v.name: v.moref for v in discover(session).vms}
            for old, new in RENAMED.items():
                wait_for_task(session, vm_ref(session, moref[old]).Rename_Task(newName=new))
            names = {v.moref: v.name for v in discover(session).vms}
            assert [names[moref[old]] for old in RENAMED] == list(NAMES), "vCenter holds the names as given"
            assert len(names[moref["app-01"]]) == 255
        yield Bed(own.config, own.work, own.images)


@pytest.fixture(scope="module")
def job(bed: Bed) -> Job:
    """One backup of every VM, its text report kept."""
    stdout = ok("backup", "--config", str(bed.config))
    jobs = json.loads(ok("jobs", "--config", str(bed.config), "--json"))
    return Job(jobs[0]["id"], stdout)


def test_discover(bed: Bed) -> None:
    out = ok("discover", "--config", str(bed.config))
    assert not missing(out)
    assert "web  06" not in out and "web [prod] 06" in out


def test_plan_and_plan_explain(bed: Bed) -> None:
    out = ok("plan", "--config", str(bed.config))
    assert not missing(out)
    explained = ok("plan", "--explain", "--config", str(bed.config))
    assert not missing(explained)
    assert f"  {LONG} -> " in explained, "every pair's reason names the VM"


def test_the_backup_text_report(job: Job) -> None:
    assert f"Backup {job.id}" in job.stdout and "complete" in job.stdout
    assert not missing(job.stdout)


def test_jobs_and_one_job(bed: Bed, job: Job) -> None:
    listed = ok("jobs", "--config", str(bed.config))
    assert job.id in listed
    one = ok("jobs", "--job", job.id, "--config", str(bed.config))
    assert not missing(one)


def test_cbt_status(bed: Bed) -> None:
    for name in NAMES:
        out = ok("cbt", "status", "--vm", name, "--config", str(bed.config))
        assert out.startswith(f"{name}: CBT "), out


def test_restore_and_verify(bed: Bed, job: Job, tmp_path: Path) -> None:
    for old, name in RENAMED.items():
        image = tmp_path / "disk.img"
        out = ok("restore", "disk", "--vm", name, "--disk", "0", "--to", str(image), "--force",
                 "--config", str(bed.config))
        assert out.startswith(f"restored {name} disk 0 from "), out
        sha = json.loads(ok("restore", "disk", "--vm", name, "--disk", "0", "--to", str(image), "--force", "--json",
                            "--config", str(bed.config)))["sha256"]
        assert sha == bed.images[(old, 0)], f"{name} restores bit for bit"
    assert "ok" in ok("verify", "--config", str(bed.config))


def test_report_html(bed: Bed, job: Job, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    out = ok("report", "--job", job.id, "--html", str(page), "--config", str(bed.config))
    assert out.startswith(f"{page}: ")
    html = page.read_text()
    assert not [n for n in NAMES if json.dumps(n)[1:-1] not in html], "every VM is drawn under its name"


def test_simulate(tmp_path: Path) -> None:
    """A scenario's names and description are data too."""
    unprotected, failing = "web-05 [/]", "[bold]x[/bold] :thumbs_up:"
    scenario = tmp_path / "hostile.yaml"
    scenario.write_text(json.dumps({
        "name": "hostile",
        "description": "names [red]are[/red] data: o'neil \"db\" c:\\vms",
        "rates_mib_s": {"nbd": 80},
        "proxies": [{"name": "vp-01", "kind": "vm", "cpus": 1, "ram_mb": 800}],
        "datastores": [{"name": "ds-01", "mib_s": 1000}],
        "vms": [{"name": unprotected, "disks_gib": [1], "datastores": ["ds-01"], "tiers": {"*": "none"}},
                {"name": failing, "disks_gib": [1], "datastores": ["ds-01"], "tiers": {"*": "nbd"}},
                {"name": "bäckup-ü-雪", "disks_gib": [1], "datastores": ["ds-01"], "tiers": {"*": "nbd"}}],
        "failures": [{"vm": failing, "fails": 99}],
    }))
    r = run("simulate", "--scenario", str(scenario))
    assert r.returncode == 0, r.stderr
    assert "names [red]are[/red] data: o'neil \"db\" c:\\vms" in r.stdout
    assert f"  {unprotected}: " in r.stdout and f"  {failing}: " in r.stdout


def test_emoji_codes_and_markup_in_names_are_not_rendered(bed: Bed) -> None:
    out = ok("discover", "--config", str(bed.config))
    assert "\N{THUMBS UP SIGN}" not in out and ":thumbs_up: 100% [red]" in out
    assert "[bold]x[/bold]" in out
