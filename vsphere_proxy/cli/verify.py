"""`vsphere-proxy verify`: re-read every chunk the restore points reference, check its SHA-256, and name the
restore points (and disks) that missing or corrupt chunks break. Exit 4 when any chunk is damaged."""

from __future__ import annotations

import argparse
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    open_repository,
    read_config,
)
from vsphere_proxy.repository import RepositoryError

HELP = "re-hash every chunk of the repository; report missing/corrupt chunks and the restore points they break"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_verify)


def do_verify(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    try:
        report = repo.verify()
    except RepositoryError as e:
        raise CommandError(str(e), EXIT_FAILED) from None
    if args.json:
        emit_json({"ok": report.ok, "points": report.points, "chunks": report.chunks,
                   "missing": list(report.missing), "corrupt": list(report.corrupt),
                   "broken": {p: list(d) for p, d in report.broken.items()}})
    else:
        out = console()
        out.print(("[green]ok[/]: " if report.ok else "[red]damaged[/]: ") + report.summary(), soft_wrap=True)
        for point, disks in report.broken.items():
            m = repo.manifest(point)
            out.print(f"  {point} ({m.vm.name}): disks {', '.join(map(str, disks))} cannot be restored",
                      soft_wrap=True)
    return EXIT_OK if report.ok else EXIT_FAILED
