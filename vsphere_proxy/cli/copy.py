"""`vsphere-proxy copy`: copy restore points into a second repository (a `repositories:` entry, or a path): the
points its copy policy selects (`--vm`, `--since`, `--latest`), only the chunks the target lacks, each point
checked on the target before it counts, then the target's own retention. Resumable: run it again after a kill."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    job_failure,
    line,
    open_repository,
    open_repository_at,
    read_config,
    repository_failure,
    styled,
)
from vsphere_proxy.config import Config, ConfigError, CopySelect, CopyTargetConfig, EncryptionConfig, validate
from vsphere_proxy.jobs.copy import CopyReport, CopySelection, run_copy
from vsphere_proxy.jobs.errors import JobError
from vsphere_proxy.repository import Repository, RepositoryError
from vsphere_proxy.retention import Duration
from vsphere_proxy.units import human_size

HELP = "copy restore points into a second repository (disaster-recovery copy): only the chunks it lacks"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("copy", help=HELP, description=HELP)
    add_config_argument(p)
    to = p.add_mutually_exclusive_group()
    to.add_argument("--to", metavar="NAME", help="the `repositories:` entry to copy to (default: the only one)")
    to.add_argument("--to-repository", metavar="PATH", type=Path, help="copy to the repository at PATH")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--to-passphrase-env", metavar="VAR", help="with --to-repository: its passphrase's variable")
    key.add_argument("--to-passphrase-file", metavar="FILE", type=Path, help="with --to-repository: passphrase file")
    key.add_argument("--to-key-file", metavar="FILE", type=Path, help="with --to-repository: its key file")
    p.add_argument("--vm", action="append", default=None, help="only this VM's points (repeatable)")
    p.add_argument("--since", metavar="DURATION", help="only points started within 7d, 36h, 1m of now")
    p.add_argument("--latest", type=int, metavar="N", help="only each VM's N newest points")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="chunks copied at once (default 4)")
    p.add_argument("--dry-run", action="store_true", help="list what would be copied, copy nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_copy)


def _target(config: Config, args: argparse.Namespace) -> CopyTargetConfig:
    keyed = args.to_passphrase_env or args.to_passphrase_file or args.to_key_file
    if args.to_repository is not None:
        enc = None
        if keyed:
            try:
                enc = EncryptionConfig(passphrase_env=args.to_passphrase_env, passphrase_file=args.to_passphrase_file,
                                       key_file=args.to_key_file)
            except ValueError as e:
                raise CommandError(f"--to-*: {e}", EXIT_BAD_INPUT) from None
        try:
            return validate(CopyTargetConfig, {"name": "copy", "path": str(args.to_repository),
                                               "encryption": enc.model_dump() if enc else None}, "--to-repository")
        except ConfigError as e:
            raise CommandError(str(e).replace("--to-repository: path: ", "--to-repository: "), EXIT_BAD_INPUT) \
                from None
    if keyed:
        raise CommandError("--to-passphrase-env/--to-passphrase-file/--to-key-file: only with --to-repository; a "
                           "`repositories:` entry names its own encryption", EXIT_BAD_INPUT)
    targets = {r.name: r for r in config.repositories}
    if args.to is None:
        if len(targets) != 1:
            raise CommandError("copy: name the target: --to NAME (a `repositories:` entry) or --to-repository PATH"
                               + (f"; entries: {', '.join(sorted(targets))}" if targets else ""), EXIT_BAD_INPUT)
        return next(iter(targets.values()))
    if args.to not in targets:
        raise CommandError(f"--to: no `repositories:` entry {args.to!r}"
                           + (f" (entries: {', '.join(sorted(targets))})" if targets else ""), EXIT_BAD_INPUT)
    return targets[args.to]


def _selection(target: CopyTargetConfig, args: argparse.Namespace) -> CopySelection:
    select: CopySelect = target.select
    try:
        since = Duration.parse(args.since) if args.since else (Duration.parse(select.since) if select.since else None)
    except ValueError as e:
        raise CommandError(f"--since: {e}", EXIT_BAD_INPUT) from None
    if args.latest is not None and args.latest < 1:
        raise CommandError(f"--latest: must be at least 1 (got {args.latest})", EXIT_BAD_INPUT)
    vms = args.vm if args.vm is not None else select.vms
    return CopySelection(tuple(vms) if vms is not None else None, since,
                         args.latest if args.latest is not None else select.latest)


def _open_target(target: CopyTargetConfig, source: Repository) -> Repository:
    where = f"repositories[{target.name}]" if target.name != "copy" else "--to-repository"
    repo = open_repository_at(target.path, target.encryption, create=True, where=where)
    if repo.config.id == source.config.id:
        raise CommandError(f"{where}.path: {target.path} is the job's own repository", EXIT_BAD_INPUT)
    return repo


def _chunks(n: int) -> str:
    return f"{n} chunk{'' if n == 1 else 's'}"


def print_report(report: CopyReport) -> None:
    out = console()
    r = report.result
    for p in r.points:
        colour = {"copied": "green", "failed": "red"}.get(p.status, "")
        detail = f"  {_chunks(p.chunks_written)}, {human_size(p.bytes_written)}" if p.status == "copied" else ""
        out.print(line(styled(f"{p.status:<10}", colour), f" {p.id}  ", p.vm, detail,
                       f"  {p.error}" if p.error else ""), soft_wrap=True)
    skipped = sum(1 for p in r.points if p.status == "skipped")
    out.print(line(f"copy to {report.target}: {len(r.copied)} copied, {skipped} already there, {len(r.failed)} "
                   f"failed of {report.selected} selected; {_chunks(r.chunks_written)} written "
                   f"({human_size(r.chunk_bytes_written)}), {_chunks(r.chunks_verified)} checked on the target, "
                   f"{r.seconds:.1f} s"), soft_wrap=True)
    if report.retention is not None:
        after = report.retention
        out.print(line(f"target retention ({after.rules}): kept {len(after.kept)}, forgot {len(after.removed)}"),
                  soft_wrap=True)
        if after.prune is not None:
            out.print(line(f"target pruned: {human_size(after.prune.bytes_removed)} freed"), soft_wrap=True)
        if after.prune_skipped:
            out.print(line(styled(after.prune_skipped, "yellow")), soft_wrap=True)


def do_copy(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    if args.workers < 1:
        raise CommandError(f"--workers: must be at least 1 (got {args.workers})", EXIT_BAD_INPUT)
    target_config = _target(config, args)
    selection = _selection(target_config, args)
    source = open_repository(config)
    target = _open_target(target_config, source)
    try:
        report = run_copy(source, target, selection, retention=target_config.retention, dry_run=args.dry_run,
                          workers=args.workers)
    except JobError as e:
        raise job_failure(e) from None
    except RepositoryError as e:
        raise repository_failure(e) from None
    if args.json:
        emit_json(report.to_json())
    else:
        print_report(report)
    if not report.result.failed:
        return EXIT_OK
    return EXIT_PARTIAL if report.result.copied else EXIT_FAILED
