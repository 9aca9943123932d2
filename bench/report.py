"""The HTML window report of a 10,000-VM simulated backup window: generation time and file size.

A scenario of `--vms` VMs (two disks each, spread over 24 datastores, every tier present), 40 proxies (8 physical
SAN proxies, 16 hot-add VM proxies, 16 NBD-only VM proxies), with one proxy going down mid-window and a few VMs
failing once, so that the window has fall-backs and VMs stranded then recovered. The simulation (not timed here:
bench/scheduling.py times the scheduler) keeps every stream; then `from_simulation` + `report_html.render` are
timed, median of `--repeat`, and the file written is measured. The goals: under 5 s and under 20 MB.

    python3 bench/report.py [--vms 10000] [--repeat 3] [--out FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsphere_proxy.report_html import render
from vsphere_proxy.scenario import parse_scenario
from vsphere_proxy.simulator import compare
from vsphere_proxy.timeline import from_simulation


def scenario(vms: int) -> dict[str, Any]:
    phys = [f"phys-{i:02d}" for i in range(8)]
    hot = [f"vp-{i:02d}" for i in range(16)]
    nbd = [f"nbd-{i:02d}" for i in range(16)]
    proxies = ([{"name": p, "kind": "physical", "cpus": 2, "ram_mb": 2000} for p in phys]
               + [{"name": p, "kind": "vm", "cpus": 1, "ram_mb": 800} for p in hot + nbd])
    fc = [f"vmfs-fc-{i:02d}" for i in range(12)]
    nfs = [f"nfs-{i:02d}" for i in range(6)]
    local = [f"local-esx-{i:02d}" for i in range(6)]
    datastores = ([{"name": d, "mib_s": 1600} for d in fc] + [{"name": d, "mib_s": 1000} for d in nfs]
                  + [{"name": d, "mib_s": 250} for d in local])
    third = vms // 3
    groups = [
        {"name": "db-{n:05d}", "count": third, "disks_gib": [60, 20], "datastores": [fc, fc],
         "tiers": {**{p: "san" for p in phys}, **{p: "hotadd" for p in hot}, "*": "nbd"}},
        {"name": "app-{n:05d}", "count": third, "disks_gib": [40, 10], "datastores": [nfs, nfs],
         "tiers": {**{p: "hotadd" for p in hot}, **{p: "none" for p in phys}, "*": "nbd"}},
        {"name": "web-{n:05d}", "count": vms - 2 * third, "disks_gib": [20, 5], "datastores": [local, fc],
         "tiers": {**{p: "none" for p in phys}, "*": "nbd"}},
    ]
    failures = [{"proxy": "phys-03", "down_at_s": 1800, "reason": "heartbeat lost"},
                *({"vm": f"db-{n:05d}", "fails": 1} for n in range(1, 21))]
    return {"name": f"window-{vms}", "rates_mib_s": {"san": 400, "direct-nfs": 300, "hotadd": 250, "nbd": 80},
            "policy": {"threshold": 1, "datastore_cap": 4}, "proxies": proxies, "datastores": datastores,
            "vms": groups, "failures": failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, help="keep the report here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t = time.perf_counter()
    comparison = compare(parse_scenario(scenario(args.vms), "bench"), ["scheduler"], keep_segments=True)
    simulate_s = time.perf_counter() - t
    times, page = [], ""
    for _ in range(args.repeat):
        t = time.perf_counter()
        page = render(from_simulation(comparison))
        times.append(time.perf_counter() - t)
    data = page.encode("utf-8")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-report-")) / "window.html"
    out.write_bytes(data)
    run = comparison.runs[0]
    result = {"vms": args.vms, "streams": len(run.segments), "proxies": len(run.proxy_peak), "rounds": run.rounds,
              "stranded": len(run.stranded), "simulate_s": round(simulate_s, 2),
              "report_s_median": round(statistics.median(times), 3), "report_s_runs": [round(x, 3) for x in times],
              "file_mb": round(len(data) / 1e6, 2), "file": str(out),
              "goal_s": 5.0, "goal_mb": 20.0,
              "ratio_time_to_goal": round(statistics.median(times) / 5.0, 3),
              "ratio_size_to_goal": round(len(data) / 1e6 / 20.0, 3)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for k, v in result.items():
        print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
