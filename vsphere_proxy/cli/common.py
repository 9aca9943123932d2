"""What every command shares: exit codes, configuration loading, the vCenter session, errors and output.

Every string a command prints may come from vCenter, the configuration or the repository (a VM named
`web [prod] 06` or `[bold]x[/bold]`), so the console never reads markup or emoji codes: text is printed as it is,
and styles are given with `styled` (a `rich.text.Text`), never written inside strings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from vsphere_proxy.catalog import Catalog, CatalogError
from vsphere_proxy.config import Config, ConfigError, EncryptionConfig, load_config
from vsphere_proxy.jobs import repo_access
from vsphere_proxy.jobs.errors import BadJob, JobError
from vsphere_proxy.model import Inventory
from vsphere_proxy.repository import KeyProblem, Repository, RepositoryError, RepositoryLocked

# The exit codes, as README.md's "Exit codes" table documents them for hooks.
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # the config, an argument or a name given is wrong: nothing was done
EXIT_PARTIAL = 3  # the job ended, some VMs are not backed up (each reported with its reason)
EXIT_FAILED = 4  # the command failed (vCenter unreachable, the repository damaged, no VM backed up)
EXIT_LOCKED = 5  # another process holds a conflicting repository lock: nothing was done; try again later
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE), e.g. `--json | head -1`
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)

DEFAULT_CONFIG = "vsphere-proxy.yaml"


class CommandError(Exception):
    """A failure already phrased for the user, with the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def repository_failure(e: RepositoryError) -> CommandError:
    """A repository error as the command's failure: EXIT_LOCKED when another process holds the repository."""
    return CommandError(str(e), EXIT_LOCKED if isinstance(e, RepositoryLocked) else EXIT_FAILED)


def job_failure(e: JobError) -> CommandError:
    """A job's error as the command's failure: EXIT_BAD_INPUT when nothing was done because of what was asked."""
    return CommandError(str(e), EXIT_BAD_INPUT if isinstance(e, BadJob) else EXIT_FAILED)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"configuration file (default: $VSPHERE_PROXY_CONFIG or ./{DEFAULT_CONFIG})")


def config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("VSPHERE_PROXY_CONFIG") or DEFAULT_CONFIG)


def read_config(arg: str | None) -> Config:
    try:
        return load_config(config_path(arg))
    except ConfigError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None


def open_repository(config: Config, *, create: bool = False) -> Repository:
    if config.repository is None:
        raise CommandError("repository: not configured; add `repository: {path: /absolute/dir}`", EXIT_BAD_INPUT)
    return open_repository_at(config.repository.path, config.repository.encryption, create=create)


def open_repository_at(path: Path, encryption: EncryptionConfig | None, *, create: bool = False,
                       where: str = "repository") -> Repository:
    """The repository at `path` (created if asked), with the key `encryption` names; its problems as the command's
    failure: bad input naming `where` (the configuration's section), exit 5 while it is locked."""
    try:
        return repo_access.open_repository(path, encryption, create=create, where=where)
    except RepositoryLocked as e:
        raise repository_failure(e) from None
    except KeyProblem as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    except RepositoryError as e:
        raise CommandError(f"{where}.path: {e}", EXIT_BAD_INPUT) from None


def open_catalog(config: Config) -> Catalog:
    if config.repository is None:
        raise CommandError("repository: not configured; the catalog lives beside it", EXIT_BAD_INPUT)
    try:
        return Catalog.open(config.repository.catalog_target())
    except CatalogError as e:
        raise CommandError(f"repository.catalog: {e}", EXIT_BAD_INPUT) from None


@dataclass
class Discovered:
    config: Config
    inventory: Inventory
    backend: Any = None  # adapters.backend.VSphereBackend: the job's VCenterBackend, open until the block ends

    @property
    def session(self) -> Any:
        """The logged-in adapters.session.Session."""
        return self.backend.session


@contextmanager
def vcenter(config: Config, *, tags: bool = True) -> Iterator[Discovered]:
    """Log in, read the inventory (with tags unless told not to), yield, log out; vCenter errors become
    CommandErrors."""
    from adapters.backend import VSphereBackend
    from adapters.errors import AuthError, ConnectError, VSphereError
    from adapters.session import connect

    vc = config.vcenter
    try:
        user, password = vc.credentials.resolve()
    except ConfigError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    try:
        # every call bounded: vc.timeout to connect and per read, vc.retries attempts (the login: connect_retries)
        session = connect(vc.url, user, password.get_secret_value(), insecure=vc.insecure, ca_file=vc.ca_file,
                          retries=vc.connect_retries, timeout=vc.timeout, attempts=vc.retries)
    except AuthError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    except (ConnectError, VSphereError) as e:
        raise CommandError(str(e), EXIT_FAILED) from None
    try:
        backend = VSphereBackend(session, config.proxies)
        yield Discovered(config, backend.discover(tags=tags), backend)
    except (AuthError, ConnectError, VSphereError) as e:
        raise CommandError(str(e), EXIT_FAILED) from None
    finally:
        session.close()


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of stdout went away: let `main` end quietly (rich itself would exit 1)."""
        self.quiet = True
        raise BrokenPipeError


def console() -> Console:
    """Rich output that prints every string literally (no markup, no emoji codes, no highlighting); when not on a
    terminal (a pipe, a log file) lines may be long rather than truncated."""
    out = _Console(markup=False, emoji=False, highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out.width = 160
    return out


def styled(text: object, style: str = "") -> Text:
    """`text` as it is, in `style` (e.g. "bold", "red"): how a command colours a word or a value."""
    return Text(str(text), style=style)


def line(*parts: str | Text) -> Text:
    """One line from literal strings and `styled` pieces: `line(styled(name, "bold"), ": ", summary)`."""
    return Text.assemble(*parts)


def print_job_end(status: str, data: dict[str, Any], lists: Sequence[tuple[str | Text, Sequence[str]]],
                  moved: str) -> None:
    """A job report's last lines: each non-empty list (what was swept, left behind, the job's errors), then the
    status with the VMs' counts, the modes, the rounds and what was `moved`."""
    out = console()
    for what, items in lists:
        if items:
            out.print(line(what, f": {', '.join(items)}"), soft_wrap=True)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data["counts"].items()))
    modes = ", ".join(f"{n} {m}" for m, n in data["modes"].items()) or "none"
    out.print(line(styled(status, "bold"), f": {counts}; by mode: {modes}; rounds {data['rounds']}; {moved}"),
              soft_wrap=True)
