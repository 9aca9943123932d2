"""`vsphere-proxy privileges`: the vCenter privileges the service account needs for what the configuration asks
(backup, CBT, hot-add, restore, tags, custom attributes), and with `--check` whether the logged-in user holds
them, as vCenter's `HasPrivilegeOnEntities` answers on sampled objects of the job.

Names come from vCenter (a VM named `web [prod]`), so everything is printed literally.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from vsphere_proxy.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_config_argument,
    console,
    emit_json,
    line,
    read_config,
    styled,
    vcenter,
)
from vsphere_proxy.config import Config
from vsphere_proxy.privileges import (
    ON,
    Check,
    Requirement,
    counts,
    evaluate,
    features_for,
    representatives,
    requirements,
    wanted,
)
from vsphere_proxy.selection import select_vms

HELP = "the vCenter privileges the configuration needs; --check: whether the logged-in user holds them"
STATUS_STYLE = {"ok": "green", "missing": "bold red", "not checked": "yellow"}


def build_parser(sub: Any) -> None:
    p = sub.add_parser("privileges", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--check", action="store_true",
                   help="log in and check them against the user's effective privileges (exit 4 names what is "
                        "missing)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_privileges)


def requirement_json(r: Requirement) -> dict[str, str]:
    return {"privilege": r.privilege, "on": r.on, "feature": r.feature, "why": r.why}


def check_json(c: Check) -> dict[str, Any]:
    e = c.entity
    return requirement_json(c.requirement) | {
        "entity": e.name if e else None, "moref": e.moref if e else None, "type": e.type if e else None,
        "status": c.status, "note": c.note}


def do_privileges(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    if not args.check:
        features = features_for(config)
        reqs = requirements(features)
        if args.json:
            emit_json({"features": features, "requirements": [requirement_json(r) for r in reqs]})
        else:
            print_requirements(features, reqs)
        return EXIT_OK
    user, features, checks, faults = check(config)
    missing = [c for c in checks if c.status == "missing"]
    if args.json:
        emit_json({"user": user, "features": features, "checks": [check_json(c) for c in checks],
                   "counts": counts(checks), "missing": [c.describe() for c in missing], "faults": faults})
    else:
        print_checks(user, features, checks, faults)
    return EXIT_FAILED if missing else EXIT_OK


def check(config: Config) -> tuple[str, list[str], list[Check], list[str]]:
    """Log in, pick the objects to ask about, ask vCenter: the user, the features, the checks and the faults
    vCenter answered instead of privileges."""
    from adapters.privileges import effective, placement

    with vcenter(config) as found:
        inventory = found.inventory
        proxies = config.job_proxies()
        selected = select_vms(inventory, config.job.select, {p.name for p in proxies})
        vms = [s.vm for s in selected if not s.skip]
        features = features_for(config, vms)
        reqs = requirements(features)
        targets: dict[str, Any] = dict(representatives(inventory, vms, [p.name for p in proxies if p.kind == "vm"]))
        sample = [vm for vm in vms if any(e.moref == vm.moref for e in targets["vm"])]
        targets |= placement(found.session, sample)
        answers = effective(found.session, wanted(reqs, targets))
        user = found.session.username
    return user, list(features), evaluate(reqs, targets, answers.granted), answers.faults


def print_requirements(features: list[str], reqs: list[Requirement]) -> None:
    out = console()
    out.print(line(styled("features", "bold"), ": ", ", ".join(features)), soft_wrap=True)
    table = Table("privilege", "on", "for", "why", title="Privileges the service account needs")
    for r in reqs:
        table.add_row(r.privilege, r.on, r.feature, r.why)
    out.print(table)
    out.print(line(f"{len(reqs)} privileges; on: ", "; ".join(f"{k}: {v}" for k, v in ON.items()
                                                                if any(r.on == k for r in reqs))), soft_wrap=True)


def print_checks(user: str, features: list[str], checks: list[Check], faults: list[str]) -> None:
    out = console()
    out.print(line(styled(user, "bold"), ": features ", ", ".join(features)), soft_wrap=True)
    table = Table("status", "privilege", "on", "object", "for", "why", title="Effective privileges")
    for c in checks:
        table.add_row(styled(c.status.upper() if c.status == "missing" else c.status, STATUS_STYLE[c.status]),
                      c.requirement.privilege, c.requirement.on,
                      c.entity.name if c.entity is not None else c.note, c.requirement.feature, c.requirement.why)
    out.print(table)
    for fault in faults:
        out.print(line(styled("not checked", STATUS_STYLE["not checked"]), ": ", fault), soft_wrap=True)
    n = counts(checks)
    missing = [c.describe() for c in checks if c.status == "missing"]
    verdict = styled("MISSING", STATUS_STYLE["missing"]) if missing else styled("ok", STATUS_STYLE["ok"])
    out.print(line(verdict, f": {n['ok']} ok, {n['missing']} missing, {n['not checked']} not checked",
                   *([": ", "; ".join(missing)] if missing else [])), soft_wrap=True)
