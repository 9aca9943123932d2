"""The chunk store: `chunks/<2 hex>/<64 hex>`, one zstd frame per chunk, named by the SHA-256 of its content.

`put` deduplicates and writes atomically; `get` decompresses and checks the content against the name.
Both are safe to call from many threads at once, including for the same chunk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from .files import remove_quietly, scratch_name
from .format import ZSTD_LEVEL, RepositoryError, one_line

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of `ChunkStore.put`: the chunk id and the compressed bytes written (0 when deduplicated)."""

    chunk: str
    written: int

    @property
    def new(self) -> bool:
        return self.written > 0


class ChunkCorrupt(RepositoryError):
    """A chunk file exists but does not hold the content its name promises."""


class ChunkMissing(RepositoryError):
    """A referenced chunk file does not exist."""


class ChunkStore:
    def __init__(self, root: Path, scratch: Path) -> None:
        self.root = root
        self.scratch = scratch

    def path(self, chunk: str) -> Path:
        return self.root / chunk[:2] / chunk

    def put(self, data: bytes) -> Stored:
        """Store one block's bytes unless a chunk with the same content exists. Returns its id and the bytes written.

        The file is fully written and fsynced before it appears under its name; the caller fsyncs the chunk
        directory (`path(chunk).parent`) before publishing anything that references it.
        """
        chunk = hashlib.sha256(data).hexdigest()
        final = self.path(chunk)
        if final.exists():
            return Stored(chunk, 0)
        frame = _compressor().compress(data)
        tmp = scratch_name(self.scratch, "chunk-")
        try:
            with open(tmp, "xb") as f:
                f.write(frame)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # a concurrent writer of the same chunk renames identical content: harmless
        except BaseException:
            remove_quietly(tmp)
            raise
        return Stored(chunk, len(frame))

    def get(self, chunk: str, length: int) -> bytes:
        """The chunk's content, checked: `length` bytes whose SHA-256 is `chunk`."""
        try:
            frame = self.path(chunk).read_bytes()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk} is missing") from None
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(f"chunk {chunk} is corrupt: {one_line(exc)}") from None
        if size != length:
            held = "an unknown number of" if size < 0 else size
            raise ChunkCorrupt(f"chunk {chunk} is corrupt: frame holds {held} bytes, expected {length}")
        try:
            data = _decompressor().decompress(frame)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(f"chunk {chunk} is corrupt: {one_line(exc)}") from None
        if len(data) != length or hashlib.sha256(data).hexdigest() != chunk:
            raise ChunkCorrupt(f"chunk {chunk} is corrupt: content does not match its SHA-256")
        return data

    def walk(self) -> Iterator[tuple[str, Path]]:
        """Every chunk file present, as (chunk id, path); files that are not chunks are skipped."""
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            with os.scandir(shard) as entries:
                for entry in entries:
                    if len(entry.name) == 64 and entry.name.startswith(shard.name) and entry.is_file():
                        yield entry.name, Path(entry.path)
