"""The same backup job on the embedded engine and on Celery with 3 proxy workers, side by side in one run.

One testbed (vcsim with the default topology, disks scaled by `--disk-scale`, a throwaway redis-server and
PostgreSQL, 3 `vsphere-proxy worker` processes: proxy-prod, proxy-dev, phys-01) serves both engines. Each run backs
up every VM with `incremental: false`, so every run reads every block (chunks already stored are not written
again, the same for both engines). Runs alternate embedded / celery, `--repeat` times each; the wall time of the
`vsphere-proxy backup` process is measured, the median shown, and the ratio celery / embedded comes last, with
the distributed engine's per-assignment overhead read from its report: the coordinator's time to decide an
assignment (all its calls into the scheduler, Redis ledger round trips included, over the assignments made) and
the time from sending a task to a worker starting it. The wall time includes each run's process start, vCenter
login, discovery and job-start sweeps, the same for both engines.

    python3 bench/distributed.py [--repeat 3] [--disk-scale 8] [--json]
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

from rich.console import Console
from rich.table import Table

from testbed.fleet import finished, fleet


def run(bed: Any, config: Path, engine: str) -> dict[str, Any]:
    t = time.perf_counter()
    code, report = finished(bed.backup(config, engine=engine), timeout=1800)
    wall = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"{engine} backup ended {report['status']} (exit {code})")
    return {"wall_s": wall, "bytes_read": report["bytes_read"], "dispatch": report.get("dispatch") or {},
            "vms": sum(1 for v in report["vms"] if v["status"] == "done")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--disk-scale", type=float, default=8.0, help="testbed disk sizes x this (default 8)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"embedded": [], "celery": []}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp, \
            fleet(Path(tmp), policy={"incremental": False}, disk_scale=args.disk_scale) as bed:
        config = bed.variant("bench", incremental=False)
        run(bed, config, "embedded")  # warm-up: the repository holds every chunk from here on, for both engines
        for _ in range(args.repeat):
            for engine in ("embedded", "celery"):
                runs[engine].append(run(bed, config, engine))
    wall = {e: statistics.median(r["wall_s"] for r in rs) for e, rs in runs.items()}
    decide = [r["dispatch"]["decide_ms_mean"] for r in runs["celery"] if r["dispatch"].get("decide_ms_mean")]
    queue = [r["dispatch"]["queue_ms_mean"] for r in runs["celery"] if r["dispatch"].get("queue_ms_mean")]
    result = {
        "disk_scale": args.disk_scale, "repeat": args.repeat, "vms": runs["celery"][0]["vms"],
        "bytes_read": runs["celery"][0]["bytes_read"], "assignments": runs["celery"][0]["dispatch"].get("assignments"),
        "embedded_wall_s": round(wall["embedded"], 3), "celery_wall_s": round(wall["celery"], 3),
        "decide_ms_per_assignment": round(statistics.median(decide), 3) if decide else None,
        "send_to_start_ms_per_assignment": round(statistics.median(queue), 3) if queue else None,
        "ratio_celery_to_embedded": round(wall["celery"] / wall["embedded"], 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table("measure", "value", title=f"same job, embedded vs Celery with 3 workers (median of {args.repeat})")
    table.add_row("VMs / bytes read per run", f"{result['vms']} / {result['bytes_read'] / 2**20:.0f} MiB")
    table.add_row("embedded wall s", f"{result['embedded_wall_s']:.2f}")
    table.add_row("celery wall s", f"{result['celery_wall_s']:.2f}")
    table.add_row("celery: coordinator ms per assignment", str(result["decide_ms_per_assignment"]))
    table.add_row("celery: send -> worker start ms per assignment", str(result["send_to_start_ms_per_assignment"]))
    table.add_row("ratio celery / embedded", f"{result['ratio_celery_to_embedded']:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
