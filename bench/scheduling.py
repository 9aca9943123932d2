"""Scheduling quality and speed, measured side by side in one run.

For each scenario in testbed/scenarios/: the makespan of the simulated backup window divided by its lower bound,
for the scheduler and for both baselines (round-robin, least-loaded), and the scheduler's gain over each.
Then the planning time of a synthetic job of 10,000 VMs x 200 proxies: from a classified tier table to the
first wave of assignments (priority list, eligibility, next available proxy, datastore scores, ledger).

    python3 bench/scheduling.py [--vms 10000] [--proxies 200] [--repeat 3]

One line per figure, the ratio last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from vsphere_proxy.coordinator import Coordinator, Job, Policy, WorkDisk, WorkVM
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.scenario import load_scenario
from vsphere_proxy.simulator import compare
from vsphere_proxy.tiers import Classification, Tier, TierTable

SCENARIOS = Path(__file__).resolve().parent.parent / "testbed" / "scenarios"
GIB = 1 << 30


def synthetic_job(n_vms: int, n_proxies: int, seed: int = 7) -> Job:
    """A large estate: 200 datastores; 1/4 of the proxies are physical and see SAN on a slice of the
    datastores, the rest are VM proxies that hot-add within their cluster; every proxy reaches every VM by NBD."""
    rng = random.Random(seed)
    datastores = [f"ds-{i:03d}" for i in range(200)]
    proxies = []
    for i in range(n_proxies):
        kind = ProxyKind.PHYSICAL if i % 4 == 0 else ProxyKind.VM
        proxies.append(Proxy(f"proxy-{i:03d}", kind, rng.choice([2, 4, 8]), rng.choice([2048, 4096, 8192])))
    vms, entries = [], {}
    for v in range(n_vms):
        name = f"vm-{v:05d}"
        ds = rng.choice(datastores)
        disks = tuple(WorkDisk(k, rng.randint(10, 500) * GIB, ds) for k in range(rng.randint(1, 3)))
        vms.append(WorkVM(name, disks))
        d = int(ds[3:])
        for i, p in enumerate(proxies):
            if p.kind is ProxyKind.PHYSICAL and d % 50 == i % 50:
                tier, mode = Tier.SAN, "san"
            elif p.kind is ProxyKind.VM and d % 20 == i % 20:
                tier, mode = Tier.HOTADD, "hotadd"
            else:
                tier, mode = Tier.NBD, "nbd"
            entries[(name, p.name)] = Classification(name, p.name, tier, mode, mode)
    return Job("bench", tuple(vms), TierTable(entries), tuple(proxies), Policy())


def plan_once(n_vms: int, n_proxies: int) -> tuple[float, int]:
    job = synthetic_job(n_vms, n_proxies)  # the tier table comes from discovery: not timed
    t0 = time.perf_counter()
    assignments = Coordinator(job, InMemoryLedger()).start()
    return time.perf_counter() - t0, len(assignments)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--proxies", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    for path in sorted(SCENARIOS.glob("*.yaml")):
        c = compare(load_scenario(path))
        lb = c.bound.seconds
        runs = {r.strategy: r for r in c.runs}
        print(f"{path.stem}: lower bound {lb:.0f} s")
        for r in c.runs:
            lost = f", {len(r.lost)} lost" if r.lost else ""
            print(f"{path.stem}: {r.strategy} makespan {r.makespan_s:.0f} s, {r.done} backed up, "
                  f"{len(r.failed)} reported failed{lost}, makespan / lower bound = {r.makespan_s / lb:.3f}")
        for base in ("round-robin", "least-loaded"):
            gain = 1 - runs["scheduler"].makespan_s / runs[base].makespan_s
            print(f"{path.stem}: scheduler makespan shorter than {base} by = {100 * gain:.1f} %")

    times = []
    for _ in range(args.repeat):
        seconds, n = plan_once(args.vms, args.proxies)
        times.append(seconds)
    print(f"planning {args.vms} VMs x {args.proxies} proxies: {n} first assignments, median of {args.repeat} = "
          f"{statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
