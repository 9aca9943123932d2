"""`vsphere-proxy discover`: what vCenter holds, as the scheduler will see it."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict
from typing import Any

from rich.table import Table

from vsphere_proxy.cli.common import (
    EXIT_OK,
    add_config_argument,
    console,
    emit_json,
    line,
    read_config,
    styled,
    vcenter,
)
from vsphere_proxy.model import Inventory

HELP = "read the inventory from vCenter: clusters, hosts (HBAs, LUNs, paths), datastores, VMs"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("discover", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the whole inventory as JSON")
    p.set_defaults(func=do_discover)


def summary(inv: Inventory) -> dict[str, Any]:
    return {
        "datacenter": inv.datacenter,
        "clusters": len(inv.clusters),
        "hosts": len(inv.hosts),
        "datastores": dict(sorted(Counter(d.kind.value for d in inv.datastores).items())),
        "vms": len(inv.vms),
        "disks": sum(len(v.disks) for v in inv.vms),
        "hbas": dict(sorted(Counter(h.type for host in inv.hosts for h in host.hbas).items())),
        "luns": len({lun.name for h in inv.hosts for lun in h.luns if not lun.local}),
        "round_trips": inv.round_trips,
    }


def to_json(inv: Inventory) -> dict[str, Any]:
    def vm(v: Any) -> dict[str, Any]:
        d = asdict(v)
        d["tags"] = [str(t) for t in v.tags]
        d["datastores"] = list(v.datastores)
        d["total_bytes"] = v.total_bytes
        return d

    return {
        "summary": summary(inv),
        "clusters": [asdict(c) for c in inv.clusters],
        "hosts": [asdict(h) for h in inv.hosts],
        "datastores": [asdict(d) | {"kind": d.kind.value} for d in inv.datastores],
        "vms": [vm(v) for v in inv.vms],
    }


def do_discover(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    with vcenter(config) as found:
        inv = found.inventory
    if args.json:
        emit_json(to_json(inv))
        return EXIT_OK
    out = console()
    s = summary(inv)
    out.print(line(styled(inv.datacenter, "bold"), f": {s['clusters']} clusters, {s['hosts']} hosts, "
                   f"{len(inv.datastores)} datastores, {s['vms']} VMs, {s['disks']} disks "
                   f"({s['round_trips']} round trips)"))
    hosts = Table("host", "cluster", "HBAs", "LUNs (active paths/paths)", "datastores", title="Hosts")
    for h in inv.hosts:
        hbas = ", ".join(f"{b.device} {b.type} {b.identity}" for b in h.hbas if b.type != "Block")
        luns = ", ".join(f"{lun.name} ({len(lun.active_paths)}/{len(lun.paths)})" for lun in h.luns if not lun.local)
        hosts.add_row(h.name, h.cluster or "-", hbas or "-", luns or "-", ", ".join(h.datastores))
    out.print(hosts)
    dss = Table("datastore", "kind", "backing", "hosts", title="Datastores")
    for d in inv.datastores:
        backing = d.nfs_export or ", ".join(d.extents) or d.type
        dss.add_row(d.name, d.kind.value, backing, ", ".join(d.hosts))
    out.print(dss)
    vms = Table("VM", "folder", "host", "power", "disks", "GiB", "CBT", "tags", title="VMs")
    for v in inv.vms:
        vms.add_row(v.name, "/" + v.folder, v.host, v.power_state, str(len(v.disks)), f"{v.total_bytes / 2**30:.2f}",
                    "on" if v.cbt else "off", ", ".join(str(t) for t in v.tags))
    out.print(vms)
    return EXIT_OK
