"""The `vsphere-proxy` command: one module per command, each parse → core → format."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vsphere_proxy.cli import (
    backup,
    cbt,
    copy,
    discover,
    forget,
    init,
    jobs,
    key,
    plan,
    privileges,
    protect,
    prune,
    report,
    restore,
    serve,
    simulate,
    verify,
    worker,
)
from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    CommandError,
)
from vsphere_proxy.repository import RepositoryLocked

COMMANDS = (discover, plan, backup, restore, verify, init, key, forget, prune, protect, copy, jobs, report, cbt,
            simulate, worker, serve, privileges)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"vsphere-proxy: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vsphere-proxy", description="Back up vSphere VMs through a fleet of backup proxies.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.build_parser(sub)
    return p


def _error(message: object) -> None:
    print(f"vsphere-proxy: error: {message}", file=sys.stderr)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured): nothing is left to flush
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (README.md, "Exit codes")."""
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away is seen here, not in the interpreter's exit
        return code
    except CommandError as e:
        _error(e)
        # a command that turned a lock conflict into its own failure still tells the hook "locked, try later"
        return EXIT_LOCKED if isinstance(e.__context__, RepositoryLocked) else e.code
    except RepositoryLocked as e:
        _error(e)
        return EXIT_LOCKED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("vsphere-proxy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
