"""`SqliteLedger`: the embedded engine's ledger, shared by every process of this host through one SQLite file.

The nightly backup started by cron, a restore an admin starts by hand and a second backup job each run in their
own process; the per-proxy system-wide stream limit and the datastore threshold (DESIGN §4) hold across them
because each takes its streams here. Same interface and guarantees as `InMemoryLedger`; lease methods named as
`RedisLedger`'s (`renew_streams`, `holds`).

- Taking a stream is one atomic check-and-take: `BEGIN IMMEDIATE` makes one writer at a time across processes,
  and the counts are read and the stream written inside that transaction. The file is in WAL mode: readers never
  wait for the writer.
- Every stream carries its holder (`host:pid:token` by default) and a lease of `ttl` seconds, renewed every third
  of it by a keeper thread of the holder that runs while it holds streams. A stream whose lease ran out, or whose
  process on this host (same host name and PID namespace) is gone, is not counted, and the next writer removes
  it: a killed process never blocks a proxy for longer than it takes a reader to look (at most `RECHECK`).
- Every call is bounded: a file locked longer than `busy_seconds`, or one that cannot be opened, raises
  `LedgerUnavailable`, one line naming the file (a `JobFault`: the job ends with it as its reason).
- Reads are served from a snapshot of the file kept by the instance: its own writes update it in place, another
  connection's commit (`PRAGMA data_version`, looked at no more often than every `FRESH` seconds) makes it read
  again, and so do the first lease in it running out and `RECHECK` seconds passing (a holder may have died).
  The scheduler asks for counts thousands of times per pass; each is a dictionary look-up. What another process
  did is seen at most `FRESH` seconds late; `acquire` always decides on the file itself.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from vsphere_proxy.faults import JobFault
from vsphere_proxy.ledger import Stream

log = logging.getLogger(__name__)

FORMAT = 1  # PRAGMA user_version of the file
FRESH = 0.02  # seconds a snapshot is used before `PRAGMA data_version` is asked whether another process wrote
RECHECK = 1.0  # seconds after which a snapshot is read again anyway: the holders of its streams may have died

_SCHEMA = """
CREATE TABLE streams (id TEXT PRIMARY KEY, job TEXT NOT NULL, proxy TEXT NOT NULL, holder TEXT NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL);
CREATE INDEX streams_proxy ON streams (proxy);
CREATE INDEX streams_job ON streams (job);
CREATE INDEX streams_expires ON streams (expires);
CREATE TABLE stream_datastores (stream TEXT NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    datastore TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (stream, datastore));
CREATE INDEX stream_datastores_datastore ON stream_datastores (datastore);
"""


class LedgerUnavailable(JobFault):
    """The ledger file cannot be opened or stayed locked past its bound; the message names the file."""


def _host() -> str:
    """Where PIDs mean the same process: the host name and, on Linux, the PID namespace (containers)."""
    try:
        return f"{platform.node()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return platform.node()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@dataclass(frozen=True)
class _View:
    """The streams that count, as the file held them at `version` plus this instance's own writes since."""

    version: int  # PRAGMA data_version when read
    read: float  # monotonic: when it was read from the file
    until: float  # wall clock: when the first lease in it runs out
    streams: dict[str, Stream]
    expires: dict[str, float]
    proxy: Counter[str]
    datastore: Counter[str]
    job: Counter[str]

    @classmethod
    def of(cls, version: int, read: float, streams: dict[str, Stream], expires: dict[str, float]) -> _View:
        return cls(version, read, min(expires.values(), default=math.inf), streams, expires,
                   Counter(s.proxy for s in streams.values()),
                   Counter(ds for s in streams.values() for ds in s.datastores),
                   Counter(s.job for s in streams.values()))

    def plus(self, stream: Stream, expires: float) -> _View:
        return _View.of(self.version, self.read, {**self.streams, stream.id: stream},
                        {**self.expires, stream.id: expires})

    def minus(self, stream_id: str) -> _View:
        return _View.of(self.version, self.read, {k: v for k, v in self.streams.items() if k != stream_id},
                        {k: v for k, v in self.expires.items() if k != stream_id})

    def renewed(self, stream_ids: Collection[str], expires: float) -> _View:
        return _View.of(self.version, self.read, self.streams,
                        {k: expires if k in stream_ids else v for k, v in self.expires.items()})


