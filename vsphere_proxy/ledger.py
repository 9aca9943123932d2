"""The ledger: active data streams per proxy and per datastore, shared by every running job (DESIGN §4).

`Ledger` is the interface the scheduler uses; `InMemoryLedger` serves the embedded engine (one process,
many jobs, many threads). A distributed ledger (Redis, with leases) implements the same interface.
Acquire is atomic: a proxy never holds more streams than the limit passed in, whoever asks at once.
Release is idempotent.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Stream:
    """One active data stream: who holds it, where it reads from."""

    id: str  # unique across jobs, e.g. "job-7/db-01/disk-0"
    job: str
    proxy: str
    datastores: tuple[str, ...]


class Ledger(Protocol):
    def acquire(self, stream: Stream, proxy_limit: int, datastore_limit: int | None = None) -> bool:
        """Take a stream on `stream.proxy` if it holds fewer than `proxy_limit` (and, when given, every datastore
        of the stream has fewer than `datastore_limit`); False otherwise. Check and take are one atomic step."""

    def release(self, stream_id: str) -> Stream | None:
        """Give a stream back; releasing an unknown or already released stream is a no-op (None)."""

    def narrow(self, stream_id: str, datastores: Collection[str]) -> Stream | None:
        """Stop counting a stream on datastores it will no longer read (keeps the intersection; never adds)."""

    def proxy_active(self, proxy: str) -> int: ...

    def datastore_active(self, datastore: str) -> int: ...

    def job_active(self, job: str) -> int: ...

    def streams(self) -> Sequence[Stream]: ...


class InMemoryLedger:
    """A thread-safe in-process ledger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._proxy: Counter[str] = Counter()
        self._datastore: Counter[str] = Counter()
        self._job: Counter[str] = Counter()

    def acquire(self, stream: Stream, proxy_limit: int, datastore_limit: int | None = None) -> bool:
        with self._lock:
            if stream.id in self._streams:
                raise ValueError(f"stream {stream.id} is already active")
            if self._proxy[stream.proxy] >= proxy_limit:
                return False
            if datastore_limit is not None and any(self._datastore[ds] >= datastore_limit for ds in stream.datastores):
                return False
            self._streams[stream.id] = stream
            self._proxy[stream.proxy] += 1
            self._job[stream.job] += 1
            for ds in set(stream.datastores):
                self._datastore[ds] += 1
            return True

    def release(self, stream_id: str) -> Stream | None:
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            if stream is None:
                return None
            self._proxy[stream.proxy] -= 1
            self._job[stream.job] -= 1
            for ds in set(stream.datastores):
                self._datastore[ds] -= 1
            return stream

    def narrow(self, stream_id: str, datastores: Collection[str]) -> Stream | None:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return None
            keep = tuple(ds for ds in dict.fromkeys(stream.datastores) if ds in datastores)
            for ds in set(stream.datastores) - set(keep):
                self._datastore[ds] -= 1
            stream = self._streams[stream_id] = replace(stream, datastores=keep)
            return stream

    def proxy_active(self, proxy: str) -> int:
        with self._lock:
            return self._proxy[proxy]

    def datastore_active(self, datastore: str) -> int:
        with self._lock:
            return self._datastore[datastore]

    def job_active(self, job: str) -> int:
        with self._lock:
            return self._job[job]

    def streams(self) -> Sequence[Stream]:
        with self._lock:
            return tuple(self._streams.values())
