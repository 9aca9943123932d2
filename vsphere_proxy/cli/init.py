"""`vsphere-proxy init`: create the configured repository, encrypted when `repository.encryption` is set (a
configured key file that does not exist yet is created, mode 0600). An existing repository is not touched."""

from __future__ import annotations

import argparse
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
)

HELP = "create the configured repository (encrypted with the key repository.encryption names)"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("init", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--encryption", action="store_true",
                   help="refuse to create a repository in clear: repository.encryption must be set")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=do_init)


def do_init(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    if config.repository is None:
        raise CommandError("repository: not configured; add `repository: {path: /absolute/dir}`", EXIT_BAD_INPUT)
    if args.encryption and config.repository.encryption is None:
        raise CommandError("--encryption: repository.encryption is not set (passphrase_env, passphrase_file or "
                           "key_file)", EXIT_BAD_INPUT)
    path = config.repository.path
    if (path / "config").exists():
        raise CommandError(f"repository.path: {path} is already a repository", EXIT_BAD_INPUT)
    repo = open_repository(config, create=True)
    data = {"path": str(repo.path), "id": repo.config.id, "version": repo.config.version,
            "encrypted": repo.encrypted, "key_slot": repo.slot or None}
    if args.json:
        emit_json(data)
    else:
        what = f"encrypted (aes-256-gcm), key slot {repo.slot}" if repo.encrypted else "in clear"
        console().print(line(f"created repository {repo.config.id} at ", str(repo.path), f": {what}"),
                        soft_wrap=True)
    return EXIT_OK
