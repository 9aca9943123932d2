"""The backup-window simulator: fair sharing, the lower bound, exact small windows, the shipped scenarios, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vsphere_proxy.cli import main
from vsphere_proxy.config import ConfigError
from vsphere_proxy.scenario import GIB, MIB, load_scenario, parse_scenario
from vsphere_proxy.simulator import allocate, compare, lower_bound, simulate

SCENARIOS = Path(__file__).resolve().parent.parent / "testbed" / "scenarios"


def scenario(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "tiny",
        "rates_mib_s": {"san": 100, "nbd": 10},
        "policy": {"max_streams": 4},
        "proxies": [{"name": "p1", "cpus": 1, "ram_mb": 200}],  # 2 streams
        "datastores": [{"name": "ds1", "mib_s": 150}, {"name": "ds2", "mib_s": 1000}],
        "vms": [{"name": "a", "disks_gib": [1], "datastores": ["ds1"], "tiers": {"p1": "san"}}],
    }
    base.update(over)
    return base


def test_fair_share_gives_what_a_capped_flow_leaves_to_the_others() -> None:
    assert allocate([100, 100], [("ds",), ("ds",)], {"ds": 150}) == pytest.approx([75, 75])
    assert allocate([10, 100], [("ds",), ("ds",)], {"ds": 150}) == pytest.approx([10, 100])
    assert allocate([10, 200], [("ds",), ("ds",)], {"ds": 150}) == pytest.approx([10, 140])
    assert allocate([50, 50, 50], [("a", "p"), ("a",), ("b", "p")], {"a": 60, "p": 40}) == pytest.approx([20, 40, 20])
    assert allocate([], [], {"ds": 1}) == []


def test_one_disk_takes_its_size_over_its_rate() -> None:
    r = simulate(parse_scenario(scenario()))
    assert r.makespan_s == pytest.approx(GIB / (100 * MIB))  # 10.24 s
    assert (r.status, r.done, r.rounds, r.lost, r.proxy_peak) == ("complete", 1, 1, (), {"p1": 1})


def test_two_streams_share_a_datastore_cap_and_the_bound_sees_it() -> None:
    sc = parse_scenario(scenario(vms=[{"name": "vm-{n}", "count": 2, "disks_gib": [1], "datastores": ["ds1"],
                                      "tiers": {"p1": "san"}}], policy={"max_streams": 4, "datastore_cap": 2}))
    bound = lower_bound(sc)
    assert bound.busiest_datastore == "ds1"
    assert bound.busiest_datastore_s == pytest.approx(2 * GIB / (150 * MIB))
    assert bound.largest_disk_s == pytest.approx(GIB / (100 * MIB))
    r = simulate(sc)
    assert r.makespan_s == pytest.approx(2 * GIB / (150 * MIB))  # both at 75 MiB/s, the datastore saturated
    assert r.datastore_peak == {"ds1": 2} and r.threshold_raises == 1


def test_a_failing_vm_is_retried_in_the_next_round_and_a_dead_proxy_strands_its_vms() -> None:
    sc = parse_scenario(scenario(
        proxies=[{"name": "p1", "cpus": 1, "ram_mb": 200}, {"name": "p2", "kind": "vm", "cpus": 1, "ram_mb": 200}],
        vms=[{"name": "a", "disks_gib": [1], "datastores": ["ds2"], "tiers": {"p1": "san", "p2": "nbd"}},
             {"name": "b", "disks_gib": [2], "datastores": ["ds1"], "tiers": {"p1": "san", "p2": "nbd"}}],
        failures=[{"vm": "a", "fails": 1, "after_fraction": 0.5}, {"proxy": "p1", "down_at_s": 12}]))
    r = simulate(sc, keep_segments=True)
    assert r.lost == () and r.failed == () and r.done == 2 and r.status == "complete"
    assert set(r.stranded) == {"a", "b"}
    outcomes = {(s.vm, s.attempt, s.proxy): s.outcome for s in r.segments}
    assert outcomes[("a", 1, "p1")] == "failed"  # after half the disk: 5.12 s
    assert outcomes[("b", 1, "p1")] == "aborted"  # p1 died at 12 s
    assert outcomes[("b", 2, "p2")] == "read"  # round 3 admits nbd
    assert r.rounds == 3 and "fell back from san to nbd" in r.fell_back["b"]


def test_the_skewed_scenario_is_near_its_lower_bound_and_beats_round_robin() -> None:
    c = compare(load_scenario(SCENARIOS / "skewed.yaml"))
    runs = {r.strategy: r for r in c.runs}
    scheduler, rr = runs["scheduler"], runs["round-robin"]
    assert scheduler.makespan_s <= 1.10 * c.bound.seconds
    assert scheduler.makespan_s <= 0.80 * rr.makespan_s
    assert all(r.lost == () and r.status == "complete" for r in c.runs)


def test_the_failure_scenario_loses_no_vm() -> None:
    c = compare(load_scenario(SCENARIOS / "failure.yaml"))
    for r in c.runs:
        assert r.lost == (), r.strategy
        assert r.done + len(r.failed) == len(c.scenario.vms)
        assert r.failed == ("edge-03",) and "simulated failure" in r.errors["edge-03"]
    scheduler = c.runs[0]
    assert scheduler.rounds == 3 and "db-05" in scheduler.stranded
    assert any("phys-01 (san) down: heartbeat lost" in why for why in scheduler.fell_back.values())


def test_the_balanced_scenario_backs_up_everything_within_the_limits() -> None:
    sc = load_scenario(SCENARIOS / "balanced.yaml")
    r = simulate(sc)
    assert (r.status, r.done, r.lost) == ("complete", len(sc.vms), ())
    limits = {p.name: sc.policy.formula(p) for p in sc.proxies}
    assert all(r.proxy_peak[p] <= limits[p] for p in limits)
    assert all(n <= sc.policy.datastore_cap for n in r.datastore_peak.values())


@pytest.mark.parametrize(("change", "message"), [
    ({"vms": [{"name": "w", "count": 2, "disks_gib": [1], "datastores": ["ds1"], "tiers": {"*": "nbd"}}]},
     "vms[0]: name: needs {n}"),
    ({"vms": [{"name": "a", "disks_gib": [1], "datastores": ["nope"], "tiers": {"*": "nbd"}}]},
     "vms[0].datastores: 'nope' is not one of the datastores"),
    ({"vms": [{"name": "a", "disks_gib": [1], "datastores": ["ds1"], "tiers": {"p1": "hotadd"}}]},
     "vms[0].tiers.p1: hotadd needs a VM proxy"),
    ({"vms": [{"name": "a", "disks_gib": [1], "datastores": ["ds1"], "tiers": {"p1": "hotadd"}}],
      "proxies": [{"name": "p1", "kind": "vm", "cpus": 1, "ram_mb": 200}]}, "no rate for mode 'hotadd'"),
    ({"failures": [{"proxy": "p9", "down_at_s": 3}]}, "failures[0].proxy: 'p9' is not one of the proxies"),
    ({"failures": [{"vm": "zz"}]}, "failures: vm 'zz' is not one of the VMs"),
    ({"rates_mib_s": {"san": 0}}, "rates_mib_s.san: Input should be greater than 0 (got 0)"),
])
def test_a_bad_scenario_is_one_line_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^s\.yaml: ") as e:
        parse_scenario(scenario(**change), "s.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_simulate_command_prints_json_and_rejects_a_bad_file(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--scenario", str(SCENARIOS / "skewed.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in data["runs"]] == ["scheduler", "round-robin", "least-loaded"]
    assert data["runs"][0]["ratio_to_lower_bound"] <= 1.10 and data["lower_bound"]["busiest_datastore"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrates_mib_s: {san: 1}\nproxies: []\n")
    assert main(["simulate", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vsphere-proxy: error: {bad}: proxies: ") and "\n" not in err
    assert main(["simulate", "--scenario", str(SCENARIOS / "failure.yaml"), "--strategy", "scheduler"]) == 0
    out = capsys.readouterr().out
    assert "edge-03" in out and "fell back from san to hotadd" in out and "round-robin" not in out
