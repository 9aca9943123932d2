"""`vsphere-proxy restore`: bring backups back.

- `restore vm`: VMs recreated in vCenter from their restore points (`vsphere_proxy.jobs.restore.RestoreRun`), a
  restore job run by the coordinator through the proxies, beside the backups running at the same time.
- `restore disk --to FILE|DEVICE`: one disk as a flat image file or into a block device; needs only the
  repository, nothing in vCenter changes.
Exit 0 when every VM is restored, 3 when some are not, 4 when none is, 2 on bad input (nothing created).
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from vsphere_proxy.backup_report import BackupReport
from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    job_failure,
    line,
    open_catalog,
    open_repository,
    print_job_end,
    read_config,
    repository_failure,
    styled,
    vcenter,
)
from vsphere_proxy.cli.signals import stop_on_signals
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.jobs.errors import JobError
from vsphere_proxy.jobs.restore import RestoreRun
from vsphere_proxy.jobs.restore_plan import RestoreOptions
from vsphere_proxy.repository import Manifest, Repository, RepositoryError
from vsphere_proxy.repository.format import POINT_ID
from vsphere_proxy.units import human_size

HELP = "restore VMs into vCenter, or one disk to an image file or block device"
VM_HELP = "recreate VMs in vCenter from their restore points, written through the proxies"
DISK_HELP = "restore one disk of a VM's restore point to a flat image file or into a block device"

_REFUSED = ((stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISDIR, "a directory"))


def build_parser(sub: Any) -> None:
    p = sub.add_parser("restore", help=HELP, description=HELP)
    kinds = p.add_subparsers(dest="what", required=True, metavar="{vm,disk}")
    vm = kinds.add_parser("vm", help=VM_HELP, description=VM_HELP)
    add_config_argument(vm)
    which = vm.add_argument_group("which VMs (any mix; each VM's latest restore point unless --point)")
    which.add_argument("--vm", action="append", default=[], help="a VM's name (repeat for several)")
    which.add_argument("--tag", action="append", default=[], metavar="CATEGORY:TAG",
                       help="every VM whose latest restore point carries this tag")
    which.add_argument("--job", help="every VM backed up by this backup job (its restore points)")
    which.add_argument("--point", help="restore point id (with one --vm)")
    where = vm.add_argument_group("where")
    where.add_argument("--name", help="the new VM's name (one VM; default <vm>-restored-<UTC time>)")
    where.add_argument("--folder", help="VM folder path below the datacenter (default: the recorded one)")
    where.add_argument("--cluster", help="cluster to place the VM in")
    where.add_argument("--host", help="ESXi host to register the VM on")
    where.add_argument("--resource-pool", help="resource pool path below the host folder, e.g. Prod/Resources/Gold")
    where.add_argument("--datastore", help="put every disk (and the VM's home) on this datastore")
    where.add_argument("--datastore-map", action="append", default=[], metavar="OLD=NEW",
                       help="put what was on datastore OLD on NEW (repeat)")
    where.add_argument("--network-map", action="append", default=[], metavar="OLD=NEW",
                       help="connect NICs that were on network OLD to NEW (repeat)")
    how = vm.add_argument_group("how")
    how.add_argument("--power-on", action="store_true", help="power the VM on once it is restored")
    how.add_argument("--keep-identity", action="store_true",
                     help="keep the source's BIOS/instance UUIDs and MAC addresses (default: new ones)")
    how.add_argument("--overwrite", action="store_true",
                     help="replace the original VM (only when powered off), once the new copy is fully written")
    how.add_argument("--force-power-off", action="store_true", help="with --overwrite: power the original off")
    how.add_argument("--dry-run", action="store_true", help="print the plan and ConfigSpec; change nothing")
    vm.add_argument("--json", action="store_true", help="print the result as JSON")
    vm.set_defaults(func=do_restore_vm)

    disk = kinds.add_parser("disk", help=DISK_HELP, description=DISK_HELP)
    add_config_argument(disk)
    disk.add_argument("--vm", required=True, help="the VM's name")
    disk.add_argument("--point", help="restore point id (default: the VM's latest)")
    disk.add_argument("--disk", type=int, required=True, help="disk index in the restore point (0 = first disk)")
    to = disk.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", type=Path,
                    help="the flat image file to write, or a block device to write the disk into (no larger than "
                         "the device; what lies beyond the disk's capacity is left as it is), or - for stdout (a "
                         "raw stream)")
    to.add_argument("--to-vm", metavar="VM", help="add the disk to this existing VM in vCenter (a free SCSI slot), "
                    "written through the proxies")
    disk.add_argument("--datastore", help="with --to-vm: the datastore of the new disk (default: the VM's first "
                      "disk's)")
    disk.add_argument("--force", action="store_true", help="replace --to if it is a file, overwrite it if a device")
    disk.add_argument("--json", action="store_true", help="print the result as JSON")
    disk.set_defaults(func=do_restore_disk)


# -- restore vm ---------------------------------------------------------------------------------------------------

def _pairs(values: Sequence[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        old, sep, new = v.partition("=")
        if not sep or not old or not new:
            raise CommandError(f"{option}: {v!r} is not OLD=NEW", EXIT_BAD_INPUT)
        if old in out and out[old] != new:
            raise CommandError(f"{option}: {old!r} is mapped twice ({out[old]!r}, {new!r})", EXIT_BAD_INPUT)
        out[old] = new
    return out


def _tagged(point: Manifest, tag: str) -> bool:
    cfg = point.vm_config
    if cfg is not None:
        return any(f"{t.category}:{t.name}" == tag for t in cfg.tags)
    return tag in (point.config.get("tags") or [])


def select_points(repo: Repository, args: argparse.Namespace) -> list[Manifest]:
    """The restore point of every VM asked for, in the order asked, each VM once."""
    if args.point is not None and (len(args.vm) != 1 or args.tag or args.job):
        raise CommandError("--point: names the restore point of one --vm", EXIT_BAD_INPUT)
    for tag in args.tag:
        if ":" not in tag:
            raise CommandError(f"--tag: {tag!r} is not CATEGORY:TAG", EXIT_BAD_INPUT)
    if not (args.vm or args.tag or args.job):
        raise CommandError("--vm: name the VMs to restore (--vm, --tag or --job)", EXIT_BAD_INPUT)
    points: dict[str, Manifest] = {}
    for vm in args.vm:
        points.setdefault(vm, choose_point(repo, vm, args.point))
    if args.tag or args.job:
        latest: dict[str, Manifest] = {}
        for p in repo.points():  # oldest first: the last one of each VM wins
            if args.job is None or p.job_id == args.job:
                latest[p.vm.name] = p
        if args.job is not None and not latest:
            raise CommandError(f"--job: no restore point of backup job {args.job!r} in {repo.path}", EXIT_BAD_INPUT)
        for tag in args.tag:
            tagged = [p for p in latest.values() if _tagged(p, tag)]
            if not tagged:
                raise CommandError(f"--tag: no VM's restore point carries tag {tag!r}", EXIT_BAD_INPUT)
            for p in tagged:
                points.setdefault(p.vm.name, p)
        if args.job is not None and not args.tag:
            for name, p in sorted(latest.items()):
                points.setdefault(name, p)
    return list(points.values())


def options_of(args: argparse.Namespace) -> RestoreOptions:
    return RestoreOptions(
        name=args.name, folder=args.folder, cluster=args.cluster, host=args.host, resource_pool=args.resource_pool,
        datastore=args.datastore, datastore_map=_pairs(args.datastore_map, "--datastore-map"),
        network_map=_pairs(args.network_map, "--network-map"), power_on=args.power_on,
        keep_identity=args.keep_identity, overwrite=args.overwrite, force_power_off=args.force_power_off)


def print_restore(report: BackupReport, names: dict[str, dict[str, str]]) -> None:
    out = console()
    data = report.to_json()
    table = Table("VM", "from", "status", "proxy", "mode", "round", "written", "s", title=f"Restore {report.job_id}")
    for v in report.vms:
        source = names.get(v.vm, {})
        colour = {"done": "green", "failed": "red", "unprotected": "red"}.get(v.status, "")
        table.add_row(source.get("name", v.vm), f"{source.get('vm', '')} {source.get('point', '')}".strip(),
                      styled(v.status, colour), v.proxy or "", v.mode or "", str(v.round or ""),
                      human_size(v.bytes_read) if v.bytes_read else "", f"{v.seconds:.1f}" if v.seconds else "")
    out.print(table)
    for v in report.vms:
        if v.status != "done":
            out.print(line(styled(v.vm, "red"), f": {v.error}"), soft_wrap=True)
        for note in v.notes:
            out.print(f"{v.vm}: {note}", soft_wrap=True)
    print_job_end(report.status, data, ((styled("left behind", "red"), data["left_behind"]),
                                        (styled("job errors", "red"), data["problems"])),
                  f"written {human_size(data['bytes_read'])}")


def print_dry_run(data: dict[str, Any]) -> None:
    out = console()
    for vm in data["vms"]:
        write = vm["write"]
        out.print(line(styled(vm["name"], "bold"), f" from {vm['vm']} {vm['point']}: host {vm['host']}, folder "
                       f"/{vm['folder']}, home {vm['home_datastore']}; writes by {write['mode']} through "
                       f"{', '.join(write['proxies']) or 'no proxy'}"), soft_wrap=True)
        for d in vm["disks"]:
            out.print(f"  disk {d['index']} {d['label']}: {human_size(d['capacity'])} {d['provisioning']}, "
                      f"{d['from']} -> {d['to']} (needs {human_size(d['needs'])})", soft_wrap=True)
        for n in vm["nics"]:
            out.print(f"  {n['label']}: {n['from']} -> {n['to']}", soft_wrap=True)
        for left in vm["config_spec"].get("_left_out", []):
            out.print(f"  not recreated: {left}", soft_wrap=True)
    out.print("dry run: nothing was changed (--json prints each ConfigSpec)", soft_wrap=True)


def _run(config: Any, repo: Repository, args: argparse.Namespace, make: Any) -> int:
    """Run the restore job `make(found, catalog, control)` builds; print its report; its exit code."""
    control = JobControl()
    with stop_on_signals(control), vcenter(config) as found:
        catalog = open_catalog(config)
        run = make(found, catalog, control)
        try:
            if getattr(args, "dry_run", False):
                data = run.dry_run().to_json()
                emit_json(data) if args.json else print_dry_run(data)
                return EXIT_OK
            report = run.run()
        except JobError as e:
            raise job_failure(e) from None
        except RepositoryError as e:
            raise repository_failure(e) from None
        finally:
            catalog.close()
    names = {p.create_as: {"vm": p.source, "point": p.point.id, "name": p.name} for p in run.plans}
    if args.json:
        emit_json({**report.to_json(), "restores": names})
    else:
        print_restore(report, names)
    request = control.request
    if report.status == "interrupted" and request is not None and request.signal is not None:
        return 128 + request.signal  # 130 after SIGINT, 143 after SIGTERM
    return report.exit_code


def do_restore_vm(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    options = options_of(args)
    try:
        points = select_points(repo, args)
    except RepositoryError as e:
        raise repository_failure(e) from None
    return _run(config, repo, args, lambda found, catalog, control: RestoreRun.vms(
        config, found.backend, repo, catalog, points, options, inventory=found.inventory, control=control))


# -- restore disk --to --------------------------------------------------------------------------------------------

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


def _disk_to_vm(args: argparse.Namespace, config: Any, repo: Repository) -> int:
    try:
        point = choose_point(repo, args.vm, args.point)
    except RepositoryError as e:
        raise repository_failure(e) from None
    return _run(config, repo, args, lambda found, catalog, control: RestoreRun.disk(
        config, found.backend, repo, catalog, point, args.disk, args.to_vm, args.datastore,
        inventory=found.inventory, control=control))


def choose_disk(repo: Repository, args: argparse.Namespace) -> Manifest:
    """The restore point `--vm`/`--point` name, which must hold disk `--disk` (bad input otherwise)."""
    manifest = choose_point(repo, args.vm, args.point)
    indexes = [d.index for d in manifest.disks]
    if args.disk not in indexes:
        raise CommandError(f"--disk: restore point {manifest.id} has disks {indexes}, not {args.disk}",
                           EXIT_BAD_INPUT)
    return manifest


def _disk_to_stdout(args: argparse.Namespace, repo: Repository) -> int:
    """`--to -`: the raw disk on stdout (a backup product's pipe, Bareos bpipe style); what a person reads goes to
    stderr. A damaged chunk ends the stream short and the command fails (exit 4), so the reader knows."""
    if args.json:
        raise CommandError("--to -: stdout carries the disk; --json cannot go there too", EXIT_BAD_INPUT)
    if sys.stdout.isatty():
        raise CommandError("--to -: stdout is a terminal; pipe it into a file or a program", EXIT_BAD_INPUT)
    try:
        manifest = choose_disk(repo, args)
        result = repo.stream(manifest.id, args.disk, sys.stdout.buffer)
    except RepositoryError as e:
        raise repository_failure(e) from None
    print(f"streamed {args.vm} disk {args.disk} of {manifest.id}: {result.bytes} bytes, sha256 {result.sha256}",
          file=sys.stderr)
    return EXIT_OK


def do_restore_disk(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    if args.to_vm is not None:
        return _disk_to_vm(args, config, repo)
    if args.datastore is not None:
        raise CommandError("--datastore: only with --to-vm", EXIT_BAD_INPUT)
    if str(args.to) == "-":
        return _disk_to_stdout(args, repo)
    target = check_target(args.to, args.force)
    try:
        manifest = choose_disk(repo, args)
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
