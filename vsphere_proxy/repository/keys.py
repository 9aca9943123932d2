"""The master key of an encrypted repository and the key slots that wrap it (`docs/repository.md`, "Repository
version 2"): a passphrase slot derives its wrapping key with argon2id, a key-file slot with HKDF-SHA-256.

Secrets are held in `Secret` objects whose repr names only their kind; nothing here logs, prints or raises a
secret's value.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from .crypto import Sealed
from .format import RepositoryError, _Record, one_line

MASTER_KEY_BYTES = 64
SLOT_ID = r"^[0-9a-f]{16}$"
KEY_FILE_KIND = "vsphere-proxy key file"
MIN_PASSPHRASE = 8
_SLOT_AD = b"vsphere-proxy key slot\0"
_HKDF_INFO = b"vsphere-proxy key slot"
_CHECK = b"vsphere-proxy key check\0"

SlotKind = Literal["passphrase", "keyfile"]


class KeyProblem(RepositoryError):
    """A key problem the operator fixes: a missing, wrong or unusable passphrase or key file (exit 2)."""


class WrongKey(KeyProblem):
    """No key slot opens with the secret given."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A passphrase (its UTF-8 bytes) or a key file's 32 secret bytes, with where it came from (for messages)."""

    kind: SlotKind
    value: bytes = field(repr=False)
    source: str = ""  # "environment variable X", "file /etc/...": never the value
    repository: str = ""  # a key file's repository id

    def __post_init__(self) -> None:
        if self.kind == "passphrase" and len(self.value.decode(errors="replace")) < MIN_PASSPHRASE:
            raise KeyProblem(f"{self.source or 'passphrase'}: the passphrase must be at least {MIN_PASSPHRASE} "
                            "characters")
        if self.kind == "keyfile" and len(self.value) != 32:
            raise KeyProblem(f"{self.source or 'key file'}: not a key file (its key is not 32 bytes)")


@dataclass(frozen=True, slots=True)
class MasterKey:
    material: bytes = field(repr=False)

    @classmethod
    def new(cls) -> MasterKey:
        return cls(os.urandom(MASTER_KEY_BYTES))

    def codec(self) -> Sealed:
        return Sealed(self.material[:32], self.material[32:])

    def check(self, repository: str) -> str:
        """`config.encryption.key_check`: names this master key (and no other) for `repository`, revealing
        nothing of it."""
        return hmac.digest(self.material[32:], _CHECK + repository.encode(), "sha256").hex()[:32]


