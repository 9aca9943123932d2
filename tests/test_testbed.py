"""The testbed itself: launcher lifecycle, disk files, seeded images, generated topologies, written config."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from testbed import topology as topo
from testbed.config import proxy_entry
from testbed.images import BLOCK, NVRAM_SIZE, image_layout, nvram_bytes, sha256_file, write_image, write_images
from testbed.launcher import Vcsim, build_launcher

if TYPE_CHECKING:
    from tests.conftest import VcsimTestbed

pytestmark = pytest.mark.integration


def _connect(url: str, user: str, password: str) -> vim.ServiceInstance:
    parts = urlsplit(url)
    return SmartConnect(
        host=parts.hostname,
        port=parts.port,
        user=user,
        pwd=password,
        protocol=parts.scheme,
        disableSslCertValidation=True,
    )


def test_ready_line(vcsim: VcsimTestbed) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/sdk", vcsim.url)
    assert vcsim.sim.process.poll() is None
    assert set(vcsim.datastores) == {d["Name"] for d in vcsim.topology["Datastore"]}
    for name, directory in vcsim.datastores.items():
        assert directory.is_dir() and directory.name == name
        assert directory.parent.name.startswith(f"govcsim-{vcsim.topology['Datacenter']}-{name}-")


def test_login_uses_env_credentials(vcsim: VcsimTestbed) -> None:
    si = _connect(vcsim.url, vcsim.username, vcsim.password)
    try:
        vms = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
        assert {vm.name for vm in vms.view} == {m["Name"] for m in vcsim.topology["Machine"]}
    finally:
        Disconnect(si)
    with pytest.raises(vim.fault.InvalidLogin):
        _connect(vcsim.url, vcsim.username, vcsim.password + "x")


def test_credentials_not_in_argv(vcsim: VcsimTestbed) -> None:
    cmdline = Path(f"/proc/{vcsim.pid}/cmdline").read_bytes()
    assert b"-topology" in cmdline
    assert vcsim.password.encode() not in cmdline
    assert vcsim.username.encode() not in cmdline


def test_disk_files_are_the_simulators(vcsim: VcsimTestbed) -> None:
    """Every flat file sits where the simulator put the disk (its descriptor beside it)."""
    disks = vcsim.disks()
    assert len(disks) == sum(len(m["Disk"]) for m in vcsim.topology["Machine"]) == len(vcsim.images)
    for disk in disks:
        descriptor = disk.path.with_name(disk.path.name.replace("-flat.vmdk", ".vmdk"))
        assert descriptor.exists(), descriptor
        assert disk.path.parent.parent == vcsim.datastores[disk.datastore]


def test_images_have_size_and_hash(vcsim: VcsimTestbed) -> None:
    for disk in vcsim.disks():
        assert disk.path.stat().st_size == disk.capacity
        assert disk.capacity == int(_declared_mb(vcsim, disk) * 1024 * 1024)
        assert sha256_file(disk.path) == vcsim.images[(disk.vm, disk.index)], disk


def _declared_mb(vcsim: VcsimTestbed, disk: topo.DiskImage) -> float:
    machine = next(m for m in vcsim.topology["Machine"] if m["Name"] == disk.vm)
    return float(machine["Disk"][disk.index]["CapacityMB"])


def test_images_are_deterministic(vcsim: VcsimTestbed, tmp_path: Path) -> None:
    disk = max(vcsim.disks(), key=lambda d: d.capacity)
    copy = topo.DiskImage(disk.vm, disk.index, disk.datastore, tmp_path / "copy-flat.vmdk", disk.capacity)
    first = write_image(copy, "vsphere-proxy")
    assert first == vcsim.images[(disk.vm, disk.index)]
    assert write_image(copy, "vsphere-proxy") == first  # overwriting gives the same bytes
    assert sha256_file(copy.path) == first
    assert write_image(copy, "another seed") != first
    other = topo.DiskImage(disk.vm, disk.index + 1, disk.datastore, tmp_path / "other-flat.vmdk", disk.capacity)
    assert write_image(other, "vsphere-proxy") != first


def test_images_mix_zero_repeated_and_random_blocks(vcsim: VcsimTestbed) -> None:
    blocks: Counter[str] = Counter()
    zero = hashlib.sha256(bytes(BLOCK)).hexdigest()
    incompressible = 0
    for disk in vcsim.disks():
        with open(disk.path, "rb") as f:
            while block := f.read(BLOCK):
                if len(block) == BLOCK:
                    blocks[hashlib.sha256(block).hexdigest()] += 1
                    if len(zlib.compress(block, 1)) > 0.99 * BLOCK:
                        incompressible += 1
    assert blocks[zero] >= 3, "some whole 4 MiB blocks are holes"
    repeated = [h for h, n in blocks.items() if n > 1 and h != zero]
    assert len(repeated) >= 2, "some non-zero 4 MiB blocks repeat (across disks)"
    assert incompressible >= 3, "some 4 MiB blocks are entirely random"
    regions = [r for d in vcsim.disks() for r in image_layout(d, "vsphere-proxy")]
    assert sum(1 for offset, _, _ in regions if offset % BLOCK) >= 10, "boundaries also fall inside blocks"
    assert sum(1 for offset, _, _ in regions if offset and offset % BLOCK == 0) >= 10, "and on block boundaries"
    assert {kind for _, _, kind in regions} == {"random", "pattern", "zero"}


def test_image_regions_hold_their_kind(vcsim: VcsimTestbed) -> None:
    for disk in vcsim.disks()[:8]:
        data = disk.path.read_bytes()
        for offset, length, kind in image_layout(disk, "vsphere-proxy"):
            region = data[offset : offset + length]
            if kind == "zero":
                assert region.count(0) == length, (disk, offset)
            elif length >= 4096:
                assert region.count(0) < length // 2, (disk, offset, kind)
                if kind == "random":
                    assert len(zlib.compress(region, 1)) > 0.99 * length
                else:  # periodic with one of the pattern units
                    assert any(region[u:] == region[:-u] for u in (1, 512, 4096, 65536) if u < length)


def test_images_are_sparse(vcsim: VcsimTestbed) -> None:
    disks = vcsim.disks()
    allocated = sum(d.path.stat().st_blocks * 512 for d in disks)
    logical = sum(d.capacity for d in disks)
    assert allocated < 0.9 * logical, (allocated, logical)


def test_write_images_is_fast(tmp_path: Path) -> None:
    import time

    disks = [topo.DiskImage(f"vm{i}", 0, "ds", tmp_path / f"vm{i}-flat.vmdk", 10 << 20) for i in range(10)]
    start = time.monotonic()
    hashes = write_images(disks)
    assert time.monotonic() - start < 5
    assert len(set(hashes.values())) == 10


def _machine(vcsim: VcsimTestbed, name: str) -> dict[str, Any]:
    return next(m for m in vcsim.topology["Machine"] if m["Name"] == name)


def test_topology_declares_what_a_restore_verifies(vcsim: VcsimTestbed) -> None:
    machines = [m for m in vcsim.topology["Machine"] if m["Name"] not in {p["Name"] for p in vcsim.topology["Proxy"]}]
    with_nics = [m for m in machines if m.get("Nic")]
    assert len(with_nics) >= len(machines) * 3 // 4
    two = [m for m in with_nics if len({n["Network"] for n in m["Nic"]}) == 2]
    assert len(two) >= 2, "at least two machines with 2 NICs on different networks"
    assert any(n["Network"] == "VM Network" for m in with_nics for n in m["Nic"])
    assert {n.get("Type", "vmxnet3") for m in with_nics for n in m["Nic"]} == {"vmxnet3", "e1000e", "e1000"}
    assert 2 <= sum(1 for m in machines if m.get("Firmware") == "efi") <= 3
    assert len({k for m in machines for k in m.get("Attribute", {})}) >= 2


def test_hosts_carry_the_port_groups(vcsim: VcsimTestbed) -> None:
    declared = {n["Name"]: n["Vlan"] for n in vcsim.topology["Network"]}
    si = _connect(vcsim.url, vcsim.username, vcsim.password)
    try:
        views = si.content.viewManager
        view = views.CreateContainerView(si.content.rootFolder, [vim.Network], True)
        hosts = {h["Name"] for h in vcsim.topology["Host"]}
        networks = {n.name: {h.name for h in n.host} for n in view.view}
        assert networks == {name: hosts for name in [*declared, "VM Network"]}
        host = next(h for h in views.CreateContainerView(si.content.rootFolder, [vim.HostSystem], True).view
                    if h.name == "esx-04")
        groups = {g.spec.name: (g.spec.vlanId, g.spec.vswitchName) for g in host.config.network.portgroup}
        assert {name: groups[name] for name in declared} == {n: (v, "vSwitch0") for n, v in declared.items()}
        assert set(declared) <= {n.name for n in host.network}
    finally:
        Disconnect(si)


def test_machine_nics_attributes_firmware_and_nvram(vcsim: VcsimTestbed) -> None:
    si = _connect(vcsim.url, vcsim.username, vcsim.password)
    try:
        fields = {f.key: f.name for f in si.content.customFieldsManager.field}
        view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
        vms = {vm.name: vm for vm in view.view}
        for name in ("db-01", "app-01", "dev-06"):  # efi with 2 NICs; bios, vmx-17, on "VM Network"; no NIC
            spec, config = _machine(vcsim, name), vms[name].config
            nics = [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
            kinds = {"vmxnet3": vim.vm.device.VirtualVmxnet3, "e1000e": vim.vm.device.VirtualE1000e,
                     "e1000": vim.vm.device.VirtualE1000}
            assert [(type(d), d.backing.deviceName, d.deviceInfo.label) for d in nics] == [
                (kinds[n.get("Type", "vmxnet3")], n["Network"], f"Network adapter {i + 1}")
                for i, n in enumerate(spec.get("Nic", []))]
            assert all(re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", d.macAddress) for d in nics)
            assert sorted(n.name for n in vms[name].network) == sorted({n["Network"] for n in spec.get("Nic", [])})
            assert {fields[v.key]: v.value for v in vms[name].customValue} == spec.get("Attribute", {})
            assert config.firmware == topo.firmware(spec)
            assert config.version == spec.get("Version", "vmx-13")
            assert {o.key: o.value for o in config.extraConfig}["nvram"] == f"{name}.nvram"
            nvram = [f for f in vms[name].layoutEx.file if f.type == "nvram"]
            assert [f.size for f in nvram] == [NVRAM_SIZE[config.firmware]]
        assert vms["db-01"].config.firmware == "efi"
    finally:
        Disconnect(si)
    for machine in vcsim.topology["Machine"]:  # every NVRAM file holds the bytes the testbed recomputes
        data = topo.nvram_path(machine, vcsim.datastores).read_bytes()
        assert data == nvram_bytes(machine["Name"], topo.firmware(machine)), machine["Name"]
    assert nvram_bytes("db-01", "efi") != nvram_bytes("db-02", "efi") != nvram_bytes("db-02", "bios")
    assert len(nvram_bytes("x", "bios")) == 8 << 10 and len(nvram_bytes("x", "efi")) == 128 << 10


def test_datastore_put_keeps_zero_blocks_as_holes(vcsim: VcsimTestbed) -> None:
    """PUT streams the body and stores every all-zero 4 MiB-aligned block and an all-zero tail as a hole, as a
    thin-provisioned datastore does; the file reads back byte for byte, replacing the whole previous file."""
    rng = random.Random("datastore-put")
    mixed = rng.randbytes(BLOCK // 4) + bytes(BLOCK - BLOCK // 4)  # a block with data and zeros: written whole
    body = rng.randbytes(BLOCK) + bytes(2 * BLOCK) + mixed + bytes(BLOCK // 2 + 3)  # zero blocks, zero tail
    si = _connect(vcsim.url, vcsim.username, vcsim.password)
    try:
        cookie = {"Cookie": si._stub.cookie.split(";", 1)[0]}
        url = f"{vcsim.url.removesuffix('/sdk')}/folder/put-test/sparse.bin"
        url += f"?dcPath={vcsim.topology['Datacenter']}&dsName=nfs-01"

        def pieces(data: bytes, size: int = (1 << 20) + 7) -> Iterator[bytes]:  # chunked, not block-aligned
            yield from (data[i : i + size] for i in range(0, len(data), size))

        assert requests.put(url, data=rng.randbytes(6 * BLOCK), headers=cookie, timeout=30).status_code == 200
        assert requests.put(url, data=body, timeout=30).status_code == 401  # no session, no write
        r = requests.put(url, data=pieces(body), headers=cookie, timeout=30)
        assert r.status_code == 200 and r.content == b""
        path = vcsim.datastores["nfs-01"] / "put-test" / "sparse.bin"
        st = path.stat()
        assert st.st_size == len(body) and path.read_bytes() == body
        assert st.st_blocks * 512 <= 2 * BLOCK + 64 * 1024 < st.st_size, st  # the random and the mixed block
        got = requests.get(url, headers=cookie, timeout=30)
        assert got.status_code == 200 and got.content == body
        assert requests.post(url, data=b"x", headers=cookie, timeout=30).status_code == 409
        empty = url.replace("sparse.bin", "zeros.bin")
        assert requests.put(empty, data=bytes(BLOCK + 1), headers=cookie, timeout=30).status_code == 200
        zeros = path.with_name("zeros.bin").stat()
        assert zeros.st_size == BLOCK + 1 and zeros.st_blocks == 0
    finally:
        Disconnect(si)
        shutil.rmtree(vcsim.datastores["nfs-01"] / "put-test", ignore_errors=True)


def test_config_and_credentials(vcsim: VcsimTestbed) -> None:
    text = vcsim.config_path.read_text()
    assert vcsim.password not in text
    config = yaml.safe_load(text)
    assert config["vcenter"] == {
        "url": vcsim.url,
        "insecure": True,
        "credentials": {"file": str(vcsim.credentials_path)},
    }
    assert [p["name"] for p in config["proxies"]] == [p["Name"] for p in vcsim.topology["Proxy"]]
    phys = next(p for p in config["proxies"] if p["name"] == "phys-01")
    assert phys["kind"] == "physical" and phys["cpus"] == 8 and phys["ram_mb"] == 16384 and phys["vsda_active"]
    assert phys["luns"] and phys["nfs_exports"] == ["nas-01.lab:/export/vms1"]
    assert config["job"] == {"name": "testbed", "select": {"folders": ["/"]}}
    assert stat.S_IMODE(vcsim.credentials_path.stat().st_mode) == 0o600
    assert yaml.safe_load(vcsim.credentials_path.read_text()) == {
        "username": vcsim.username,
        "password": vcsim.password,
    }
    with pytest.raises(ValueError, match="unknown keys"):
        proxy_entry({"Name": "p", "Kind": "physical", "Cores": 4})


def test_config_validates_with_vsphere_proxy(vcsim_env: VcsimTestbed) -> None:
    config_mod = pytest.importorskip("vsphere_proxy.config")
    config = config_mod.load_config(vcsim_env.config_path)
    user, password = config.vcenter.credentials.resolve()
    assert (user, password.get_secret_value()) == (vcsim_env.username, vcsim_env.password)
    assert os.environ["VSPHERE_PASSWORD"] == vcsim_env.password


def test_stop_removes_temp_dirs(tmp_path: Path) -> None:
    with Vcsim.start(topo.DEFAULT_TOPOLOGY, "user", "pass-word") as sim:
        dirs = sim.temp_dirs()
        assert len(dirs) == len(sim.datastores) and all(d.is_dir() for d in dirs)
        write_images(topo.disks(topo.load(), sim.datastores)[:2])
    assert sim.process.returncode == 0
    assert not any(d.exists() for d in dirs)
    assert not any(d.exists() for d in sim.datastores.values())
    sim.stop()  # idempotent


@pytest.mark.parametrize(("nic", "message"), [
    ({"Network": "No-Such-Net"}, r'machine "web-01": nic 0: unknown network "No-Such-Net"'),
    ({"Network": "Prod-Net", "Type": "pcnet32"}, r'machine "web-01": nic 0: unknown type "pcnet32"'),
])
def test_bad_nic_fails_clearly(tmp_path: Path, nic: dict[str, str], message: str) -> None:
    bad = topo.load()
    next(m for m in bad["Machine"] if m["Name"] == "web-01")["Nic"] = [nic]
    path = topo.write(bad, tmp_path / "bad.json")
    with pytest.raises(RuntimeError, match=message):
        Vcsim.start(path, "user", "pass-word", timeout=30)


def test_bad_topology_fails_clearly(tmp_path: Path) -> None:
    bad = topo.load()
    bad["Bogus"] = 1
    path = topo.write(bad, tmp_path / "bad.json")
    with pytest.raises(RuntimeError, match=r'exited with code 1 before ready:\n.*unknown field "Bogus"'):
        Vcsim.start(path, "user", "pass-word", timeout=30)
    env = {**os.environ, "VCSIM_USERNAME": "user", "VCSIM_PASSWORD": "pass-word"}
    proc = subprocess.run(
        [str(build_launcher()), "-topology", str(path)], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert f"topology {path}" in proc.stderr and 'unknown field "Bogus"' in proc.stderr


def test_missing_credentials_fail(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="VCSIM_USERNAME and VCSIM_PASSWORD must be set"):
        Vcsim.start(topo.DEFAULT_TOPOLOGY, "user", "", timeout=30)


def test_generate_is_deterministic_and_valid() -> None:
    big = topo.generate(1000, seed=7)
    assert big == topo.generate(1000, seed=7) != topo.generate(1000, seed=8)
    base = topo.load()
    for key in ("Datacenter", "Folder", "Cluster", "Lun", "Host", "Datastore", "Category", "Proxy"):
        assert big[key] == base[key]
    proxy_vms = {p["Name"] for p in base["Proxy"] if p["Kind"] == "vm"}
    generated = [m for m in big["Machine"] if m["Name"] not in proxy_vms]
    assert len(generated) == 1000 and len({m["Name"] for m in big["Machine"]}) == 1000 + len(proxy_vms)
    mounts = {d["Name"]: set(d["Host"]) for d in base["Datastore"]}
    tags = {f"{c['Name']}:{t}" for c in base["Category"] for t in c["Tag"]}
    for m in generated:
        assert 1 <= len(m["Disk"]) <= 3
        assert all(1 <= d["CapacityMB"] <= 4 and m["Host"] in mounts[d["Datastore"]] for d in m["Disk"])
        assert set(m.get("Tag", [])) <= tags
    assert sum(1 for m in generated if m.get("Tag")) > 500
    assert len({d["Datastore"] for m in generated for d in m["Disk"]}) == len(base["Datastore"])


def test_generated_topology_launches(tmp_path: Path) -> None:
    path = topo.write(topo.generate(40, seed=1), tmp_path / "gen.json")
    generated = topo.load(path)
    assert json.loads(path.read_text()) == generated
    with Vcsim.start(path, "user", "pass-word", disk_scale=0.5) as sim:
        disks = topo.disks(generated, sim.datastores, disk_scale=0.5)
        assert all(d.path.exists() and d.capacity == int(d.capacity / 1024) * 1024 for d in disks)
        hashes = write_images(disks)
        assert all(d.path.stat().st_size == d.capacity for d in disks)
        assert len(hashes) == len(disks)
