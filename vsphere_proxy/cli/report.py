"""`vsphere-proxy report --job ID --html FILE`: the window picture of a job from the catalog, as one
self-contained HTML file (lanes per proxy, a bar per stream, datastore load, summary, decisions)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
from vsphere_proxy.report_html import write
from vsphere_proxy.timeline import from_job

HELP = "draw a job's backup window from the catalog as a self-contained HTML timeline"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("report", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--job", required=True, help="the job (an id from `vsphere-proxy jobs`)")
    p.add_argument("--html", required=True, metavar="FILE", help="where to write the report")
    p.add_argument("--json", action="store_true", help="print what was drawn as JSON")
    p.set_defaults(func=do_report)


def do_report(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    out = Path(args.html)
    if not out.parent.is_dir():
        raise CommandError(f"--html: {out.parent} is not a directory", EXIT_BAD_INPUT)
    catalog = open_catalog(config)
    try:
        timeline = from_job(catalog, args.job)
    except KeyError:
        raise CommandError(f"--job: no job {args.job!r} in the catalog", EXIT_BAD_INPUT) from None
    finally:
        catalog.close()
    try:
        size = write(timeline, out)
    except OSError as e:
        raise CommandError(f"--html: {out}: cannot write ({e.strerror or e})", EXIT_BAD_INPUT) from None
    data = {"job": args.job, "html": str(out), "bytes": size, "lanes": len(timeline.lanes),
            "streams": len(timeline.bars), "recovered": list(timeline.recovered),
            "makespan_s": round(timeline.makespan, 3)}
    if args.json:
        emit_json(data)
    else:
        console().print(f"{out}: {len(timeline.bars)} streams in {len(timeline.lanes)} lanes, {size:,} bytes")
    return EXIT_OK
