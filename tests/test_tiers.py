"""Unit tests of the access-tier classifier on hand-built inventories (no vCenter)."""

from __future__ import annotations

import pytest

from vsphere_proxy.model import (
    VM,
    Datastore,
    DatastoreKind,
    Disk,
    Host,
    HostLun,
    Inventory,
    LunAccess,
    LunPath,
    Proxy,
    ProxyKind,
)
from vsphere_proxy.tiers import Tier, allowed_tier, classify_tier, eligible_proxies, tier_table

LUN_A = "naa.60000000000000000000000000000a01"
LUN_B = "naa.60000000000000000000000000000b01"


def disk(ds: str, mb: int = 8, key: int = 2000, backing: str = "flat", lun: str = "") -> Disk:
    return Disk(key=key, label=f"Hard disk {key - 1999}", file=f"[{ds}] x/x.vmdk", datastore=ds,
                capacity_bytes=mb << 20, controller="pvscsi", unit=f"scsi0:{key - 2000}", backing=backing, lun=lun)


def lun(name: str, *states: str) -> HostLun:
    return HostLun(name=name, paths=tuple(LunPath(f"vmhba2:C0:T{i}:L1", "vmhba2", s) for i, s in enumerate(states)))


@pytest.fixture
def inv() -> Inventory:
    hosts = (
        Host("host-1", "esx-a", "C1", luns=(lun(LUN_A, "active", "standby"), lun(LUN_B, "dead", "dead")),
             datastores=("vmfs-a", "nfs-1", "local-a")),
        Host("host-2", "esx-b", "C1", luns=(lun(LUN_A, "standby", "active"),), datastores=("vmfs-a", "nfs-1")),
        Host("host-3", "esx-c", "C2", luns=(lun(LUN_B, "dead"),), datastores=("vmfs-b", "nfs-1")),
    )
    datastores = (
        Datastore("ds-1", "vmfs-a", DatastoreKind.VMFS, "VMFS", extents=(LUN_A,), hosts=("esx-a", "esx-b")),
        Datastore("ds-2", "vmfs-b", DatastoreKind.VMFS, "VMFS", extents=(LUN_B,), hosts=("esx-a", "esx-c")),
        Datastore("ds-3", "nfs-1", DatastoreKind.NFS, "NFS", nfs_remote_host="nas", nfs_remote_path="/v1",
                  hosts=("esx-a", "esx-b", "esx-c")),
        Datastore("ds-4", "local-a", DatastoreKind.LOCAL, "VMFS", extents=("mpx.vmhba0:C0:T0:L0",), hosts=("esx-a",)),
    )
    vms = (
        VM("vm-1", "on-a", host="esx-a", cluster="C1", disks=(disk("vmfs-a"),)),
        VM("vm-2", "on-a-and-nfs", host="esx-b", cluster="C1", disks=(disk("vmfs-a"), disk("nfs-1", key=2001))),
        VM("vm-3", "on-b", host="esx-c", cluster="C2", disks=(disk("vmfs-b"),)),
        VM("vm-4", "on-local", host="esx-a", cluster="C1", disks=(disk("local-a"),)),
        VM("vm-5", "on-nfs", host="esx-c", cluster="C2", disks=(disk("nfs-1"),)),
        VM("vm-9", "proxy-vm", host="esx-a", cluster="C1", disks=(disk("vmfs-a"),)),
    )
    return Inventory("DC", hosts=hosts, datastores=datastores, vms=vms)


def phys(name: str = "phys", luns: tuple[str, ...] = (LUN_A,), exports: frozenset[str] = frozenset(), **kw: object
         ) -> Proxy:
    return Proxy(name, ProxyKind.PHYSICAL, 8, 16384, luns=tuple(LunAccess(x, f"reported by {name}'s agent")
                                                                 for x in luns), nfs_exports=exports, **kw)


def vmproxy(name: str = "pvm", host: str = "esx-a", cluster: str = "C1", **kw: object) -> Proxy:
    return Proxy(name, ProxyKind.VM, 4, 8192, host=host, cluster=cluster, vm_moref="vm-9", **kw)


def test_san_when_the_proxy_sees_the_lun_and_a_path_is_active(inv: Inventory) -> None:
    c = classify_tier(inv.vm_by_name["on-a"], phys(), inv)
    assert (c.tier, c.mode) == (Tier.SAN, "san")
    assert LUN_A in c.reason and "reported by phys's agent" in c.reason and "active path" in c.reason


def test_no_san_when_every_path_to_the_lun_is_dead(inv: Inventory) -> None:
    c = classify_tier(inv.vm_by_name["on-b"], phys(luns=(LUN_B,)), inv)
    assert c.tier is Tier.NBD
    assert "no active path" in c.reason and "dead" in c.reason


def test_direct_nfs_is_tier_one_and_mixed_datastores_need_both(inv: Inventory) -> None:
    both = phys(exports=frozenset({"nas:/v1"}))
    assert classify_tier(inv.vm_by_name["on-nfs"], both, inv).mode == "direct-nfs"
    mixed = classify_tier(inv.vm_by_name["on-a-and-nfs"], both, inv)
    assert (mixed.tier, mixed.mode) == (Tier.SAN, "san")
    # Without the export, the worst datastore decides: NFS is unreachable directly, so NBD for a physical proxy.
    c = classify_tier(inv.vm_by_name["on-a-and-nfs"], phys(), inv)
    assert c.tier is Tier.NBD and "does not mount NFS export nas:/v1" in c.reason


def test_local_datastore_is_never_san(inv: Inventory) -> None:
    c = classify_tier(inv.vm_by_name["on-local"], phys(luns=("mpx.vmhba0:C0:T0:L0",)), inv)
    assert c.tier is Tier.NBD and "local disk" in c.reason


