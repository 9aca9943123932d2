"""`vsphere-proxy prune`: under the repository's exclusive lock, delete every chunk no restore point references,
the quarantined chunk files no longer needed, leftovers in `tmp/` and holds of points gone; report the bytes
freed. While backups, restores or copies hold the repository it waits `--wait` seconds, then exits 5."""

from __future__ import annotations

import argparse
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_OK,
    add_config_argument,
    console,
    emit_json,
    line,
    open_repository,
    read_config,
    repository_failure,
)
from vsphere_proxy.jobs.forget import prune_json, prune_waiting
from vsphere_proxy.repository import RepositoryError
from vsphere_proxy.units import human_size

HELP = "delete the chunks no restore point references (needs the repository to itself; --wait for it)"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for running jobs to release the repository (default 0: exit 5 at once)")
    p.add_argument("--dry-run", action="store_true",
                   help="count what a prune would free now, deleting nothing (beside running jobs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_prune)


def do_prune(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    out = console()
    try:
        if args.dry_run:
            result = repo.prune(dry_run=True)
        else:
            result = prune_waiting(repo, args.wait,
                                   on_wait=None if args.json else lambda text: out.print(text, soft_wrap=True))
    except RepositoryError as e:
        raise repository_failure(e) from None
    if args.json:
        emit_json({**prune_json(result), "dry_run": args.dry_run})
    else:
        did = ("would remove", "would free") if args.dry_run else ("removed", "freed")
        out.print(line(f"{'would prune' if args.dry_run else 'pruned'}: {result.chunks_removed} chunks {did[0]}, "
                       f"{human_size(result.bytes_removed)} {did[1]}, {result.chunks_kept} chunks kept, "
                       f"{result.tmp_removed} temporary files and {result.quarantine_removed} quarantined files "
                       f"{did[0]}"), soft_wrap=True)
    return EXIT_OK
