"""`vsphere-proxy protect` and `unprotect`: put a hold on a restore point (a legal hold: no retention rule and no
`forget` removes it, until `--until` if given) or take it off; `protect --list` shows the holds."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, time
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    line,
    open_repository,
    read_config,
    repository_failure,
)
from vsphere_proxy.repository import RepositoryError

HELP = "hold a restore point: no retention rule or forget removes it (until --until)"
HELP_UN = "take the hold off a restore point"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("protect", help=HELP, description=HELP)
    add_config_argument(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--point", metavar="ID", help="the restore point to hold")
    what.add_argument("--list", action="store_true", help="list the holds")
    p.add_argument("--until", type=_until, metavar="DATE",
                   help="the hold ends then: 2027-12-31 (end of that day, UTC) or an ISO 8601 time")
    p.add_argument("--reason", default="", help="why (a case number); kept with the hold")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_protect)
    u = sub.add_parser("unprotect", help=HELP_UN, description=HELP_UN)
    add_config_argument(u)
    u.add_argument("--point", metavar="ID", required=True, help="the restore point")
    u.set_defaults(func=do_unprotect)


def _until(text: str) -> datetime:
    try:
        if len(text) == 10:
            return datetime.combine(datetime.fromisoformat(text).date(), time(23, 59, 59), UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (2027-12-31) or an ISO 8601 time (got {text!r})") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def do_protect(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    if args.list:
        holds = repo.holds()
        rows = [{"point": p, "protects": s.protects(), "hold": s.describe()} for p, s in sorted(holds.items())]
        if args.json:
            emit_json(rows)
        else:
            for r in rows:
                console().print(line(r["point"], ": ", r["hold"]), soft_wrap=True)
            if not rows:
                console().print("no holds")
        return EXIT_OK
    try:
        hold = repo.protect(args.point, args.until, args.reason)
    except RepositoryError as e:
        if str(e).startswith(("no restore point", "invalid restore point", "--until", "--reason")):
            raise CommandError(str(e) if str(e).startswith("--") else f"--point: {e}", EXIT_BAD_INPUT) from None
        raise repository_failure(e) from None
    if args.json:
        emit_json({"point": hold.point, "until": hold.until.isoformat() if hold.until else None,
                   "reason": hold.reason})
    else:
        console().print(line(f"held {hold.point} ", hold.describe()), soft_wrap=True)
    return EXIT_OK


def do_unprotect(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    try:
        removed = repo.unprotect(args.point)
    except RepositoryError as e:
        if str(e).startswith("invalid restore point"):
            raise CommandError(f"--point: {e}", EXIT_BAD_INPUT) from None
        raise repository_failure(e) from None
    if not removed:
        raise CommandError(f"--point: restore point {args.point} has no hold", EXIT_BAD_INPUT)
    console().print(line(f"hold taken off {args.point}"), soft_wrap=True)
    return EXIT_OK
