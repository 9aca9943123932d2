"""`vsphere-proxy key add|list|remove`: the key slots of an encrypted repository. The repository is opened with
the configured key (`repository.encryption`); a new slot's passphrase comes from an environment variable or a file
readable by its owner only, never from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

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
from vsphere_proxy.jobs.repo_access import kdf_cost
from vsphere_proxy.repository import (
    KeyProblem,
    KeySlot,
    RepositoryError,
    Secret,
    new_key_file,
    passphrase_from_env,
    passphrase_from_file,
)

HELP = "add, list or remove the key slots of an encrypted repository"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("key", help=HELP, description=HELP)
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    add = actions.add_parser("add", help="add a key slot: a new passphrase or a new key file")
    add_config_argument(add)
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--new-passphrase-env", metavar="VAR", help="the new passphrase, from this variable")
    source.add_argument("--new-passphrase-file", metavar="FILE", type=Path,
                        help="the new passphrase: the first line of FILE (mode 0600 or stricter)")
    source.add_argument("--new-key-file", metavar="FILE", type=Path, help="create a new key file at FILE (0600)")
    add.add_argument("--label", default="", help="who holds this key (free text, kept in clear in the slot)")
    add.add_argument("--json", action="store_true", help="print the result as JSON")
    add.set_defaults(func=do_add)
    ls = actions.add_parser("list", help="list the key slots")
    add_config_argument(ls)
    ls.add_argument("--json", action="store_true", help="print the result as JSON")
    ls.set_defaults(func=do_list)
    rm = actions.add_parser("remove", help="remove a key slot (never the last, nor the one in use)")
    add_config_argument(rm)
    rm.add_argument("slot", help="the slot id (see `key list`)")
    rm.set_defaults(func=do_remove)


def _slot_json(slot: KeySlot, current: str) -> dict[str, Any]:
    kdf = slot.kdf
    cost = (f"argon2id m={kdf.memory_kib // 1024} MiB t={kdf.time_cost} p={kdf.parallelism}"
            if kdf.name == "argon2id" else kdf.name)
    return {"id": slot.id, "kind": slot.kind, "label": slot.label, "created": slot.created.isoformat(),
            "kdf": cost, "in_use": slot.id == current}


def do_add(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    try:
        if args.new_passphrase_env is not None:
            secret: Secret = passphrase_from_env(args.new_passphrase_env)
        elif args.new_passphrase_file is not None:
            secret = passphrase_from_file(args.new_passphrase_file)
        else:
            if not repo.encrypted:
                raise KeyProblem(f"{repo.path}: the repository is not encrypted; it has no keys")
            secret = new_key_file(args.new_key_file, repo.config.id)
        slot = repo.add_key(secret, args.label, kdf_cost(config.repository.encryption if config.repository
                                                         else None))
    except KeyProblem as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    except RepositoryError as e:
        raise repository_failure(e) from None
    if args.json:
        emit_json(_slot_json(slot, repo.slot))
    else:
        console().print(line(f"added key slot {slot.id} ({slot.kind})"), soft_wrap=True)
    return EXIT_OK


def do_list(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    if not repo.encrypted:
        raise CommandError(f"{repo.path}: the repository is not encrypted; it has no keys", EXIT_BAD_INPUT)
    rows = [_slot_json(s, repo.slot) for s in repo.key_slots()]
    if args.json:
        emit_json(rows)
        return EXIT_OK
    table = Table(title="Key slots")
    for column in ("slot", "kind", "label", "created (UTC)", "kdf", "in use"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["id"], r["kind"], r["label"], r["created"][:19], r["kdf"], "yes" if r["in_use"] else "")
    console().print(table)
    return EXIT_OK


def do_remove(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config)
    try:
        repo.remove_key(args.slot)
    except KeyProblem as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    except RepositoryError as e:
        raise repository_failure(e) from None
    console().print(line(f"removed key slot {args.slot}"), soft_wrap=True)
    return EXIT_OK
