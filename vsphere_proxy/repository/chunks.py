"""The chunk store: `chunks/<2 hex>/<64 hex>`, one zstd frame per chunk, named by the SHA-256 of its content (in
an encrypted repository: sealed, and named by the keyed HMAC of its content; the store's `Codec` says which).

`put` deduplicates and writes atomically; `get` decompresses and checks the content against the name, and moves a
chunk that fails the check aside (`<id>.<n>.bad`, quarantined) so that it counts as absent and the next `put` of
the same bytes writes it again. All are safe to call from many threads at once, including for the same chunk.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from .crypto import CLEAR, Codec, Unauthentic
from .files import full_error, is_full, remove_quietly, scratch_name
from .format import ZSTD_LEVEL, RepositoryError, one_line

_BAD = re.compile(r"^([0-9a-f]{64})\.(\d+)\.bad$")

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
    """A chunk file exists but does not hold the content its name promises; `quarantined` is where it was moved
    (None if it could not be moved)."""

    def __init__(self, message: str, quarantined: Path | None = None) -> None:
        super().__init__(message)
        self.quarantined = quarantined


class ChunkUnreadable(RepositoryError):
    """A chunk file that cannot be read (an I/O error); it is left in place."""


class ChunkMissing(RepositoryError):
    """A referenced chunk file does not exist (never written, deleted, or quarantined)."""


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A quarantined chunk file: the chunk it was, where it lies, and whether the chunk has been written again."""

    chunk: str
    path: Path
    rewritten: bool