class _Write:
    """One write transaction: what it did to this instance's snapshot (`change`) once it commits."""

    def __init__(self, db: sqlite3.Connection, in_step: bool) -> None:
        self.db = db
        self.in_step = in_step  # no other connection wrote since the snapshot, and nothing was purged
        self.change: Callable[[_View], _View] | None = None


class SqliteLedger:
    """The `Ledger` of every embedded job on this host that names the same file (created mode 0600 in a
    directory that exists). `holder` names this instance's streams (default `host:pid:token`)."""

    def __init__(self, path: Path | str, *, holder: str | None = None, ttl: float = 60.0,
                 busy_seconds: float = 15.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl: must be > 0 seconds (got {ttl})")
        self.path = Path(path)
        self.holder = holder or f"{platform.node()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.ttl = ttl
        self.busy_seconds = busy_seconds
        self.host = _host()
        self._lock = threading.Lock()  # the connection, and every change of the snapshot
        self._db: sqlite3.Connection | None = None
        self._db_pid = 0
        self._view: _View | None = None
        self._checked = 0.0  # monotonic: when the snapshot's version was last compared with the file's
        self._held = threading.Lock()  # the two below
        self._mine: set[str] = set()  # streams this instance took and still holds: the keeper renews them
        self._keeper: threading.Thread | None = None
        self._closed = threading.Event()
        # created 0600 before SQLite opens it (its -wal and -shm files take the same mode); an existing file is
        # never opened here: closing any descriptor of it would drop the POSIX locks this process holds on it
        try:
            if not self.path.exists():
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise LedgerUnavailable(f"ledger {self.path}: cannot create it ({e.strerror})") from None
        if self.path.is_dir() or not os.access(self.path, os.R_OK | os.W_OK):
            raise LedgerUnavailable(f"ledger {self.path}: not a file this user can read and write")
        with self._connection() as db:
            self._prepare(db)

    # -- the file ---------------------------------------------------------------------------------------------

    def _fault(self, e: sqlite3.Error) -> LedgerUnavailable:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        waited = f" (waited {self.busy_seconds:g} s)" if "locked" in text or "busy" in text else ""
        return LedgerUnavailable(f"ledger {self.path}: {text}{waited}")

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This instance's one connection, to one thread at a time, waited for at most `busy_seconds`."""
        if not self._lock.acquire(timeout=self.busy_seconds):
            raise LedgerUnavailable(f"ledger {self.path}: busy in this process for {self.busy_seconds:g} s")
        try:
            if self._db is None or self._db_pid != os.getpid():  # a forked child never uses its parent's
                try:
                    db = sqlite3.connect(self.path, timeout=self.busy_seconds, isolation_level=None,
                                         check_same_thread=False)
                    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.execute("PRAGMA foreign_keys=ON")
                except sqlite3.Error as e:
                    raise self._fault(e) from None
                if str(mode).lower() != "wal":
                    db.close()
                    raise LedgerUnavailable(f"ledger {self.path}: the file system does not allow WAL mode "
                                            f"(journal mode {mode}); put the ledger on a local disk")
                self._db, self._db_pid, self._view = db, os.getpid(), None
            yield self._db
        finally:
            self._lock.release()

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Create the tables in a new file; refuse a file of another format."""
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] == FORMAT:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:  # new (or a draft's: only leases of seconds live here, nothing to keep)
                    db.execute("DROP TABLE IF EXISTS stream_datastores")
                    db.execute("DROP TABLE IF EXISTS streams")
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {FORMAT}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._fault(e) from None
        if version not in (0, FORMAT):
            raise LedgerUnavailable(f"ledger {self.path}: format {version} is not known to this version "
                                    f"(it knows {FORMAT})")

    def _purge(self, db: sqlite3.Connection, now: float) -> int:
        """Remove the streams whose lease ran out, and those of this host's processes that are gone."""
        gone = db.execute("DELETE FROM streams WHERE expires <= ?", (now,)).rowcount
        for (pid,) in db.execute("SELECT DISTINCT pid FROM streams WHERE host = ? AND pid != ?",
                                 (self.host, os.getpid())).fetchall():
            if not _alive(pid):
                gone += db.execute("DELETE FROM streams WHERE host = ? AND pid = ?", (self.host, pid)).rowcount
        return gone

    @contextmanager
    def _write(self) -> Iterator[_Write]:
        """One write transaction, dead streams purged first; the snapshot follows it when nothing else moved."""
        with self._connection() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._fault(e) from None
            try:
                version = db.execute("PRAGMA data_version").fetchone()[0]
                purged = self._purge(db, time.time())
                w = _Write(db, self._view is not None and self._view.version == version and not purged)
                yield w
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:  # a COMMIT that failed (a full disk) may have rolled back already
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise self._fault(e) from None
                raise
            if w.in_step and self._view is not None:
                if w.change is not None:
                    self._view = w.change(self._view)
            elif w.change is not None or purged:
                self._view = None  # read again at the next count

    def _read(self) -> _View:
        """The snapshot, read again when another connection wrote, a lease in it ran out, or RECHECK passed."""
        view, now = self._view, time.monotonic()
        if view is not None and now - self._checked < FRESH and time.time() < view.until:
            return view
        with self._connection() as db:
            try:
                version = db.execute("PRAGMA data_version").fetchone()[0]
                view = self._view
                if view is not None and view.version == version and now - view.read < RECHECK \
                        and time.time() < view.until:
                    self._checked = now
                    return view
                db.execute("BEGIN")
                try:
                    rows = db.execute("SELECT id, job, proxy, host, pid, expires FROM streams").fetchall()
                    stores: dict[str, list[str]] = {}
                    for sid, ds in db.execute("SELECT stream, datastore FROM stream_datastores "
                                              "ORDER BY stream, position"):
                        stores.setdefault(sid, []).append(ds)
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._fault(e) from None
            wall, me, alive = time.time(), os.getpid(), dict[int, bool]()
            streams, expires = dict[str, Stream](), dict[str, float]()
            for sid, job, proxy, host, pid, until in rows:
                if until <= wall:
                    continue
                if host == self.host and pid != me:
                    if pid not in alive:
                        alive[pid] = _alive(pid)
                    if not alive[pid]:
                        continue
                streams[sid] = Stream(sid, job, proxy, tuple(stores.get(sid, ())))
                expires[sid] = until
            self._view = view = _View.of(version, now, streams, expires)
            self._checked = now
            return view

    # -- leases -----------------------------------------------------------------------------------------------

    def renew_streams(self, stream_ids: Collection[str]) -> set[str]:
        """Extend by the ttl the leases of these streams that this holder still holds; the ones renewed (the
        others are gone: released, or their lease ran out before this)."""
        ids = sorted(set(stream_ids))
        if not ids:
            return set()
        expires = time.time() + self.ttl
        renewed: set[str] = set()
        with self._write() as w:
            for sid in ids:
                if w.db.execute("UPDATE streams SET expires = ? WHERE id = ? AND holder = ?",
                                (expires, sid, self.holder)).rowcount:
                    renewed.add(sid)
            w.change = lambda v: v.renewed(renewed, expires)
        return renewed

    def renew(self) -> set[str]:
        """Renew every stream this instance holds (what its keeper does every third of the ttl); those held."""
        with self._held:
            mine = set(self._mine)
        held = self.renew_streams(mine)
        with self._held:
            lost = (mine - held) & self._mine
            self._mine -= lost
        if lost:
            log.warning("ledger %s: streams %s lost their lease before it was renewed", self.path,
                        ", ".join(sorted(lost)))
        return held

    def holds(self, stream_id: str) -> bool:
        """Whether the stream is taken and its lease alive."""
        return stream_id in self._read().streams

    def _keep(self) -> None:
        while not self._closed.wait(self.ttl / 3):
            with self._held:
                if not self._mine:
                    self._keeper = None
                    return
            try:
                self.renew()
            except LedgerUnavailable as e:  # tried again in a third of the ttl; the lease outlives two misses
                log.warning("renewing the streams' leases failed: %s", e)

    def close(self) -> None:
        """Stop renewing (the streams still held run out with their lease) and close the file."""
        self._closed.set()
        with self._lock:
            if self._db is not None and self._db_pid == os.getpid():
                self._db.close()
            self._db, self._view = None, None

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the Ledger protocol ----------------------------------------------------------------------------------

    def acquire(self, stream: Stream, proxy_limit: int, datastore_limit: int | None = None) -> bool:
        stream = replace(stream, datastores=tuple(dict.fromkeys(stream.datastores)))
        expires = time.time() + self.ttl
        with self._write() as w:
            db = w.db
            if db.execute("SELECT 1 FROM streams WHERE id = ?", (stream.id,)).fetchone():
                raise ValueError(f"stream {stream.id} is already active")
            if db.execute("SELECT COUNT(*) FROM streams WHERE proxy = ?", (stream.proxy,)).fetchone()[0] \
                    >= proxy_limit:
                return False
            if datastore_limit is not None and stream.datastores:
                busiest = db.execute(
                    f"SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM stream_datastores WHERE datastore IN "
                    f"({','.join('?' * len(stream.datastores))}) GROUP BY datastore)", stream.datastores).fetchone()[0]
                if busiest is not None and busiest >= datastore_limit:
                    return False
            db.execute("INSERT INTO streams VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (stream.id, stream.job, stream.proxy, self.holder, self.host, os.getpid(), expires))
            db.executemany("INSERT INTO stream_datastores VALUES (?, ?, ?)",
                           [(stream.id, ds, i) for i, ds in enumerate(stream.datastores)])
            w.change = lambda v: v.plus(stream, expires)
        with self._held:
            self._mine.add(stream.id)
            if self._keeper is None and not self._closed.is_set():
                self._keeper = threading.Thread(target=self._keep, name="ledger-leases", daemon=True)
                self._keeper.start()
        return True

    @staticmethod
    def _stream(db: sqlite3.Connection, stream_id: str) -> Stream | None:
        row = db.execute("SELECT id, job, proxy FROM streams WHERE id = ?", (stream_id,)).fetchone()
        if row is None:
            return None
        stores = tuple(r[0] for r in db.execute(
            "SELECT datastore FROM stream_datastores WHERE stream = ? ORDER BY position", (stream_id,)))
        return Stream(row[0], row[1], row[2], stores)

    def release(self, stream_id: str) -> Stream | None:
        """Give a stream back. One that cannot be written back (the file's disk is full, it stayed locked) is no
        longer renewed: its lease runs out within the ttl, as a dead holder's would, and the job ends normally."""
        with self._held:
            self._mine.discard(stream_id)
        try:
            with self._write() as w:
                stream = self._stream(w.db, stream_id)
                if stream is not None:
                    w.db.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
                    w.change = lambda v: v.minus(stream_id)
        except LedgerUnavailable as e:
            log.warning("%s: stream %s not given back; its lease runs out within %g s", e, stream_id, self.ttl)
            try:
                return self._read().streams.get(stream_id)  # reading still works on a full disk
            except LedgerUnavailable:
                return None
        return stream

    def narrow(self, stream_id: str, datastores: Collection[str]) -> Stream | None:
        keep = set(datastores)
        with self._write() as w:
            stream = self._stream(w.db, stream_id)
            if stream is None:
                return None
            w.db.executemany("DELETE FROM stream_datastores WHERE stream = ? AND datastore = ?",
                             [(stream_id, ds) for ds in stream.datastores if ds not in keep])
            narrowed = replace(stream, datastores=tuple(ds for ds in stream.datastores if ds in keep))
            w.change = lambda v: v.plus(narrowed, v.expires[stream_id]) if stream_id in v.streams else v
        return narrowed

    def proxy_active(self, proxy: str) -> int:
        return self._read().proxy[proxy]

    def datastore_active(self, datastore: str) -> int:
        return self._read().datastore[datastore]

    def job_active(self, job: str) -> int:
        return self._read().job[job]

    def streams(self) -> Sequence[Stream]:
        view = self._read()
        return tuple(view.streams[k] for k in sorted(view.streams))

    def releases(self) -> int:
        return int(self._read("SELECT value FROM counters WHERE name = 'releases'")[0][0])  # type: ignore[arg-type]
