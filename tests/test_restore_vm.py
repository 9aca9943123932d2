"""`vsphere-proxy restore vm` and `restore disk --to-vm` end to end against a live simulator of their own.

The module backs up every VM of the testbed once, then restores them into vCenter: every VM as a new VM in one
restore job (its VMs written through every write mode), checked against the source device by device and bit for
bit in the datastore directories; bad input refused before anything is made; a restore failing mid-write that
leaves nothing behind; a restore job running beside a backup job of another process on the same proxies, with
the ledger they share sampled; a disk restored into an existing VM; the original VM replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyVmomi import vim

from adapters.discovery import discover
from adapters.properties import managed, read
from adapters.session import Session, connect
from testbed.bed import USER, OwnTestbed, own_testbed
from testbed.faults import FailingWrites, restore_with
from vsphere_proxy.cli import main
from vsphere_proxy.cli.common import open_catalog, open_repository, read_config, vcenter
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.restore import RestoreRun
from vsphere_proxy.jobs.restore_plan import RestoreOptions, allocated_bytes, plan_restores
from vsphere_proxy.ledger_sqlite import SqliteLedger
from vsphere_proxy.repository import Repository
from vsphere_proxy.scheduler import max_streams
from vsphere_proxy.transports import BLOCK

pytestmark = pytest.mark.integration

NET_MAP = ("Prod-Net", "DR-Net")  # NICs on the first network come back on the second


@dataclass
class Bed:
    own: OwnTestbed
    session: Session
    backup: dict[str, Any]  # the report of the backup of every VM

    @property
    def config(self) -> Path:
        return self.own.config

    @property
    def repo(self) -> Repository:
        return Repository.open(self.own.work / "repository")

    def vms(self) -> dict[str, Any]:
        return {v.name: v for v in discover(self.session).vms}


def cli(*argv: str) -> tuple[int, Any, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    text = out.getvalue()
    return code, json.loads(text) if text.strip().startswith(("{", "[")) else text, err.getvalue()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with own_testbed(tmp_path_factory.mktemp("restore-vm")) as own, \
            connect(own.sim.url, USER, own.password, insecure=True) as session:
        code, report, err = cli("backup", "--config", str(own.config), "--json")
        assert code == 0, err
        yield Bed(own, session, report)


def _flat(bed: Bed, file: str) -> Path:
    datastore, inner = file[1:file.index("]")], file.split("] ", 1)[1]
    return bed.own.sim.datastores[datastore] / inner.replace(".vmdk", "-flat.vmdk")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _config(bed: Bed, morefs: list[str]) -> dict[str, dict[str, Any]]:
    refs = [managed(bed.session, vim.VirtualMachine, m) for m in morefs]
    return read(bed.session, refs, ["name", "config", "customValue", "runtime.powerState"])


def _devices(config: Any) -> tuple[list[Any], list[Any], dict[int, Any]]:
    devices = config.hardware.device
    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    return disks, nics, {d.key: d for d in devices}


def _attributes(bed: Bed, values: Any) -> dict[str, str]:
    fields = {f.key: f.name for f in bed.session.content.customFieldsManager.field or []}
    return {fields[v.key]: v.value for v in values or [] if v.key in fields}


def test_every_vm_restored_as_a_new_vm_equal_to_its_source(bed: Bed) -> None:
    job = bed.backup["job_id"]
    code, report, err = cli("restore", "vm", "--config", str(bed.config), "--job", job, "--network-map",
                            "=".join(NET_MAP), "--json")
    assert code == 0, err + json.dumps(report)[:2000]
    restores = report["restores"]
    backed = [v["vm"] for v in bed.backup["vms"] if v["status"] == "done"]
    assert sorted(r["vm"] for r in restores.values()) == sorted(backed)
    modes = Counter(v["mode"] for v in report["vms"])
    modes_of = {v["vm"]: v["mode"] for v in report["vms"]}
    points = {p.id: p for p in bed.repo.points()}
    assert {"hotadd", "nbd"} <= set(modes) and modes["san"] + modes["direct-nfs"] > 0, modes

    now = bed.vms()
    with bed.session.tag_client() as tags:
        attached = tags.vm_tags([now[r["name"]].moref for r in restores.values()] +
                                [now[r["vm"]].moref for r in restores.values()])
    configs = _config(bed, [now[n].moref for r in restores.values() for n in (r["name"], r["vm"])])
    nets = {n.name: n for n in discover(bed.session).networks} if hasattr(discover(bed.session), "networks") else {}
    for r in restores.values():
        new, old = configs[now[r["name"]].moref], configs[now[r["vm"]].moref]
        nc, oc = new["config"], old["config"]
        assert (nc.hardware.numCPU, nc.hardware.memoryMB, nc.guestId, nc.version, nc.firmware) == \
            (oc.hardware.numCPU, oc.hardware.memoryMB, oc.guestId, oc.version, oc.firmware), r
        assert nc.uuid != oc.uuid and nc.instanceUuid != oc.instanceUuid, "a new identity unless kept"
        new_disks, new_nics, new_by_key = _devices(nc)
        old_disks, old_nics, old_by_key = _devices(oc)
        assert len(new_disks) == len(old_disks), r
        point = points[r["point"]]
        by_label = {d.label: d.index for d in point.disks}
        for nd, od in zip(sorted(new_disks, key=lambda d: (d.controllerKey, d.unitNumber)),
                          sorted(old_disks, key=lambda d: (d.controllerKey, d.unitNumber)), strict=True):
            assert nd.capacityInBytes == od.capacityInBytes
            assert type(new_by_key[nd.controllerKey]) is type(old_by_key[od.controllerKey])
            assert new_by_key[nd.controllerKey].busNumber == old_by_key[od.controllerKey].busNumber
            assert nd.unitNumber == od.unitNumber
            assert bool(nd.backing.thinProvisioned) == bool(od.backing.thinProvisioned)
            new_flat, old_flat = _flat(bed, nd.backing.fileName), _flat(bed, od.backing.fileName)
            assert _sha(new_flat) == _sha(old_flat), f"{r['name']} {nd.backing.fileName} equals its source"
            if nd.backing.thinProvisioned and od.deviceInfo.label in by_label:  # holes stay holes
                written = allocated_bytes(point, by_label[od.deviceInfo.label])
                assert new_flat.stat().st_blocks * 512 <= written + 4096, (r["name"], modes_of[r["name"]])
        assert [type(n) for n in new_nics] == [type(n) for n in old_nics]
        for nn, on in zip(new_nics, old_nics, strict=True):
            want = NET_MAP[1] if on.backing.deviceName == NET_MAP[0] else on.backing.deviceName
            assert nn.backing.deviceName == want
            if want in nets:
                assert nn.backing.network._moId == nets[want].moref
            assert nn.macAddress != on.macAddress, "a new MAC address unless kept"
        assert attached[now[r["name"]].moref] == attached[now[r["vm"]].moref], "tags"
        assert _attributes(bed, new["customValue"]) == _attributes(bed, old["customValue"]), "custom attributes"


def test_bad_input_is_refused_in_one_line_and_creates_nothing(bed: Bed) -> None:
    before = sorted(bed.vms())
    config = str(bed.config)
    cases = [
        (["--vm", "web-01", "--name", "web-02"], "--name: a VM named 'web-02' already exists"),
        (["--vm", "web-01", "--datastore", "no-such-ds"], "--datastore: no datastore 'no-such-ds'"),
        (["--vm", "web-01", "--network-map", "Prod-Net=no-such-net"], "--network-map: no network 'no-such-net'"),
        (["--vm", "web-01", "--host", "esx-99"], "--host: no host 'esx-99'"),
        (["--vm", "web-01", "--folder", "Nowhere/Else"], "--folder: no VM folder 'Nowhere/Else'"),
        (["--vm", "web-01", "--datastore-map", "x"], "--datastore-map: 'x' is not OLD=NEW"),
        (["--vm", "nope"], "--vm: no restore point of 'nope'"),
        (["--vm", "web-01", "--overwrite"], "--overwrite: web-01 is poweredOn"),
    ]
    for args, message in cases:
        code, _, err = cli("restore", "vm", "--config", config, *args)
        assert code == 2, (args, err)
        assert message in err and err.count("\n") == 1, (args, err)
    assert sorted(bed.vms()) == before


def test_a_restore_failing_mid_write_leaves_no_vm_and_no_file(bed: Bed) -> None:
    point = bed.repo.latest("db-01")
    assert point is not None and point.disks[0].capacity > BLOCK
    options = RestoreOptions(name="db-01-doomed")
    code, report, backend = restore_with(bed.config, [point], options,
                                         lambda b: FailingWrites(b, lambda vm, offset: offset >= BLOCK))
    assert code == 4, report
    [line] = report["vms"]
    assert line["status"] == "failed" and "injected write failure" in line["error"], line
    assert backend.created, "the VM was really created before its write failed"
    assert "db-01-doomed" not in bed.vms()
    left = [p for d in bed.own.sim.datastores.values() for p in d.glob("db-01-doomed*")]
    assert left == [], left
    assert all("removed" in " ".join(v["notes"]) for v in report["vms"]), report


def test_a_restore_job_beside_a_backup_job_keeps_every_limit(bed: Bed) -> None:
    data = yaml.safe_load(bed.config.read_text())
    for p in data["proxies"]:
        p["stream_mb_s"] = 12  # streams last long enough for the two jobs to overlap
    config_path = bed.own.work / "throttled.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = read_config(str(config_path))
    repo = open_repository(config)
    points = [p for p in (repo.latest(v) for v in ("web-01", "web-02", "web-03", "web-04", "db-01", "db-02",
                                                    "app-01", "app-02", "dev-01", "dev-02")) if p is not None]
    assert len(points) == 10
    ledger = SqliteLedger(config.repository.ledger_path())  # the file both processes take their streams in
    seen: list[tuple[Counter[str], Counter[str], set[str]]] = []
    over: list[str] = []
    done = threading.Event()
    with vcenter(config) as found:
        limits = {p.name: max_streams(p) for p in _proxies(config, found.inventory)}
        cap = config.job.policy.to_policy().datastore_cap

        def sample() -> None:
            while not done.is_set():
                streams = ledger.streams()
                proxies = Counter(s.proxy for s in streams)
                stores = Counter(ds for s in streams for ds in set(s.datastores))
                seen.append((proxies, stores, {s.job for s in streams}))
                over.extend(f"{p}: {n} > {limits[p]}" for p, n in proxies.items() if n > limits[p])
                over.extend(f"{d}: {n} > {cap}" for d, n in stores.items() if n > cap)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        backup = subprocess.Popen([sys.executable, "-m", "vsphere_proxy", "backup", "--config", str(config_path),
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any(s[2] for s in seen) and time.monotonic() < deadline:  # the backup holds streams
            time.sleep(0.05)
        catalog = open_catalog(config)
        try:
            options = RestoreOptions(network_map=dict([NET_MAP]))
            restore = RestoreRun.vms(config, found.backend, repo, catalog, points, options, inventory=found.inventory)
            restored = restore.run()
        finally:
            catalog.close()
        out, err = backup.communicate(timeout=300)
        done.set()
        sampler.join()
    assert over == [], over[:5]
    assert backup.returncode == 0, err
    assert json.loads(out)["status"] == "complete" and restored.status == "complete"
    both = [s for s in seen if len(s[2]) == 2]
    assert both, "the two jobs, in two processes, held streams at the same time"
    assert restored.job_id in {j for s in seen for j in s[2]}


def _proxies(config: Any, inventory: Any) -> list[Any]:
    from vsphere_proxy.proxies import resolve_proxies

    return resolve_proxies(config.job_proxies(), inventory)


def test_a_disk_restored_into_an_existing_vm(bed: Bed) -> None:
    point = bed.repo.latest("app-01")
    assert point is not None
    before = _devices(_config(bed, [bed.vms()["test-01"].moref])[bed.vms()["test-01"].moref]["config"])[0]
    code, report, err = cli("restore", "disk", "--config", str(bed.config), "--vm", "app-01", "--disk", "0",
                            "--to-vm", "test-01", "--json")
    assert code == 0, err + json.dumps(report)[:1500]
    moref = bed.vms()["test-01"].moref
    after = _devices(_config(bed, [moref])[moref]["config"])[0]
    [added] = [d for d in after if d.key not in {b.key for b in before}]
    assert added.capacityInBytes == point.disks[0].capacity
    assert _sha(_flat(bed, added.backing.fileName)) == bed.own.images[("app-01", 0)]
    code, _, err = cli("restore", "disk", "--config", str(bed.config), "--vm", "app-01", "--disk", "7",
                       "--to-vm", "test-01")
    assert code == 2 and "--disk: restore point" in err, err


def test_dry_run_prints_the_config_spec_and_changes_nothing(bed: Bed) -> None:
    before = sorted(bed.vms())
    code, data, err = cli("restore", "vm", "--config", str(bed.config), "--vm", "web-01", "--name", "web-01-dry",
                          "--dry-run", "--json")
    assert code == 0, err
    [vm] = data["vms"]
    assert vm["name"] == "web-01-dry" and vm["config_spec"]["name"] == "web-01-dry"
    assert vm["config_spec"]["deviceChange"], "the disks and NICs it would create"
    assert sorted(bed.vms()) == before


def test_overwrite_replaces_the_powered_off_original(bed: Bed) -> None:
    vms = bed.vms()
    original = vms["test-02"]
    ref = managed(bed.session, vim.VirtualMachine, original.moref)
    if original.power_state != "poweredOff":
        from adapters.tasks import wait_for_task

        wait_for_task(bed.session, ref.PowerOffVM_Task())
    code, report, err = cli("restore", "vm", "--config", str(bed.config), "--vm", "test-02", "--overwrite",
                            "--json")
    assert code == 0, err + json.dumps(report)[:1500]
    now = bed.vms()
    assert "test-02" in now and now["test-02"].moref != original.moref
    assert not [n for n in now if n.startswith("test-02-restoring-")]


def test_kept_identity_power_on_and_the_job_in_the_catalog(bed: Bed, tmp_path: Path) -> None:
    code, report, err = cli("restore", "vm", "--config", str(bed.config), "--vm", "dev-01", "--name", "dev-01-twin",
                            "--keep-identity", "--power-on", "--json")
    assert code == 0, err + json.dumps(report)[:1500]
    now = bed.vms()
    configs = _config(bed, [now["dev-01-twin"].moref, now["dev-01"].moref])
    new, old = configs[now["dev-01-twin"].moref], configs[now["dev-01"].moref]
    assert new["runtime.powerState"] == "poweredOn"
    assert (new["config"].uuid, new["config"].instanceUuid) == (old["config"].uuid, old["config"].instanceUuid)
    assert [n.macAddress for n in _devices(new["config"])[1]] == [n.macAddress for n in _devices(old["config"])[1]]

    job = report["job_id"]
    code, jobs, _ = cli("jobs", "--config", str(bed.config), "--json")
    assert {"id": job, "kind": "restore", "status": "complete"}.items() <= next(j for j in jobs
                                                                                  if j["id"] == job).items()
    code, one, _ = cli("jobs", "--config", str(bed.config), "--job", job, "--json")
    assert code == 0 and [a["status"] for a in one["attempts"]] == ["done"]
    assert one["attempts"][0]["point"] == report["restores"]["dev-01-twin"]["point"]
    code, drawn, err = cli("report", "--config", str(bed.config), "--job", job, "--html", str(tmp_path / "r.html"),
                           "--json")
    assert code == 0 and drawn["streams"] >= 1, err


def test_too_little_space_on_the_target_datastore_is_refused_before_anything(bed: Bed) -> None:
    point = bed.repo.latest("db-01")
    assert point is not None
    with vcenter(read_config(str(bed.config))) as found:
        inventory = found.inventory
    target = point.vm_config.disks[0].datastore if point.vm_config else ""
    tight = dataclasses.replace(inventory, datastores=tuple(
        dataclasses.replace(d, free_bytes=BLOCK) if d.name == target else d for d in inventory.datastores))
    with pytest.raises(BadJob, match=rf"--datastore: {target} has 4\.0 MiB free; restoring db-01 needs"):
        plan_restores([point], RestoreOptions(), tight)
