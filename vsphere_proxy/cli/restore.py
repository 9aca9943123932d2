"""`vsphere-proxy restore`: write one disk of a restore point as a flat image, equal to the source disk's bytes
at backup time. Needs only the repository; nothing in vCenter changes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
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

HELP = "restore one disk of a VM's restore point to a flat image file"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("restore", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--vm", required=True, help="the VM's name")
    p.add_argument("--point", help="restore point id (default: the VM's latest)")
    p.add_argument("--disk", type=int, required=True, help="disk index in the restore point (0 = first disk)")
    p.add_argument("--to", required=True, type=Path, help="the flat image file to write")
    p.add_argument("--force", action="store_true", help="replace --to if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_restore)


def do_restore(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    target: Path = args.to
    if target.exists() and not args.force:
        raise CommandError(f"--to: {target} exists; pass --force to replace it", EXIT_BAD_INPUT)
    if not target.parent.is_dir():
        raise CommandError(f"--to: directory {target.parent} does not exist", EXIT_BAD_INPUT)
    try:
        if args.point:
            manifest = repo.manifest(args.point)
            if manifest.vm.name != args.vm:
                raise CommandError(f"--point: {args.point} is a restore point of {manifest.vm.name}, not {args.vm}",
                                   EXIT_BAD_INPUT)
        else:
            latest = repo.latest(args.vm)
            if latest is None:
                raise CommandError(f"--vm: no restore point of {args.vm!r} in {repo.path}", EXIT_BAD_INPUT)
            manifest = latest
        indexes = [d.index for d in manifest.disks]
        if args.disk not in indexes:
            raise CommandError(f"--disk: restore point {manifest.id} has disks {indexes}, not {args.disk}",
                               EXIT_BAD_INPUT)
        result = repo.restore(manifest.id, args.disk, target)
    except RepositoryError as e:
        raise CommandError(str(e), EXIT_FAILED) from None
    data = {"vm": args.vm, "point": manifest.id, "disk": args.disk, "to": str(result.path), "bytes": result.bytes,
            "sha256": result.sha256, "backed_up": manifest.started.isoformat()}
    if args.json:
        emit_json(data)
    else:
        text = (f"restored {args.vm} disk {args.disk} from {manifest.id} ({manifest.started:%Y-%m-%d %H:%M} UTC) "
                f"to {result.path}: {result.bytes} bytes, sha256 {result.sha256}")
        console().print(escape(text), soft_wrap=True)
    return EXIT_OK
