"""How a repository names and stores what it holds (`docs/repository.md`, "Repository version 2"): `Clear` for
version 1 (SHA-256 chunk ids, files as they are), `Sealed` for version 2 (HMAC-SHA-256 chunk ids under the id key,
AES-256-GCM chunk files and sealed JSON records under the encryption key, each bound to its name).

A codec is stateless apart from its keys and safe to share between threads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .format import RepositoryError

CHUNK_ENVELOPE = 1  # the first byte of a sealed chunk file
NONCE_BYTES = 12
TAG_BYTES = 16
_CHUNK_AD = b"vsphere-proxy chunk\0"
_RECORD_AD = {"point": b"vsphere-proxy point\0", "hold": b"vsphere-proxy hold\0"}
_ENCRYPT_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography 45 and later


class Unauthentic(RepositoryError):
    """A sealed file whose tag does not verify: tampered with, truncated, or not the file its name promises."""


class Codec(Protocol):
    """What a repository's chunk store and records go through."""

    @property
    def encrypted(self) -> bool: ...

    @property
    def naming(self) -> str:
        """Equal for two codecs exactly when they give every block the same chunk id."""
        ...

    def chunk_id(self, data: bytes) -> str: ...

    def seal_chunk(self, chunk: str, frame: bytes) -> bytes:
        """A chunk file's bytes for the zstd `frame` of chunk `chunk`."""
        ...

    def open_chunk(self, chunk: str, raw: bytes) -> bytes:
        """The zstd frame in chunk file bytes `raw`; `Unauthentic` if they are not chunk `chunk`'s."""
        ...

    def seal_record(self, purpose: str, name: str, plain: bytes) -> bytes:
        """A record file's bytes (`purpose` "point" or "hold", `name` the point id) for its clear JSON."""
        ...

    def open_record(self, purpose: str, name: str, raw: bytes) -> bytes:
        """The clear JSON of a record file; `Unauthentic` if it is not that record's."""
        ...


class Clear:
    """Version 1: chunk ids are SHA-256, files hold their content as it is."""

    encrypted = False
    naming = "sha256"

    def chunk_id(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def seal_chunk(self, chunk: str, frame: bytes) -> bytes:
        return frame

    def open_chunk(self, chunk: str, raw: bytes) -> bytes:
        return raw

    def seal_record(self, purpose: str, name: str, plain: bytes) -> bytes:
        return plain

    def open_record(self, purpose: str, name: str, raw: bytes) -> bytes:
        return raw


class Sealed:
    """Version 2, under a repository's master key: `enc_key` (AES-256-GCM) and `id_key` (HMAC-SHA-256)."""

    encrypted = True

    def __init__(self, enc_key: bytes, id_key: bytes) -> None:
        if len(enc_key) != 32 or len(id_key) != 32:
            raise ValueError("the encryption and id keys are 32 bytes each")
        self._aead = AESGCM(enc_key)
        self._id_key = id_key
        # names the id key without revealing it: two repositories share chunk ids exactly when they share it
        self.naming = "hmac-sha256:" + hmac.digest(id_key, b"vsphere-proxy naming", "sha256").hex()[:32]

    def __repr__(self) -> str:
        return "Sealed(<keys hidden>)"

    def chunk_id(self, data: bytes) -> str:
        return hmac.digest(self._id_key, data, "sha256").hex()

    def seal_chunk(self, chunk: str, frame: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        ad = _CHUNK_AD + chunk.encode()
        if not _ENCRYPT_INTO:
            return bytes((CHUNK_ENVELOPE,)) + nonce + self._aead.encrypt(nonce, frame, ad)
        head = 1 + NONCE_BYTES
        sealed = bytearray(head + len(frame) + TAG_BYTES)  # encrypted in place: no copy of a 4 MiB frame
        sealed[0] = CHUNK_ENVELOPE
        sealed[1:head] = nonce
        self._aead.encrypt_into(nonce, frame, ad, memoryview(sealed)[head:])
        return sealed  # type: ignore[return-value]  # a bytearray: written to the file as it is

    def open_chunk(self, chunk: str, raw: bytes) -> bytes:
        if len(raw) < 1 + NONCE_BYTES + TAG_BYTES or raw[0] != CHUNK_ENVELOPE:
            raise Unauthentic("not a sealed chunk (bad envelope)")
        view = memoryview(raw)
        try:
            return self._aead.decrypt(view[1:1 + NONCE_BYTES], view[1 + NONCE_BYTES:], _CHUNK_AD + chunk.encode())
        except InvalidTag:
            raise Unauthentic("fails authentication") from None

    def seal_record(self, purpose: str, name: str, plain: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, _RECORD_AD[purpose] + name.encode())
        envelope = {"sealed": 1, "nonce": base64.b64encode(nonce).decode(), "data": base64.b64encode(sealed).decode()}
        return json.dumps(envelope).encode() + b"\n"

    def open_record(self, purpose: str, name: str, raw: bytes) -> bytes:
        try:
            envelope = json.loads(raw)
            if not isinstance(envelope, dict) or envelope.get("sealed") != 1:
                raise ValueError
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            sealed = base64.b64decode(envelope["data"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthentic("not a sealed record") from None
        if len(nonce) != NONCE_BYTES:
            raise Unauthentic("not a sealed record (bad nonce)")
        try:
            return self._aead.decrypt(nonce, sealed, _RECORD_AD[purpose] + name.encode())
        except InvalidTag:
            raise Unauthentic(f"{purpose if purpose == 'hold' else 'manifest'} fails authentication") from None


CLEAR = Clear()
