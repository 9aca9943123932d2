"""`vsphere-proxy jobs`: the catalog's backup and restore jobs, newest first, or one job's attempts VM by VM."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from rich.table import Table

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    open_catalog,
    read_config,
)

HELP = "list backup and restore jobs from the catalog, or where one job's VMs stand and its attempts"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("jobs", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--job", help="show this job's attempts")
    p.add_argument("--limit", type=int, default=20, help="how many jobs to list (default 20)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=do_jobs)


def do_jobs(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    catalog = open_catalog(config)
    try:
        if args.job:
            job = catalog.job(args.job)
            if job is None:
                raise CommandError(f"--job: no job {args.job!r} in the catalog", EXIT_BAD_INPUT)
            rows = [{"vm": r.vm, "round": r.round, "attempt": r.attempt, "proxy": r.proxy, "mode": r.mode,
                     "status": r.status, "bytes_read": r.bytes_read, "bytes_written": r.bytes_written,
                     "seconds": round(r.seconds, 3), "error": r.error, "point": r.point_id}
                    for r in catalog.results(args.job)]
            roles = [{"proxy": r.proxy, "role": r.role, "rescinded": r.rescinded is not None}
                     for r in catalog.roles(args.job)]
            states = [{"vm": st.vm, "status": st.status, "round": st.round, "attempts": st.attempts,
                       "proxy": st.proxy, "mode": st.mode, "error": st.error}
                      for st in catalog.states(args.job).values()]
            data: Any = {"id": job.id, "name": job.name, "kind": job.kind, "status": job.status, "engine": job.engine,
                         "rounds": job.rounds, "started": job.started.isoformat(),
                         "ended": job.ended.isoformat() if job.ended else None, "roles": roles, "vms": states,
                         "attempts": rows}
        else:
            data = [{"id": j.id, "name": j.name, "kind": j.kind, "status": j.status, "engine": j.engine,
                     "rounds": j.rounds,
                     "started": j.started.isoformat(), "ended": j.ended.isoformat() if j.ended else None,
                     "counts": (j.summary or {}).get("counts", {})} for j in catalog.jobs(args.limit)]
    finally:
        catalog.close()
    if args.json:
        emit_json(data)
        return EXIT_OK
    out = console()
    if args.job and data["vms"]:
        where = Counter(v["status"] for v in data["vms"])
        running = ", ".join(f"{v['vm']} on {v['proxy']}" for v in data["vms"] if v["status"] == "running")
        out.print(f"{data['id']} ({data['engine']} engine, {data['status']}): "
                  + ", ".join(f"{n} {s}" for s, n in sorted(where.items()))
                  + (f"; running: {running}" if running else ""), soft_wrap=True)
    if args.job:
        table = Table("VM", "round", "attempt", "proxy", "mode", "status", "read", "written", "s", "error / point",
                      title=f"{data['id']} ({data['status']})")
        for r in data["attempts"]:
            table.add_row(r["vm"], str(r["round"]), str(r["attempt"]), r["proxy"] or "", r["mode"] or "",
                          r["status"], str(r["bytes_read"]), str(r["bytes_written"]), str(r["seconds"]),
                          r["error"] or r["point"] or "")
    else:
        table = Table("job", "kind", "status", "rounds", "started (UTC)", "VMs", title="Jobs")
        for j in data:
            table.add_row(j["id"], j["kind"], j["status"], str(j["rounds"]), j["started"][:19],
                          ", ".join(f"{n} {s}" for s, n in sorted(j["counts"].items())))
    out.print(table)
    return EXIT_OK
