"""The `vsphere-proxy` command: one module per command, each parse → core → format."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vsphere_proxy.cli import backup, cbt, discover, jobs, plan, report, restore, serve, simulate, verify, worker
from vsphere_proxy.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, CommandError

COMMANDS = (discover, plan, backup, restore, verify, jobs, report, cbt, simulate, worker, serve)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"vsphere-proxy: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vsphere-proxy", description="Back up vSphere VMs through a fleet of backup proxies.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.build_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CommandError as e:
        print(f"vsphere-proxy: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("vsphere-proxy: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
