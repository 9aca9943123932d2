"""`vsphere-proxy forget`: apply the job's retention policy (`job.policy.retention`) or rules given here to the
repository's restore points, print every point kept or removed with its reason, forget the removed ones (never a
held one), and with `--prune` free the chunks nothing references any more. `--point ID` forgets given points."""

from __future__ import annotations

import argparse
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_LOCKED,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    line,
    open_repository,
    read_config,
    repository_failure,
    styled,
)
from vsphere_proxy.config import ConfigError, RetentionConfig, validate
from vsphere_proxy.jobs.forget import ForgetResult, apply_retention, prune_waiting
from vsphere_proxy.repository import PointHeld, RepositoryError, RepositoryLocked
from vsphere_proxy.units import human_size

HELP = ("apply the retention policy: print every restore point kept or removed and why, forget the removed ones "
        "(--prune: and free their chunks)")
_RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


def build_parser(sub: Any) -> None:
    p = sub.add_parser("forget", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--vm", action="append", default=None, help="only this VM's points (repeatable)")
    p.add_argument("--point", action="append", default=None, metavar="ID",
                   help="forget this restore point (repeatable), instead of applying rules")
    for rule in _RULES:
        p.add_argument(f"--{rule.replace('_', '-')}", type=int, metavar="N", dest=rule,
                       help=f"{rule.replace('_', ' ')} (-1: every period); rules given here replace the job's")
    p.add_argument("--keep-within", metavar="DURATION", help="keep every point within 30d, 1y6m, 36h of the newest")
    p.add_argument("--timezone", help="periods in this time zone (IANA name, or local; default: the policy's)")
    p.add_argument("--dry-run", action="store_true", help="decide and print, forget nothing")
    p.add_argument("--prune", action="store_true", help="then free the chunks no restore point references")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="with --prune: wait this long for running jobs to release the repository (default 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_forget)


def _retention(args: argparse.Namespace, policy: RetentionConfig | None) -> RetentionConfig:
    given = {rule: getattr(args, rule) for rule in _RULES if getattr(args, rule) is not None}
    if args.keep_within is not None:
        given["keep_within"] = args.keep_within
    if not given:
        if policy is None:
            raise CommandError("forget: no rule: set job.policy.retention, or give --keep-last/--keep-daily/... "
                               "or --point", EXIT_BAD_INPUT)
        given = policy.model_dump(include={*_RULES, "keep_within"}, exclude_none=True)
    timezone = args.timezone or (policy.timezone if policy is not None else "local")
    try:
        return validate(RetentionConfig, {**given, "timezone": timezone}, "forget")
    except ConfigError as e:
        message = str(e).removeprefix("forget: ")
        field, colon, rest = message.partition(": ")
        if colon and field in (*_RULES, "keep_within", "timezone"):
            source = "--" + field.replace("_", "-") if field in given or (field == "timezone" and args.timezone) \
                else f"job.policy.retention.{field}"
            message = f"{source}: {rest}"
        raise CommandError(message, EXIT_BAD_INPUT) from None


def print_result(result: ForgetResult) -> None:
    out = console()
    if result.rules == "--point":
        did = "would forget" if result.dry_run else "forgot"
        out.print(line(f"{did} {len(result.forgotten)} restore points: ", ", ".join(result.forgotten) or "none"),
                  soft_wrap=True)
        print_prune(result)
        return
    vm = None
    for d in result.decisions:
        if d.vm != vm:
            vm = d.vm
            out.print(line(styled(vm, "bold")), soft_wrap=True)
        verdict = styled("keep  ", "green") if d.keep else styled("remove", "red")
        out.print(line("  ", verdict, f"  {d.id}  {d.time:%Y-%m-%d %H:%M %Z}  ", ", ".join(d.reasons)),
                  soft_wrap=True)
    for b in result.broken:
        out.print(line("  ", styled("broken", "yellow"), f"  {b.id}: ", b.reason, " (left alone: forget it with "
                       "--point)"), soft_wrap=True)
    did = "would forget" if result.dry_run else "forgot"
    out.print(line(f"{result.rules}: kept {len(result.kept)}, {did} {len(result.removed)} restore points"),
              soft_wrap=True)
    print_prune(result)


def print_prune(result: ForgetResult) -> None:
    out = console()
    if result.prune is not None:
        p = result.prune
        out.print(line(f"pruned: {p.chunks_removed} chunks removed, {human_size(p.bytes_removed)} freed, "
                       f"{p.chunks_kept} chunks kept"), soft_wrap=True)
    if result.prune_skipped:
        out.print(line(styled(result.prune_skipped, "yellow")), soft_wrap=True)


def do_forget(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    policy = config.job.policy.retention
    if args.point and any(getattr(args, r) is not None for r in (*_RULES, "keep_within")):
        raise CommandError("--point: forgets the points given; rules (--keep-*) cannot be given with it",
                           EXIT_BAD_INPUT)
    repo = open_repository(config)
    try:
        if args.point:
            result = _forget_points(repo, args)
        else:
            retention = _retention(args, policy)
            result = apply_retention(repo, retention.rules(), retention.tz(), vms=args.vm, dry_run=args.dry_run,
                                     prune=args.prune, wait=args.wait)
    except PointHeld as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    except RepositoryError as e:
        raise repository_failure(e) from None
    if args.json:
        emit_json(result.to_json())
    else:
        print_result(result)
    return EXIT_LOCKED if result.prune_skipped else EXIT_OK


def _forget_points(repo: Any, args: argparse.Namespace) -> ForgetResult:
    ids = sorted(set(args.point))
    known = set(repo.point_ids())
    unknown = [p for p in ids if p not in known]
    if unknown:
        raise CommandError(f"--point: no restore point {unknown[0]} in {repo.path}", EXIT_BAD_INPUT)
    if args.dry_run:
        return ForgetResult("--point", (), tuple(ids), dry_run=True)
    forgotten = tuple(repo.forget(ids))
    result = ForgetResult("--point", (), forgotten)
    if args.prune:
        try:
            return ForgetResult("--point", (), forgotten, prune=prune_waiting(repo, args.wait))
        except RepositoryLocked as e:
            return ForgetResult("--point", (), forgotten, prune_skipped=f"prune did not run: {e}")
    return result

