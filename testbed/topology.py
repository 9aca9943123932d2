"""Topology files for the vcsim launcher: load, list the disk files a topology implies, generate large ones."""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent / "topology" / "default.json"


@dataclass(frozen=True)
class DiskImage:
    """One flat disk file of a VM, as the simulator lays it out in a datastore directory."""

    vm: str
    index: int
    datastore: str
    path: Path
    capacity: int  # bytes


def load(path: Path | str = DEFAULT_TOPOLOGY) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        topology = json.load(f)
    if not isinstance(topology, dict):
        raise ValueError(f"{path}: a topology is a JSON object")
    return topology


def write(topology: dict[str, Any], path: Path | str) -> Path:
    """Write `topology` as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(topology, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def disk_capacity(capacity_mb: float, disk_scale: float = 1.0) -> int:
    """Bytes of a disk declared with `capacity_mb`, exactly as the launcher computes capacityInKB * 1024."""
    return int(capacity_mb * 1024 * disk_scale) * 1024


def flat_file_name(vm: str, index: int) -> str:
    return f"{vm}-flat.vmdk" if index == 0 else f"{vm}_{index}-flat.vmdk"


def disks(topology: dict[str, Any], datastores: dict[str, Path], disk_scale: float = 1.0) -> list[DiskImage]:
    """Every disk of every machine: disk i of VM V on datastore D is `<datastores[D]>/V/V[_i]-flat.vmdk`."""
    out: list[DiskImage] = []
    for machine in topology.get("Machine") or []:
        vm = machine["Name"]
        for index, disk in enumerate(machine.get("Disk") or []):
            ds = disk["Datastore"]
            if ds not in datastores:
                raise KeyError(f"machine {vm!r} disk {index}: datastore {ds!r} has no directory")
            out.append(
                DiskImage(
                    vm=vm,
                    index=index,
                    datastore=ds,
                    path=Path(datastores[ds]) / vm / flat_file_name(vm, index),
                    capacity=disk_capacity(disk["CapacityMB"], disk_scale),
                )
            )
    return out


def firmware(machine: dict[str, Any]) -> str:
    """A machine's firmware as the launcher creates it: its `Firmware`, else bios."""
    return str(machine.get("Firmware") or "bios")


def nvram_path(machine: dict[str, Any], datastores: dict[str, Path]) -> Path:
    """Where the launcher writes a machine's NVRAM file: `<home datastore>/V/V.nvram`, home being the first disk's."""
    vm = machine["Name"]
    return Path(datastores[machine["Disk"][0]["Datastore"]]) / vm / f"{vm}.nvram"


def generate(n_vms: int, *, seed: int = 0, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A large topology for benchmarks: `n_vms` generated VMs on the base topology's infrastructure.

    Datacenter, folders, clusters, LUNs, hosts, datastores, networks, tag categories and proxies are reused from `base`
    (default.json); so are the proxy VMs the proxy list names, which come on top of the `n_vms`. Each generated
    VM lives on a host, with 1-3 disks of 1-4 MB on datastores that host mounts, and a few tags. Same
    arguments, same topology.
    """
    if n_vms < 0:
        raise ValueError("n_vms must be >= 0")
    base = copy.deepcopy(base if base is not None else load(DEFAULT_TOPOLOGY))
    rng = random.Random(f"vsphere-proxy-topology/{seed}")
    proxy_vms = {p["Name"] for p in base.get("Proxy") or [] if p.get("Kind") == "vm"}
    machines = [m for m in base.get("Machine") or [] if m["Name"] in proxy_vms]

    hosts = [h["Name"] for h in base["Host"]]
    mounts = {h: [d["Name"] for d in base["Datastore"] if h in d.get("Host", [])] for h in hosts}
    hosts = [h for h in hosts if mounts[h]]
    if not hosts:
        raise ValueError("base topology: no host mounts a datastore")
    folders = [f for f in base.get("Folder") or [] if f != "Infrastructure"] or [""]
    categories = base.get("Category") or []
    width = max(4, len(str(n_vms)))

    for i in range(n_vms):
        host = hosts[i % len(hosts)]
        machine: dict[str, Any] = {
            "Name": f"vm-{i:0{width}d}",
            "Folder": folders[rng.randrange(len(folders))],
            "Host": host,
            "PowerState": "poweredOn" if rng.random() < 0.9 else "poweredOff",
            "Cbt": rng.random() < 0.7,
            "Cpu": rng.choice([1, 2, 2, 4]),
            "MemoryMB": rng.choice([1024, 2048, 4096, 8192]),
            "Disk": [
                {
                    "Datastore": rng.choice(mounts[host]),
                    "CapacityMB": rng.randint(1, 4),
                    "Controller": "pvscsi" if rng.random() < 0.8 else "lsilogic",
                }
                for _ in range(rng.randint(1, 3))
            ],
        }
        tags = _pick_tags(rng, categories)
        if tags:
            machine["Tag"] = tags
        machines.append(machine)
    base["Machine"] = machines
    return base


def _pick_tags(rng: random.Random, categories: list[dict[str, Any]]) -> list[str]:
    tags: list[str] = []
    for cat in categories:
        names = cat.get("Tag") or []
        if not names or rng.random() < 0.3:
            continue
        k = 1 if cat.get("Cardinality") == "SINGLE" else rng.randint(1, min(2, len(names)))
        tags += [f"{cat['Name']}:{t}" for t in rng.sample(names, k)]
    return tags
