"""`vsphere-proxy restore`: write one disk of a restore point, equal to the source disk's bytes at backup time, as a
flat image file or into a block device (a LUN, a loop device). Needs only the repository; nothing in vCenter
changes."""

from __future__ import annotations

import argparse
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    open_repository,
    read_config,
    repository_failure,
)
from vsphere_proxy.repository import Manifest, Repository, RepositoryError
from vsphere_proxy.repository.format import POINT_ID

HELP = "restore one disk of a VM's restore point to a flat image file or into a block device"

_REFUSED = ((stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISDIR, "a directory"))


def build_parser(sub: Any) -> None:
    p = sub.add_parser("restore", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--vm", required=True, help="the VM's name")
    p.add_argument("--point", help="restore point id (default: the VM's latest)")
    p.add_argument("--disk", type=int, required=True, help="disk index in the restore point (0 = first disk)")
    p.add_argument("--to", required=True, type=Path,
                   help="the flat image file to write, or a block device to write the disk into (no larger than "
                        "the device; what lies beyond the disk's capacity is left as it is)")
    p.add_argument("--force", action="store_true", help="replace --to if it is a file, overwrite it if a device")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_restore)


@dataclass(frozen=True)
class Target:
    path: Path
    device_bytes: int | None  # a block device's size; None for a file to create or replace

    @property
    def kind(self) -> str:
        return "file" if self.device_bytes is None else "block device"


def check_target(path: Path, force: bool) -> Target:
    """What `--to` names, refused in one line unless it is a regular file, a path to create or a block device that
    nothing holds (a mounted file system's device is refused)."""
    try:
        mode = path.stat().st_mode  # follows symbolic links: /dev/disk/by-id/... names a block device
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise CommandError(f"--to: directory {path.parent} does not exist", EXIT_BAD_INPUT) from None
        return Target(path, None)
    except OSError as e:
        raise CommandError(f"--to: {path}: cannot inspect ({e.strerror})", EXIT_BAD_INPUT) from None
    if stat.S_ISREG(mode):
        if not force:
            raise CommandError(f"--to: {path} exists; pass --force to replace it", EXIT_BAD_INPUT)
        return Target(path, None)
    if not stat.S_ISBLK(mode):
        kind = next((name for test, name in _REFUSED if test(mode)), "a special file")
        raise CommandError(f"--to: {path} is {kind}; restore writes a regular file or a block device",
                           EXIT_BAD_INPUT)
    if not force:
        raise CommandError(f"--to: {path} is a block device; pass --force to overwrite its contents",
                           EXIT_BAD_INPUT)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_EXCL)  # O_EXCL on a block device: fails while it is mounted or held
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise CommandError(f"--to: {path} is in use (mounted or held open); refusing to write into it",
                               EXIT_BAD_INPUT) from None
        raise CommandError(f"--to: {path}: cannot open for writing ({e.strerror})", EXIT_BAD_INPUT) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return Target(path, size)


def choose_point(repo: Repository, vm: str, point: str | None) -> Manifest:
    """The restore point asked for (or the VM's latest); a point that is not there, or not the VM's, is bad input."""
    if point is None:
        latest = repo.latest(vm)
        if latest is None:
            raise CommandError(f"--vm: no restore point of {vm!r} in {repo.path}", EXIT_BAD_INPUT)
        return latest
    if not POINT_ID.match(point):
        raise CommandError(f"--point: {point!r} is not a restore point id", EXIT_BAD_INPUT)
    if point not in repo.point_ids():
        raise CommandError(f"--point: no restore point {point!r} in {repo.path}", EXIT_BAD_INPUT)
    manifest = repo.manifest(point)
    if manifest.vm.name != vm:
        raise CommandError(f"--point: {point} is a restore point of {manifest.vm.name!r}, not {vm!r}",
                           EXIT_BAD_INPUT)
    return manifest


def do_restore(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    target = check_target(args.to, args.force)
    try:
        manifest = choose_point(repo, args.vm, args.point)
        indexes = [d.index for d in manifest.disks]
        if args.disk not in indexes:
            raise CommandError(f"--disk: restore point {manifest.id} has disks {indexes}, not {args.disk}",
                               EXIT_BAD_INPUT)
        capacity = manifest.disk(args.disk).capacity
        if target.device_bytes is not None and target.device_bytes < capacity:
            raise CommandError(f"--to: {target.path} holds {target.device_bytes} bytes; disk {args.disk} of "
                               f"{manifest.id} needs {capacity}", EXIT_BAD_INPUT)
        result = repo.restore(manifest.id, args.disk, target.path)
    except RepositoryError as e:
        raise repository_failure(e) from None
    data = {"vm": args.vm, "point": manifest.id, "disk": args.disk, "to": str(result.path), "target": target.kind,
            "bytes": result.bytes, "sha256": result.sha256, "backed_up": manifest.started.isoformat()}
    if args.json:
        emit_json(data)
    else:
        into = f"into block device {result.path}" if target.device_bytes is not None else f"to {result.path}"
        beyond = (f" (the device's last {target.device_bytes - result.bytes} bytes left as they were)"
                  if target.device_bytes is not None and target.device_bytes > result.bytes else "")
        console().print(f"restored {args.vm} disk {args.disk} from {manifest.id} ({manifest.started:%Y-%m-%d %H:%M} "
                        f"UTC) {into}: {result.bytes} bytes, sha256 {result.sha256}{beyond}", soft_wrap=True)
    return EXIT_OK
