"""`vsphere-proxy backup`, `restore`, `verify` and `cbt` end to end against a live simulator of their own.

The module starts its own launcher (the jobs snapshot every VM, rewrite disks and change CBT state) with the
default topology, plus one template and one VM without disks made through the API. Jobs run in this process
through the CLI's `main`, so a transport can be made to fail mid-disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyVmomi import vim

from adapters.discovery import discover
from adapters.hotadd import left_behind_disks
from adapters.properties import vm as vm_ref
from adapters.session import Session, connect
from adapters.snapshots import list_snapshots
from adapters.tasks import wait_for_task
from testbed import topology as topo
from testbed.bed import USER, own_testbed
from testbed.faults import backup_with, each_vm_once, every_read_of
from testbed.images import sha256_file
from testbed.launcher import Vcsim
from testbed.writes import rewrite
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.cli import main
from vsphere_proxy.repository import Repository
from vsphere_proxy.transports import BLOCK

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # reports and screenshots a person can look at
ARTIFACTS.mkdir(exist_ok=True)

PROXY_VMS = ("proxy-prod", "proxy-dev")


@dataclass
class Bed:
    sim: Vcsim
    session: Session
    config: Path
    work: Path
    topology: dict[str, Any]
    images: dict[tuple[str, int], str]
    moref: dict[str, str]

    @property
    def repo(self) -> Repository:
        return Repository.open(self.work / "repository")

    def catalog(self) -> Catalog:
        return Catalog.open(self.work / "repository.catalog.sqlite")

    def disks(self) -> dict[tuple[str, int], topo.DiskImage]:
        return {(d.vm, d.index): d for d in topo.disks(self.topology, self.sim.datastores)}

    def variant(self, name: str, select: dict[str, Any] | None = None, **policy: Any) -> Path:
        """The config with another selection or policy fields changed."""
        data = yaml.safe_load(self.config.read_text())
        data["job"].setdefault("policy", {}).update(policy)
        if select is not None:
            data["job"]["select"] = select
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path


def cli(*argv: str) -> tuple[int, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    text = out.getvalue()
    return code, json.loads(text) if text.strip().startswith(("{", "[")) else text


def backup(config: Path) -> tuple[int, dict[str, Any]]:
    return cli("backup", "--config", str(config), "--json")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with own_testbed(tmp_path_factory.mktemp("backup")) as own, \
            connect(own.sim.url, USER, own.password, insecure=True) as session:
        moref = {v.name: v.moref for v in discover(session).vms}
        _make_template_and_empty_vm(session, moref)
        moref = {v.name: v.moref for v in discover(session).vms}
        yield Bed(own.sim, session, own.config, own.work, own.topology, own.images, moref)


def _make_template_and_empty_vm(session: Session, moref: dict[str, str]) -> None:
    """dev-03 becomes a template; `empty-01` is a VM without disks beside it."""
    dev03 = vm_ref(session, moref["dev-03"])
    dev03.MarkAsTemplate()
    web01 = vm_ref(session, moref["web-01"])
    spec = vim.vm.ConfigSpec(name="empty-01", guestId="otherGuest64", numCPUs=1, memoryMB=512,
                             files=vim.vm.FileInfo(vmPathName="[nfs-01]"))
    task = web01.parent.CreateVM_Task(config=spec, pool=web01.resourcePool)
    wait_for_task(session, task)


def _ours_left(bed: Bed) -> tuple[list[str], list[str]]:
    snaps = [f"{vm}: {e.name}" for vm, m in bed.moref.items() for e in list_snapshots(bed.session, m) if e.ours]
    attached = [d.file for ds in left_behind_disks(bed.session, [bed.moref[p] for p in PROXY_VMS]).values()
                for d in ds]
    return snaps, attached


def _restored_hash(bed: Bed, vm: str, disk: int, point: str | None = None) -> str:
    out = bed.work / f"restore-{vm}-{disk}.img"
    argv = ["restore", "disk", "--config", str(bed.config), "--vm", vm, "--disk", str(disk), "--to", str(out),
            "--force", "--json"]
    code, data = cli(*argv, *(["--point", point] if point else []))
    assert code == 0, data
    assert data["sha256"] == sha256_file(out)
    out.unlink()
    return str(data["sha256"])


def allocated_block_bytes(path: Path, capacity: int) -> int:
    """The bytes of the 4 MiB blocks of a flat file that hold allocated data (SEEK_DATA / SEEK_HOLE)."""
    blocks: set[int] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < capacity:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), capacity)
            blocks.update(range(data // BLOCK, (hole - 1) // BLOCK + 1))
            offset = hole
    finally:
        os.close(fd)
    return sum(min(BLOCK, capacity - b * BLOCK) for b in blocks)


def test_a_full_job_backs_up_every_vm_over_all_three_transports(bed: Bed) -> None:
    code, report = backup(bed.config)
    assert code == 0 and report["status"] == "complete", report
    lines = {v["vm"]: v for v in report["vms"]}
    skipped = {v["vm"]: v["error"] for v in report["vms"] if v["status"] == "skipped"}
    assert skipped == {"dev-03": "a template", "empty-01": "no virtual disks",
                       "proxy-prod": "a proxy of this job", "proxy-dev": "a proxy of this job"}
    backed_up = {m["Name"] for m in bed.topology["Machine"]} - set(skipped)
    assert {vm for vm, v in lines.items() if v["status"] == "done"} == backed_up
    # san and direct NFS are the one file transport; with hot-add and NBD every access mode ran
    assert set(report["modes"]) == {"san", "direct-nfs", "hotadd", "nbd"}, report["modes"]
    cbt = {m["Name"] for m in bed.topology["Machine"] if m.get("Cbt")}
    images: dict[str, list[Any]] = {}
    for d in topo.disks(bed.topology, bed.sim.datastores):
        images.setdefault(d.vm, []).append(d)
    thin = 0
    for vm in backed_up:
        line = lines[vm]
        assert line["point"] and line["error"] == ""
        assert line["seconds"] > 0
        capacity = sum(d.capacity for d in images[vm])
        allocated = sum(allocated_block_bytes(d.path, d.capacity) for d in images[vm])
        if vm in cbt and allocated < capacity:  # a first full reads only what the disk allocated ("*")
            assert "allocated areas only" in line["read"] and line["bytes_read"] == allocated, vm
            thin += 1
        else:
            assert line["read"] == "full" and line["bytes_read"] == capacity, vm
    assert thin >= 3  # thin disks with unallocated areas, read for their allocated bytes only
    assert report["bytes_written"] > 0
    for (vm, index), digest in bed.images.items():
        if vm in backed_up:
            assert _restored_hash(bed, vm, index) == digest, f"{vm} disk {index}"
    assert _ours_left(bed) == ([], [])
    catalog = bed.catalog()
    try:
        job = catalog.job(report["job_id"])
        assert job is not None and job.status == "complete" and job.rounds == 1
        results = catalog.results(report["job_id"])
        assert {r.vm for r in results if r.status == "done"} == backed_up
        assert {r.mode for r in results} == {"san", "direct-nfs", "hotadd", "nbd"}
        assert {p.vm for p in catalog.points()} == backed_up
        assert {(r.proxy, r.role) for r in catalog.roles(report["job_id"])} >= {("embedded", "coordinator")}
    finally:
        catalog.close()


def test_the_second_run_of_an_unchanged_job_writes_no_chunk_bytes(bed: Bed) -> None:
    code, report = backup(bed.config)
    assert code == 0 and report["bytes_written"] == 0, report
    done = [v for v in report["vms"] if v["status"] == "done"]
    reads = {v["vm"]: v["read"] for v in done}
    cbt_off = {m["Name"] for m in bed.topology["Machine"] if not m["Cbt"]}
    assert {vm for vm, how in reads.items() if how == "full: change tracking is off"} == cbt_off
    assert all(how == "incremental (CBT)" for vm, how in reads.items() if vm not in cbt_off), reads
    # CBT reports nothing changed: nothing is read from VMs that track changes
    assert all(v["bytes_read"] == 0 for v in done if v["vm"] not in cbt_off)


def test_after_the_testbed_rewrites_blocks_only_changed_chunks_are_read_and_written(bed: Bed) -> None:
    disks = bed.disks()
    db01 = disks[("db-01", 1)]  # 24 MiB, CBT on
    app04 = disks[("app-04", 0)]  # 2 MiB, CBT off
    extents = [(BLOCK + 100, 5000), (3 * BLOCK - 10, 20)]  # touches blocks 1, 2 and 3
    new_db01 = rewrite(db01, extents, seed="r1")
    new_app04 = rewrite(app04, [(4096, 4096)], seed="r1")
    code, report = backup(bed.config)
    assert code == 0, report
    lines = {v["vm"]: v for v in report["vms"]}
    assert lines["db-01"]["read"] == "incremental (CBT)"
    assert lines["db-01"]["bytes_read"] == 3 * BLOCK  # blocks 1-3 of disk 1; disks 0 and 2 unchanged
    assert lines["app-04"]["read"] == "full: change tracking is off"
    assert lines["app-04"]["bytes_read"] == app04.capacity
    point = bed.repo.manifest(lines["db-01"]["point"])
    assert point.disks[1].stats.new_chunks == 3 and point.disks[1].stats.kept_blocks == 3
    assert bed.repo.manifest(lines["app-04"]["point"]).disks[0].stats.new_chunks == 1
    assert _restored_hash(bed, "db-01", 1) == new_db01
    assert _restored_hash(bed, "app-04", 0) == new_app04
    assert _restored_hash(bed, "db-01", 0) == bed.images[("db-01", 0)]
    bed.images[("db-01", 1)], bed.images[("app-04", 0)] = new_db01, new_app04


def test_a_cbt_reset_makes_the_next_backup_a_full_read_and_says_why(bed: Bed) -> None:
    code, data = cli("cbt", "reset", "--vm", "web-03", "--config", str(bed.config), "--json")
    assert code == 0 and data == [{"vm": "web-03", "before": True, "after": True, "action": "reset"}]
    code, report = backup(bed.config)
    web03 = next(v for v in report["vms"] if v["vm"] == "web-03")
    assert code == 0 and web03["read"].startswith("full: ") and "no longer valid" in web03["read"], web03
    assert web03["bytes_read"] == topo.disk_capacity(12) and web03["bytes_written"] == 0
    code, data = cli("cbt", "status", "--vm", "no-such-vm", "--config", str(bed.config))
    assert code == 2


def test_a_transport_failing_mid_disk_strands_the_vm_and_leaves_no_snapshot_or_attached_disk(bed: Bed) -> None:
    code, report, backend = backup_with(bed.variant("full-reads", incremental=False), each_vm_once)
    failed = backend.failed
    assert code == 0 and report["status"] == "complete" and report["rounds"] == 2, report
    assert {"san", "hotadd", "nbd"} <= set(failed.values()), failed
    lines = {v["vm"]: v for v in report["vms"]}
    for vm in failed:
        assert lines[vm]["status"] == "done" and lines[vm]["round"] == 2 and lines[vm]["attempts"] == 2
    assert _ours_left(bed) == ([], [])
    catalog = bed.catalog()
    try:
        stranded = [r for r in catalog.results(report["job_id"]) if r.status == "stranded"]
        assert {r.vm for r in stranded} == set(failed) and all("injected failure" in r.error for r in stranded)
    finally:
        catalog.close()
    for (vm, index), digest in bed.images.items():
        if vm in failed:
            assert _restored_hash(bed, vm, index) == digest
    # the window picture of that job: a bar per stream, the stranded VMs visible as recovered
    page = ARTIFACTS / "report-testbed-job.html"
    code, drawn = cli("report", "--config", str(bed.config), "--job", report["job_id"], "--html", str(page), "--json")
    assert code == 0, drawn
    catalog = bed.catalog()
    try:
        streams = catalog.streams(report["job_id"])
    finally:
        catalog.close()
    assert drawn["streams"] == len(streams)
    assert sorted(s.vm for s in streams if s.outcome == "failed") == sorted(failed)  # each injected failure
    for m in bed.topology["Machine"]:
        if lines.get(m["Name"], {}).get("status") == "done":  # its last attempt read every disk
            last = lines[m["Name"]]["attempts"]
            read = {s.disk for s in streams if s.vm == m["Name"] and s.attempt == last and s.outcome == "read"}
            assert read == set(range(len(m["Disk"]))), m["Name"]
    assert set(drawn["recovered"]) == set(failed)
    text = page.read_text()
    assert text.count('<rect class="bar ') == len(streams) and text.count('class="lane"') == drawn["lanes"]


def test_a_vm_that_fails_in_every_round_makes_the_job_partial_with_exit_3(bed: Bed) -> None:
    code, report, _ = backup_with(bed.variant("web", select={"names": ["web-*"]}, rounds=2, incremental=False),
                                  every_read_of("web-04"))
    lines = {v["vm"]: v for v in report["vms"]}
    assert code == 3 and report["status"] == "partial", report
    assert lines["web-04"]["status"] == "failed" and "injected failure of web-04" in lines["web-04"]["error"]
    assert lines["web-04"]["attempts"] == 2 and lines["web-04"]["point"] is None
    assert all(lines[vm]["status"] == "done" for vm in ("web-01", "web-02", "web-03"))
    assert _ours_left(bed) == ([], [])


def test_verify_finds_a_flipped_byte_and_a_deleted_chunk_and_names_the_broken_points(bed: Bed) -> None:
    code, data = cli("verify", "--config", str(bed.config), "--json")
    assert code == 0 and data["ok"] and data["chunks"] > 0
    repo = bed.repo
    chunks = sorted(p for p in (repo.path / "chunks").rglob("*") if p.is_file())
    flipped, deleted = chunks[0], chunks[1]
    keep = {p: p.read_bytes() for p in (flipped, deleted)}
    try:
        raw = bytearray(keep[flipped])
        raw[len(raw) // 2] ^= 0x01
        flipped.write_bytes(bytes(raw))
        deleted.unlink()
        code, data = cli("verify", "--config", str(bed.config), "--json")
        assert code == 4 and not data["ok"]
        assert data["corrupt"] == [flipped.name] and data["missing"] == [deleted.name]
        assert data["broken"], "the damaged chunks break restore points"
        for point in data["broken"]:
            assert point in repo.point_ids()
    finally:
        for path, content in keep.items():
            path.write_bytes(content)
    assert cli("verify", "--config", str(bed.config), "--json")[0] == 0


def test_a_vm_with_its_own_snapshot_is_backed_up_and_its_snapshot_kept(bed: Bed) -> None:
    vm = "dev-05"
    ref = vm_ref(bed.session, bed.moref[vm])
    mine = wait_for_task(bed.session, ref.CreateSnapshot_Task(name="before-patching", memory=False, quiesce=False))
    code, report = backup(bed.variant("one", select={"names": [vm]}))
    line = next(v for v in report["vms"] if v["vm"] == vm)
    assert code == 0 and line["status"] == "done", report
    assert [e.name for e in list_snapshots(bed.session, bed.moref[vm])] == ["before-patching"]
    assert mine is not None


def test_bad_input_gets_one_line_and_exit_2(bed: Bed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(bed.config.read_text())
    data["repository"] = {"path": "relative/repo"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["backup", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "repository.path" in err and "relative/repo" in err
    not_repo = tmp_path / "stuff"
    not_repo.mkdir()
    (not_repo / "x").write_text("x")
    data["repository"] = {"path": str(not_repo)}
    bad.write_text(yaml.safe_dump(data))
    assert main(["backup", "--config", str(bad)]) == 2
    assert "not a repository" in capsys.readouterr().err
    assert main(["restore", "disk", "--config", str(bed.config), "--vm", "nope", "--disk", "0", "--to",
                 str(tmp_path / "x.img")]) == 2
    assert "--vm" in capsys.readouterr().err and not (tmp_path / "x.img").exists()
    shutil.rmtree(not_repo)