class Kdf(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["argon2id", "hkdf-sha256"]
    salt: str  # base64 of 16 bytes
    time_cost: int | None = Field(default=None, ge=1, le=100)
    memory_kib: int | None = Field(default=None, ge=8192, le=4 << 20)
    parallelism: int | None = Field(default=None, ge=1, le=64)


class KeySlot(_Record):
    """One `keys/<slot>.json` record."""

    versions: ClassVar[tuple[int, ...]] = (1,)

    version: Literal[1] = 1
    id: Annotated[str, StringConstraints(pattern=SLOT_ID)]
    kind: SlotKind
    label: Annotated[str, StringConstraints(max_length=200)] = ""
    created: AwareDatetime
    kdf: Kdf
    nonce: str
    wrapped: str

    @field_validator("label")
    @classmethod
    def _printable(cls, v: str) -> str:
        if any(ord(c) < 32 for c in v):
            raise ValueError("must not hold control characters")
        return v


@dataclass(frozen=True, slots=True)
class KdfCost:
    """argon2id's costs for new passphrase slots (RFC 9106's second recommended option by default)."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


DEFAULT_COST = KdfCost()


def make_slot(repository: str, master: MasterKey, secret: Secret, label: str = "",
              cost: KdfCost = DEFAULT_COST) -> KeySlot:
    """A new slot wrapping `master` under `secret`."""
    slot_id = secrets.token_hex(8)
    salt = os.urandom(16)
    if secret.kind == "passphrase":
        kdf = Kdf(name="argon2id", salt=_b64(salt), time_cost=cost.time_cost, memory_kib=cost.memory_kib,
                  parallelism=cost.parallelism)
    else:
        kdf = Kdf(name="hkdf-sha256", salt=_b64(salt))
    nonce = os.urandom(12)
    wrapped = AESGCM(_wrapping_key(kdf, secret)).encrypt(nonce, master.material,
                                                         _slot_ad(repository, slot_id, secret.kind))
    return KeySlot(id=slot_id, kind=secret.kind, label=label, created=datetime.now(UTC), kdf=kdf,
                   nonce=_b64(nonce), wrapped=_b64(wrapped))


def open_slot(repository: str, slot: KeySlot, secret: Secret) -> MasterKey | None:
    """The master key `slot` wraps, if `secret` is the slot's; None otherwise."""
    if slot.kind != secret.kind:
        return None
    try:
        key = _wrapping_key(slot.kdf, secret)
        material = AESGCM(key).decrypt(base64.b64decode(slot.nonce), base64.b64decode(slot.wrapped),
                                       _slot_ad(repository, slot.id, slot.kind))
    except (InvalidTag, ValueError):
        return None
    return MasterKey(material) if len(material) == MASTER_KEY_BYTES else None


def unlock(repository: str, slots: list[KeySlot], secret: Secret, key_check: str) -> tuple[MasterKey, str]:
    """The master key and the id of the first slot `secret` opens to the repository's master key (`key_check`; a
    slot an interrupted `init` left wraps another); `WrongKey` when none does."""
    if secret.kind == "keyfile" and secret.repository and secret.repository != repository:
        raise WrongKey(f"{secret.source or 'key file'}: belongs to repository {secret.repository}, not {repository}")
    for slot in slots:
        master = open_slot(repository, slot, secret)
        if master is not None and hmac.compare_digest(master.check(repository), key_check):
            return master, slot.id
    what = "passphrase" if secret.kind == "passphrase" else "key file"
    where = f" ({secret.source})" if secret.source else ""
    raise WrongKey(f"wrong {what}{where}: no key slot of the repository opens with it")


def _wrapping_key(kdf: Kdf, secret: Secret) -> bytes:
    salt = base64.b64decode(kdf.salt)
    if kdf.name == "argon2id":
        if secret.kind != "passphrase" or kdf.time_cost is None or kdf.memory_kib is None or kdf.parallelism is None:
            raise ValueError("an argon2id slot needs a passphrase and its costs")
        return hash_secret_raw(secret.value, salt, time_cost=kdf.time_cost, memory_cost=kdf.memory_kib,
                               parallelism=kdf.parallelism, hash_len=32, type=Type.ID)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO).derive(secret.value)


def _slot_ad(repository: str, slot_id: str, kind: str) -> bytes:
    return _SLOT_AD + repository.encode() + b"\0" + slot_id.encode() + b"\0" + kind.encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- where secrets come from ----------------------------------------------------------------------------------------

def passphrase_from_env(name: str, environ: dict[str, str] | None = None) -> Secret:
    value = (os.environ if environ is None else environ).get(name, "")
    if not value:
        raise KeyProblem(f"environment variable {name} (the repository passphrase) is not set")
    return Secret("passphrase", value.encode(), f"environment variable {name}")


def passphrase_from_file(path: Path) -> Secret:
    """The first line of `path`, which must be a regular file readable by its owner only."""
    first = _private_file(path, "passphrase file").split(b"\n", 1)[0].removesuffix(b"\r")
    if not first:
        raise KeyProblem(f"passphrase file {path}: is empty")
    return Secret("passphrase", first, f"passphrase file {path}")


def read_key_file(path: Path) -> Secret:
    raw = _private_file(path, "key file")
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or record.get("kind") != KEY_FILE_KIND:
            raise ValueError
        key = base64.b64decode(str(record["key"]), validate=True)
        repository = str(record.get("repository", ""))
    except (ValueError, KeyError):
        raise KeyProblem(f"key file {path}: not a vsphere-proxy key file") from None
    return Secret("keyfile", key, f"key file {path}", repository)


def new_key_file(path: Path, repository: str) -> Secret:
    """Create a key file for `repository` at `path` (mode 0600; refused if `path` exists)."""
    key = os.urandom(32)
    record = {"kind": KEY_FILE_KIND, "repository": repository, "key": _b64(key)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyProblem(f"key file {path}: exists already; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyProblem(f"key file {path}: cannot create it: {one_line(exc)}") from None
    with open(fd, "w") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return Secret("keyfile", key, f"key file {path}", repository)


def _private_file(path: Path, what: str) -> bytes:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise KeyProblem(f"{what} {path}: not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyProblem(f"{what} {path}: readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                            "chmod 600 it")
        if st.st_uid != os.geteuid():
            raise KeyProblem(f"{what} {path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        return path.read_bytes()
    except OSError as exc:
        raise KeyProblem(f"{what} {path}: cannot read it ({exc.strerror or one_line(exc)})") from None