class ChunkStore:
    def __init__(self, root: Path, scratch: Path, repository: Path | None = None, codec: Codec = CLEAR) -> None:
        """`repository`: the directory named in `RepositoryFull` messages (default: `root`'s parent)."""
        self.root = root
        self.scratch = scratch
        self.repository = repository or root.parent
        self.codec = codec

    def chunk_id(self, data: bytes) -> str:
        """The id this store gives a block of `data`."""
        return self.codec.chunk_id(data)

    def path(self, chunk: str) -> Path:
        return self.root / chunk[:2] / chunk

    def present(self, chunk: str) -> bool:
        """True if the chunk's file exists (a quarantined copy does not count)."""
        return self.path(chunk).exists()

    def put(self, data: bytes) -> Stored:
        """Store one block's bytes unless a chunk with the same content exists. Returns its id and the bytes written.

        The file is fully written and fsynced before it appears under its name; the caller fsyncs the chunk
        directory (`path(chunk).parent`) before publishing anything that references it. A write that fails for
        want of space raises `RepositoryFull`.
        """
        chunk = self.codec.chunk_id(data)
        if self.path(chunk).exists():
            return Stored(chunk, 0)
        return self._write(chunk, self.codec.seal_chunk(chunk, _compressor().compress(data)))

    def put_file(self, chunk: str, raw: bytes) -> Stored:
        """Store a chunk file's bytes as they are (read from a store with the same codec), unless present."""
        if self.path(chunk).exists():
            return Stored(chunk, 0)
        return self._write(chunk, raw)

    def get_file(self, chunk: str) -> bytes:
        """A chunk file's bytes, unchecked (`ChunkMissing`, `ChunkUnreadable`)."""
        try:
            return self.path(chunk).read_bytes()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk} is missing{self._quarantine_note(chunk)}") from None
        except OSError as exc:
            raise ChunkUnreadable(f"chunk {chunk} is unreadable: {one_line(exc)}") from None

    def _write(self, chunk: str, frame: bytes) -> Stored:
        final = self.path(chunk)
        tmp = scratch_name(self.scratch, "chunk-")
        try:
            with open(tmp, "xb") as f:
                f.write(frame)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # a concurrent writer of the same chunk renames identical content: harmless
        except BaseException as exc:
            full = full_error(self.repository) if is_full(exc) else None  # counted before the scratch file goes
            remove_quietly(tmp)
            if full is not None:
                raise full from None
            raise
        return Stored(chunk, len(frame))

    def get(self, chunk: str, length: int) -> bytes:
        """The chunk's content, checked: `length` bytes whose SHA-256 is `chunk`. A chunk that fails the check is
        quarantined before `ChunkCorrupt` is raised."""
        return self._read(chunk, length)[2]

    def get_checked_file(self, chunk: str, length: int) -> bytes:
        """The chunk file's bytes, after checking them as `get` does (for a copy into a store of the same codec)."""
        return self._read(chunk, length)[0]

    def get_frame(self, chunk: str, length: int) -> tuple[bytes, bytes]:
        """The chunk's zstd frame (opened, when sealed) and its content, checked as `get` does (for a copy into a
        store of another codec: the frame need not be compressed again)."""
        _, frame, data = self._read(chunk, length)
        return frame, data

    def put_frame(self, chunk: str, frame: bytes) -> Stored:
        """Store the zstd `frame` of chunk `chunk` (its id in this store, computed by the caller from the frame's
        checked content), sealed as this store's codec seals, unless present."""
        if self.path(chunk).exists():
            return Stored(chunk, 0)
        return self._write(chunk, self.codec.seal_chunk(chunk, frame))

    def _read(self, chunk: str, length: int) -> tuple[bytes, bytes, bytes]:
        path = self.path(chunk)
        try:
            with open(path, "rb") as f:
                seen = os.fstat(f.fileno())
                frame = f.read()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {chunk} is missing{self._quarantine_note(chunk)}") from None
        except OSError as exc:  # an I/O error says nothing of the content: the file stays where it is
            raise ChunkUnreadable(f"chunk {chunk} is unreadable: {one_line(exc)}") from None
        problem = _check(self.codec, frame, chunk, length)
        if isinstance(problem, tuple):
            return frame, *problem
        moved: Path | None = None
        try:
            moved = self.quarantine(chunk, seen)
            where = f"; quarantined as {moved.relative_to(self.repository)}" if moved else ""
        except OSError as exc:
            where = f"; could not quarantine it: {one_line(exc)}"
        raise ChunkCorrupt(f"chunk {chunk} is corrupt: {problem}{where}", moved)

    def quarantine(self, chunk: str, seen: os.stat_result | None = None) -> Path | None:
        """Move the chunk's file aside to `<id>.<n>.bad` (the first free `n`), so it counts as absent. With `seen`
        (the stat of the file found corrupt), a file that is no longer that one — written again meanwhile — stays.
        Returns the new path, or None if nothing was moved. OSError if the rename fails."""
        path = self.path(chunk)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return None  # quarantined meanwhile by another reader
        if seen is not None and _identity(now) != _identity(seen):
            return None
        n = 0
        while (bad := path.with_name(f"{chunk}.{n}.bad")).exists():
            n += 1
        try:
            os.rename(path, bad)
        except FileNotFoundError:
            return None  # quarantined meanwhile by another reader
        return bad

    def quarantined(self) -> list[Quarantined]:
        """Every quarantined chunk file, sorted by path."""
        found = []
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            with os.scandir(shard) as entries:
                bad = [(m.group(1), Path(e.path)) for e in entries if (m := _BAD.match(e.name))]
            found += [Quarantined(chunk, path, self.present(chunk)) for chunk, path in bad]
        return sorted(found, key=lambda q: q.path)

    def _quarantine_note(self, chunk: str) -> str:
        try:
            copies = sorted((int(m.group(2)), p) for p in self.path(chunk).parent.glob(f"{chunk}.*.bad")
                            if (m := _BAD.match(p.name)))
        except OSError:
            return ""
        return f" (quarantined as {copies[-1][1].relative_to(self.repository)})" if copies else ""

    def walk(self) -> Iterator[tuple[str, Path]]:
        """Every chunk file present, as (chunk id, path); files that are not chunks (quarantined ones included)
        are skipped."""
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            with os.scandir(shard) as entries:
                for entry in entries:
                    if len(entry.name) == 64 and entry.name.startswith(shard.name) and entry.is_file():
                        yield entry.name, Path(entry.path)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """What tells one file from another put under the same name, even on a reused inode."""
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _check(codec: Codec, raw: bytes, chunk: str, length: int) -> tuple[bytes, bytes] | str:
    """The chunk file's frame and content if it is `length` bytes hashing to `chunk`, else what is wrong with it."""
    try:
        frame = codec.open_chunk(chunk, raw)
    except Unauthentic as exc:
        return str(exc)
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        return one_line(exc)
    if size != length:
        held = "an unknown number of" if size < 0 else size
        return f"frame holds {held} bytes, expected {length}"
    try:
        data = _decompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        return one_line(exc)
    if len(data) != length or codec.chunk_id(data) != chunk:
        return f"content does not match its {'HMAC-SHA-256' if codec.encrypted else 'SHA-256'}"
    return frame, data
