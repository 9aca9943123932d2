"""`vsphere-proxy verify`: re-read every chunk the restore points reference, check its SHA-256, quarantine the
corrupt ones, and name the restore points (and disks) that missing or corrupt chunks break, the broken points
(manifests that cannot be read, with the reason) and the quarantined chunk files. Exit 4 when anything is damaged.

Every name comes from the repository (a VM named `web-05 [/]`), so everything is printed literally.
"""

from __future__ import annotations

import argparse
from typing import Any

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
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
from vsphere_proxy.repository import RepositoryError, Sample, VerifyReport

HELP = ("re-hash every chunk of the repository; quarantine corrupt chunks; report missing/corrupt chunks, the "
        "restore points they break and unreadable manifests")


def build_parser(sub: Any) -> None:
    p = sub.add_parser("verify", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--sample", metavar="N|P%", type=_sample,
                   help="check a random subset of the chunks: N chunks, or P percent of them (5%%)")
    p.add_argument("--seed", type=int, help="the sample's random seed (default: a fresh one, printed)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_verify)


def _sample(text: str) -> Sample:
    try:
        if text.endswith("%"):
            return Sample(percent=float(text[:-1]))
        return Sample(count=int(text))
    except ValueError as exc:  # RepositoryError is one
        if isinstance(exc, RepositoryError):
            raise argparse.ArgumentTypeError(str(exc).removeprefix("sample: ")) from None
        raise argparse.ArgumentTypeError(f"must be a count (200) or a percentage (5%) (got {text!r})") from None


def report_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "ok": report.ok, "points": report.points, "chunks": report.chunks, "referenced": report.referenced,
        "sample": None if report.sample is None else {"size": report.sample.describe(), "seed": report.sample.seed},
        "missing": list(report.missing), "corrupt": list(report.corrupt),
        "broken": {p: list(d) for p, d in report.broken.items()},
        "broken_points": [{"id": b.id, "reason": b.reason} for b in report.broken_points],
        "damaged": list(report.damaged),
        "problems": [{"chunk": p.chunk, "kind": p.kind, "detail": p.detail, "quarantined": p.quarantined or None,
                      "used_by": [{"point": r.point, "vm": report.vms.get(r.point), "disk": r.disk}
                                  for r in p.used_by]} for p in report.problems],
        "quarantine": [{"chunk": q.chunk, "path": q.path, "rewritten": q.rewritten} for q in report.quarantine],
    }


def print_report(report: VerifyReport) -> None:
    out = console()
    verdict = styled("ok", "green") if report.ok else styled("damaged", "red")
    out.print(line(verdict, ": ", report.summary()), soft_wrap=True)
    for point, disks in report.broken.items():
        vm = report.vms.get(point, "?")
        out.print(line("  ", point, " (", vm, "): disks ", ", ".join(map(str, disks)), " cannot be restored"),
                  soft_wrap=True)
    for broken in report.broken_points:
        out.print(line("  ", broken.id, ": broken: ", broken.reason), soft_wrap=True)
    for problem in report.problems:
        out.print(line("  ", problem.detail), soft_wrap=True)  # "chunk <id> is missing|corrupt: ..."
    waiting = [q for q in report.quarantine if not q.rewritten]
    if report.quarantine:
        out.print(line(f"quarantined chunk files: {len(report.quarantine)} ({len(waiting)} not written again "
                       "yet; a backup that reads the same data writes them again)"), soft_wrap=True)
        for q in report.quarantine:
            out.print(line("  ", q.path, ": ", "written again since" if q.rewritten else "chunk missing"),
                      soft_wrap=True)


def do_verify(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    try:
        sample = args.sample
        if args.seed is not None:
            if sample is None:
                raise CommandError("--seed: only with --sample", EXIT_BAD_INPUT)
            sample = Sample(sample.percent, sample.count, args.seed)
        report = repo.verify(sample=sample)
    except RepositoryError as e:
        raise repository_failure(e) from None
    if args.json:
        emit_json(report_json(report))
    else:
        print_report(report)
    return EXIT_OK if report.ok else EXIT_FAILED
