"""Opening the repositories a configuration names, with their keys: where an encrypted repository's passphrase or
key file comes from (`repository.encryption`), and creating a repository (encrypted when configured so)."""

from __future__ import annotations

import secrets
from pathlib import Path

from vsphere_proxy.config import EncryptionConfig
from vsphere_proxy.repository import (
    KdfCost,
    KeyProblem,
    Repository,
    Secret,
    WrongKey,
    new_key_file,
    passphrase_from_env,
    passphrase_from_file,
    read_key_file,
)


def secret_for(enc: EncryptionConfig, where: str = "repository.encryption") -> Secret:
    """The secret `enc` points at; `KeyProblem` naming the field when it cannot be had (never the value)."""
    try:
        if enc.passphrase_env is not None:
            return passphrase_from_env(enc.passphrase_env)
        if enc.passphrase_file is not None:
            return passphrase_from_file(enc.passphrase_file)
        assert enc.key_file is not None
        return read_key_file(enc.key_file)
    except KeyProblem as exc:
        raise KeyProblem(f"{where}: {exc}") from None


def kdf_cost(enc: EncryptionConfig | None) -> KdfCost:
    if enc is None:
        return KdfCost()
    return KdfCost(time_cost=enc.kdf_time_cost, memory_kib=enc.kdf_memory_mib * 1024)


def open_repository(path: Path, enc: EncryptionConfig | None, *, create: bool = False,
                    where: str = "repository") -> Repository:
    """Open the repository at `path` (with its key when `enc` is set); with `create`, create it if absent,
    encrypted when `enc` is set (a configured key file that does not exist yet is created for it).

    A repository that is encrypted while `enc` is not set, or clear while it is, is refused: the configuration
    says what the operator expects, and a silent clear repository where encryption was asked is a leak."""
    if enc is not None and create and not (path / "config").exists() and enc.key_file is not None \
            and not enc.key_file.exists():
        repo_id = secrets.token_hex(16)
        try:
            secret = new_key_file(enc.key_file, repo_id)
        except KeyProblem as exc:
            raise KeyProblem(f"{where}.encryption.key_file: {exc}") from None
        repo = Repository.init(path, secret, label=enc.label, cost=kdf_cost(enc), repo_id=repo_id)
    elif enc is not None:
        secret = secret_for(enc, f"{where}.encryption")
        try:
            if create:
                repo = Repository.init(path, secret, label=enc.label, cost=kdf_cost(enc))
            else:
                repo = Repository.open(path, secret)
        except WrongKey as exc:
            raise WrongKey(f"{where}.encryption: {exc}") from None
    else:
        repo = Repository.init(path) if create else Repository.open(path)
    if enc is not None and not repo.encrypted:
        raise KeyProblem(f"{where}.encryption: is set, but the repository {path} is not encrypted (a clear "
                         "repository cannot be encrypted in place: copy it into a new encrypted one)")
    if enc is None and repo.encrypted:
        raise KeyProblem(f"{where}: {path} is encrypted: set {where}.encryption (passphrase_env, passphrase_file "
                         "or key_file)")
    return repo


