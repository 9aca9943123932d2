"""Restore throughput per write mode against backup throughput on the same disks, side by side in one run.

Starts a simulator of its own (the default topology, disks scaled by `--scale`), backs up every VM with one
backup job, then restores every VM it backed up into vCenter with one restore job (`restore vm --job`), both on the
embedded engine through the same proxies. Every stream of both jobs is in the catalog with its mode, its bytes
and its start and end; per mode the bench adds up, over the streams of that mode:

- disk MiB/s: the capacity of the disks the streams covered, per second of stream time (how fast a disk of a
  given size is backed up, or brought back);
- moved MiB/s: the bytes the streams moved (a backup reads every block, a restore writes only the blocks that
  are not holes).

A restore writes each VM through the write tier that mirrors the tier its backup read it with, so the modes of
the two jobs line up. The ratio restore / backup (disk MiB/s) is printed last. Snapshot and VM creation are
outside the streams and not counted. Every figure is measured; the median of `--repeat` runs is shown.

    python3 bench/restore.py [--scale 8] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from testbed.bed import own_testbed
from vsphere_proxy.catalog import Catalog
from vsphere_proxy.cli import main
from vsphere_proxy.repository import Repository

MIB = 1 << 20


def cli(*argv: str) -> dict[str, Any]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    data: dict[str, Any] = json.loads(out.getvalue())
    if code != 0:
        raise SystemExit(f"{argv[0]} exited {code}: {json.dumps(data)[:500]}")
    return data


def per_mode(catalog: Catalog, job_id: str, capacity: dict[tuple[str, int], int]) -> dict[str, dict[str, float]]:
    """mode -> disk bytes covered, bytes moved and stream seconds of the job's streams that completed."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"disk": 0.0, "moved": 0.0, "seconds": 0.0, "streams": 0})
    for s in catalog.streams(job_id):
        if s.outcome != "read":
            continue
        m = out[s.mode]
        m["disk"] += capacity[(s.vm, s.disk)]
        m["moved"] += s.bytes
        m["seconds"] += (s.ended - s.started).total_seconds()
        m["streams"] += 1
    return dict(out)


def one_run(scale: float) -> dict[str, dict[str, dict[str, float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp, own_testbed(Path(tmp), disk_scale=scale) as own:
        config = str(own.config)
        backup = cli("backup", "--config", config, "--json")
        restore = cli("restore", "vm", "--config", config, "--job", backup["job_id"], "--json")
        repo = Repository.open(own.work / "repository")
        points = {p.id: p for p in repo.points()}
        backup_capacity = {(p.vm.name, d.index): d.capacity for p in points.values() for d in p.disks}
        restore_capacity = {(unit, d.index): d.capacity for unit, r in restore["restores"].items()
                            for d in points[r["point"]].disks}
        catalog = Catalog.open(own.work / "repository.catalog.sqlite")
        try:
            return {"backup": per_mode(catalog, backup["job_id"], backup_capacity),
                    "restore": per_mode(catalog, restore["job_id"], restore_capacity)}
        finally:
            catalog.close()


def rate(m: dict[str, float] | None, key: str) -> float | None:
    if not m or not m["seconds"]:
        return None
    return m[key] / MIB / m["seconds"]


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=8.0, help="disk size factor over the topology's (default 8)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = [one_run(args.scale) for _ in range(args.repeat)]
    modes = sorted({m for r in runs for job in r.values() for m in job})
    rows = []
    for mode in modes:
        row: dict[str, Any] = {"mode": mode}
        for job in ("backup", "restore"):
            row[f"{job}_disk_mib_s"] = median([rate(r[job].get(mode), "disk") for r in runs])
            row[f"{job}_moved_mib_s"] = median([rate(r[job].get(mode), "moved") for r in runs])
            row[f"{job}_streams"] = median([r[job].get(mode, {}).get("streams", 0) for r in runs])
        b, r_ = row["backup_disk_mib_s"], row["restore_disk_mib_s"]
        row["ratio_restore_backup"] = r_ / b if b and r_ else None
        rows.append(row)
    if args.json:
        print(json.dumps({"scale": args.scale, "repeat": args.repeat, "modes": rows}, indent=2))
        return 0
    table = Table("write mode", "streams (b/r)", "backup disk MiB/s", "backup moved MiB/s", "restore disk MiB/s",
                  "restore moved MiB/s", "restore / backup",
                  title=f"Restore vs backup per mode, disks x{args.scale:g}, median of {args.repeat}")

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    for row in rows:
        ratio = row["ratio_restore_backup"]
        table.add_row(row["mode"], f"{row['backup_streams']:g}/{row['restore_streams']:g}",
                      f(row["backup_disk_mib_s"]), f(row["backup_moved_mib_s"]), f(row["restore_disk_mib_s"]),
                      f(row["restore_moved_mib_s"]), "" if ratio is None else f"{ratio:.2f}x")
    Console(markup=False, emoji=False, highlight=False).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
