"""The tier table of the testbed topology, written out by hand from testbed/topology/default.json.

proxy-prod  VM on esx-01 (Prod), vmhba3 of esx-01 passed through: sees LUNs fc01, fc02
proxy-dev   VM on esx-05 (Dev), no SAN access
phys-01     physical: LUNs fc02 and fc03 (every path to fc03 is dead), NFS export nas-01.lab:/export/vms1
phys-02     physical, VSDA not active: never eligible
"""

from __future__ import annotations

from typing import Any

import pytest

from adapters.discovery import discover
from adapters.session import connect
from adapters.tags import TagClient
from vsphere_proxy.config import load_config
from vsphere_proxy.jobs.plan import make_plan
from vsphere_proxy.tiers import eligible_proxies

pytestmark = pytest.mark.integration

PROXIES = ("proxy-prod", "proxy-dev", "phys-01", "phys-02")
S, D, H, N, X = "san", "direct-nfs", "hotadd", "nbd", None
FC01 = "naa.600a098038303053453f463045727a01"

#          VM          proxy-prod proxy-dev phys-01 phys-02   round-1 eligible
EXPECTED: dict[str, tuple[tuple[str | None, ...], list[str]]] = {
    "app-01":  ((N, H, N, X), ["proxy-dev"]),            # vmfs-isc-01: only Dev hosts + esx-03 mount it
    "app-02":  ((N, N, N, X), ["phys-01", "proxy-dev", "proxy-prod"]),  # local-esx-03
    "app-03":  ((H, N, S, X), ["phys-01"]),              # nfs-01 + vmfs-fc-02: phys-01 has both
    "app-04":  ((H, H, D, X), ["phys-01"]),              # nfs-01 only: direct NFS
    "db-01":   ((S, N, N, X), ["proxy-prod"]),           # fc-02 + fc-01: only proxy-prod sees fc01
    "db-02":   ((S, N, N, X), ["proxy-prod"]),
    "db-03":   ((N, N, N, X), ["phys-01", "proxy-dev", "proxy-prod"]),  # vmfs-isc-01 + local-esx-03
    "dev-01":  ((N, H, N, X), ["proxy-dev"]),
    "dev-02":  ((N, H, N, X), ["proxy-dev"]),
    "dev-03":  ((N, H, N, X), ["proxy-dev"]),
    "dev-04":  ((N, H, N, X), ["proxy-dev"]),
    "dev-05":  ((N, N, N, X), ["phys-01", "proxy-dev", "proxy-prod"]),  # fc03 visible to phys-01, paths dead
    "dev-06":  ((N, N, N, X), ["phys-01", "proxy-dev", "proxy-prod"]),  # local-esx-06
    "dev-07":  ((N, N, N, X), ["phys-01", "proxy-dev", "proxy-prod"]),  # nfs-01 + local-esx-06
    "test-01": ((N, H, N, X), ["proxy-dev"]),
    "test-02": ((N, H, N, X), ["proxy-dev"]),
    "web-01":  ((S, N, N, X), ["proxy-prod"]),
    "web-02":  ((H, N, N, X), ["proxy-prod"]),           # fc-01 + nfs-01: phys-01 lacks fc01
    "web-03":  ((S, N, S, X), ["phys-01", "proxy-prod"]),  # fc-02: both see it
    "web-04":  ((H, H, D, X), ["phys-01"]),
}


@pytest.fixture(scope="module")
def plan(vcsim: Any) -> Any:
    config = load_config(vcsim.config_path)
    assert [p.name for p in config.proxies] == list(PROXIES)
    with connect(vcsim.url, vcsim.username, vcsim.password, insecure=True) as session, \
            TagClient(session.base_url, vcsim.username, vcsim.password, verify=False) as tags:
        inventory = discover(session, tags=tags)
    return make_plan(config, inventory)


def test_the_tier_table_of_the_testbed(plan: Any) -> None:
    actual = {}
    for s in plan.selected:
        if s.skip:
            continue
        modes = tuple(plan.table.entries[(s.vm.name, p)].mode for p in PROXIES)
        eligible = sorted(c.proxy for c in eligible_proxies(s.vm.name, 1, plan.table))
        actual[s.vm.name] = (modes, eligible)
    assert actual == EXPECTED


def test_the_proxies_are_skipped_not_backed_up_by_themselves(plan: Any) -> None:
    assert {s.vm.name: s.skip for s in plan.selected if s.skip} == {
        "proxy-prod": "a proxy of this job", "proxy-dev": "a proxy of this job"}


def test_reasons_name_luns_hbas_and_hosts(plan: Any) -> None:
    e = plan.table.entries
    assert f"LUN {FC01} of vmfs-fc-01: vmhba3 passed through from esx-01" in e[("web-01", "proxy-prod")].reason
    assert "active path vmhba2:C0:T0:L1 on esx-01" in e[("web-01", "proxy-prod")].reason
    assert "reported by phys-01's agent" in e[("web-03", "phys-01")].reason
    assert "has no active path" in e[("dev-05", "phys-01")].reason
    assert "mounts NFS export nas-01.lab:/export/vms1" in e[("app-04", "phys-01")].reason
    dev04 = e[("dev-04", "proxy-dev")].reason
    assert dev04.startswith("host esx-05 of proxy-dev mounts nfs-02, vmfs-isc-01 (same host)")
    assert e[("web-01", "phys-02")].reason == "VSDA is not active on phys-02"
    assert "on a local disk of esx-03" in e[("app-02", "proxy-prod")].reason
    assert e[("dev-03", "proxy-dev")].affinity == 0
    assert e[("dev-01", "proxy-dev")].affinity == 1 and "same cluster Dev" in e[("dev-01", "proxy-dev")].reason