def test_hotadd_needs_every_datastore_mounted_and_ranks_same_host_first(inv: Inventory) -> None:
    same_host = classify_tier(inv.vm_by_name["on-a"], vmproxy(), inv)
    assert (same_host.tier, same_host.affinity) == (Tier.HOTADD, 0)
    same_cluster = classify_tier(inv.vm_by_name["on-a"], vmproxy("pvm-b", host="esx-b"), inv)
    assert (same_cluster.tier, same_cluster.affinity) == (Tier.HOTADD, 1)
    elsewhere = classify_tier(inv.vm_by_name["on-nfs"], vmproxy(), inv)
    assert (elsewhere.tier, elsewhere.affinity) == (Tier.HOTADD, 2)
    not_mounted = classify_tier(inv.vm_by_name["on-b"], vmproxy(), inv)
    assert not_mounted.tier is Tier.NBD and "does not mount vmfs-b" in not_mounted.reason


def test_a_vm_proxy_sees_luns_through_passthrough_as_san(inv: Inventory) -> None:
    p = vmproxy(luns=(LunAccess(LUN_A, "vmhba3 passed through from esx-a"),))
    c = classify_tier(inv.vm_by_name["on-a"], p, inv)
    assert c.tier is Tier.SAN and "vmhba3 passed through from esx-a" in c.reason


def test_a_proxy_never_hotadds_its_own_disks(inv: Inventory) -> None:
    c = classify_tier(inv.vm_by_name["proxy-vm"], vmproxy(), inv)
    assert c.tier is Tier.NBD and "its own disks" in c.reason


@pytest.mark.parametrize(("proxy", "words"), [
    (phys(alive=False, down_reason="no heartbeat"), "is down: no heartbeat"),
    (phys(vsda_active=False), "VSDA is not active"),
    (phys(nbd=False, luns=()), "no access path"),
])
def test_ineligible_proxies_say_why(inv: Inventory, proxy: Proxy, words: str) -> None:
    c = classify_tier(inv.vm_by_name["on-a"], proxy, inv)
    assert c.tier is None and not c.eligible and words in c.reason


def test_round_one_admits_only_the_best_tier_then_lower_tiers_join(inv: Inventory) -> None:
    proxies = [phys("p-san"), vmproxy("p-hot"), phys("p-nbd", luns=())]
    table = tier_table([inv.vm_by_name["on-a"]], proxies, inv)
    assert [c.proxy for c in eligible_proxies("on-a", 1, table)] == ["p-san"]
    assert [c.proxy for c in eligible_proxies("on-a", 2, table)] == ["p-san", "p-hot"]
    assert [c.proxy for c in eligible_proxies("on-a", 3, table)] == ["p-san", "p-hot", "p-nbd"]
    assert [c.proxy for c in eligible_proxies("on-a", 7, table)] == ["p-san", "p-hot", "p-nbd"]


def test_a_vm_whose_best_tier_is_nbd_has_nbd_proxies_in_round_one(inv: Inventory) -> None:
    table = tier_table([inv.vm_by_name["on-local"]], [phys("p1"), phys("p2", alive=False)], inv)
    assert [c.proxy for c in eligible_proxies("on-local", 1, table)] == ["p1"]
    assert table.best_tier("on-local") is Tier.NBD


def test_allowed_tier_rejects_round_zero() -> None:
    assert allowed_tier(Tier.HOTADD, 1) is Tier.HOTADD
    assert allowed_tier(Tier.SAN, 2) is Tier.HOTADD
    with pytest.raises(ValueError, match="round 0"):
        allowed_tier(Tier.SAN, 0)


def test_no_disks_means_no_eligible_proxy(inv: Inventory) -> None:
    empty = VM("vm-0", "empty", host="esx-a")
    table = tier_table([empty], [phys()], inv)
    assert list(eligible_proxies("empty", 3, table)) == [] and not eligible_proxies("empty", 3, table).names
    assert "no disk" in table.for_vm("empty")[0].reason


def test_eligible_proxies_is_restricted_to_the_proxies_that_serve(inv: Inventory) -> None:
    proxies = [phys("p-san"), phys("p-san-2"), vmproxy("p-hot"), phys("p-nbd", luns=())]
    table = tier_table([inv.vm_by_name["on-a"]], proxies, inv)
    every = eligible_proxies("on-a", 2, table)
    assert every.names == {"p-san", "p-san-2", "p-hot"} and len(every) == 3
    assert [c.proxy for c in every] == ["p-san", "p-san-2", "p-hot"]  # best first
    served = eligible_proxies("on-a", 2, table, serving=frozenset({"p-san-2", "p-hot", "p-nbd"}))
    assert served.names == {"p-san-2", "p-hot"} and [c.proxy for c in served] == ["p-san-2", "p-hot"]
    # The round admits tiers from the VM's best over the whole table, whether or not its proxies serve.
    round_1 = eligible_proxies("on-a", 1, table, serving=frozenset({"p-hot", "p-nbd"}))
    assert not round_1 and list(round_1) == []
    assert eligible_proxies("on-a", 3, table, serving=frozenset()).names == frozenset()


def test_nothing_outside_tiers_bypasses_eligible_proxies() -> None:
    # US 9563514 FIG. 6 block 606 is the code every engine runs: TierTable.eligible/eligible_names are its internals.
    import ast
    from pathlib import Path

    import vsphere_proxy

    root = Path(vsphere_proxy.__file__).parent
    calls = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "tiers.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("eligible", "eligible_names")):
                calls.append(f"{path.relative_to(root)}:{node.lineno}")
    assert calls == []
