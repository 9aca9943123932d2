"""`vsphere-proxy simulate`: a what-if backup window. The scenario runs through the real scheduler and through
two baselines (round-robin, least-loaded), side by side with the lower bound no schedule can beat."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from vsphere_proxy.cli.common import EXIT_BAD_INPUT, EXIT_OK, CommandError, console, emit_json, line, styled
from vsphere_proxy.config import ConfigError
from vsphere_proxy.coordinator import STRATEGIES
from vsphere_proxy.report_html import write
from vsphere_proxy.scenario import load_scenario
from vsphere_proxy.simulator import Comparison, compare
from vsphere_proxy.timeline import from_simulation

HELP = "simulate a backup window from a scenario file: makespan, streams, rounds, failures, against baselines"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help=HELP, description=HELP)
    p.add_argument("--scenario", required=True, help="scenario file (YAML or JSON), e.g. testbed/scenarios/skewed.yaml")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--strategy", action="append", choices=sorted(STRATEGIES),
                   help="run only this strategy (repeatable; default: the scheduler and both baselines)")
    p.add_argument("--html", metavar="FILE", help="also write the scheduler's window as a self-contained HTML "
                   "timeline (lanes per proxy, a bar per stream, datastore load, decisions)")
    p.set_defaults(func=do_simulate)


def hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def do_simulate(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(Path(args.scenario))
    except ConfigError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    strategies = args.strategy or ["scheduler", "round-robin", "least-loaded"]
    if args.html and "scheduler" not in strategies:
        raise CommandError("--html: draws the scheduler's window; add --strategy scheduler", EXIT_BAD_INPUT)
    result = compare(scenario, strategies, keep_segments=bool(args.html))
    if args.html:
        try:
            size = write(from_simulation(result), Path(args.html))
        except OSError as e:
            raise CommandError(f"--html: {args.html}: cannot write ({e.strerror or e})", EXIT_BAD_INPUT) from None
        if not args.json:
            console().print(f"timeline written to {args.html} ({size:,} bytes)")
    if args.json:
        emit_json(result.to_json())
    else:
        show(result)
    return EXIT_OK


def show(c: Comparison) -> None:
    out = console()
    data = c.to_json()
    lb = c.bound
    out.print(line(styled(c.scenario.name, "bold"), f": {data['vms']} VMs, {data['proxies']} proxies, "
                   f"job limit {data['job_limit']} streams"))
    if c.scenario.description:
        out.print(c.scenario.description, soft_wrap=True)
    out.print(f"lower bound {hms(lb.seconds)} = max(aggregate bandwidth {hms(lb.aggregate_s)}, "
              f"busiest datastore {lb.busiest_datastore} {hms(lb.busiest_datastore_s)}, "
              f"largest disk {lb.largest_disk} {hms(lb.largest_disk_s)})", soft_wrap=True)
    table = Table("strategy", "makespan", "xLB", "status", "rounds", "done", "strand", "failed", "raises",
                  title="Backup window (xLB: makespan / lower bound; strand: VMs stranded at least once)")
    for r in c.runs:
        table.add_row(r.strategy, hms(r.makespan_s), f"{r.makespan_s / lb.seconds:.3f}" if lb.seconds else "-",
                      r.status, str(r.rounds), str(r.done), str(len(r.stranded)), str(len(r.failed)),
                      str(r.threshold_raises))
    out.print(table)
    for r in c.runs:
        streams = Table("proxy", "peak streams", "mean streams", title=f"{r.strategy}: proxies")
        for p in r.proxy_peak:
            streams.add_row(p, str(r.proxy_peak[p]), f"{r.proxy_mean[p]:.2f}")
        out.print(streams)
        out.print(f"{r.strategy}: datastore peak streams: "
                  + ", ".join(f"{ds} {n}" for ds, n in r.datastore_peak.items()), soft_wrap=True)
        for vm, error in r.errors.items():
            out.print(line("  ", styled(vm, "red"), f": {error}"), soft_wrap=True)
        for vm, why in r.fell_back.items():
            out.print(f"  {vm}: {why}", soft_wrap=True)
        if r.lost:
            out.print(styled(f"  lost (neither backed up nor reported): {', '.join(r.lost)}", "red"), soft_wrap=True)
