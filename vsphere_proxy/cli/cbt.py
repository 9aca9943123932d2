"""`vsphere-proxy cbt enable|disable|reset --vm NAME...`: manage Changed Block Tracking on VMs.

`reset` turns CBT off, takes and removes a snapshot (which drops the tracking files), and turns it on again: the
next backup of the VM reads every block, and incrementals resume from there. Use it after a restore or when
vCenter reports that a changeId is no longer valid."""

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
    read_config,
    vcenter,
)

HELP = "enable, disable or reset Changed Block Tracking (CBT) on VMs"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("cbt", help=HELP, description=HELP)
    p.add_argument("action", choices=("enable", "disable", "reset", "status"))
    p.add_argument("--vm", action="append", required=True, help="a VM's name; repeat for several")
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_cbt)


def do_cbt(args: argparse.Namespace) -> int:
    from adapters.cbt import cbt_enabled, reset_cbt, set_cbt
    from adapters.errors import VSphereError

    config = read_config(args.config)
    results: list[dict[str, Any]] = []
    with vcenter(config) as found:
        by_name = {vm.name: vm for vm in found.inventory.vms}
        unknown = [n for n in args.vm if n not in by_name]
        if unknown:
            raise CommandError(f"--vm: no VM named {unknown[0]!r} in vCenter", EXIT_BAD_INPUT)
        for name in dict.fromkeys(args.vm):
            vm = by_name[name]
            if vm.template:
                raise CommandError(f"--vm: {name} is a template; CBT applies to VMs", EXIT_BAD_INPUT)
            try:
                before = cbt_enabled(found.session, vm.moref)
                if args.action == "enable":
                    set_cbt(found.session, vm.moref, True)
                elif args.action == "disable":
                    set_cbt(found.session, vm.moref, False)
                elif args.action == "reset":
                    reset_cbt(found.session, vm.moref)
                after = cbt_enabled(found.session, vm.moref)
            except VSphereError as e:
                raise CommandError(f"{name}: {e}", EXIT_FAILED) from None
            results.append({"vm": name, "before": before, "after": after, "action": args.action})
    if args.json:
        emit_json(results)
    else:
        out = console()
        for r in results:
            state = {True: "on", False: "off"}
            out.print(f"{r['vm']}: CBT {state[r['before']]} -> {state[r['after']]}"
                      + (" (tracking reset: the next backup reads every block)" if r["action"] == "reset" else ""))
    return EXIT_OK
