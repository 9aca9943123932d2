"""`SqliteLedger`: the embedded engine's ledger, shared by every process of this host through one SQLite file.

The nightly backup started by cron, a restore an admin starts by hand and a second backup job each run in their
own process; the per-proxy system-wide stream limit and the datastore threshold (DESIGN §4) hold across them
because each takes its streams here. Taking a stream is one atomic check-and-take (`BEGIN IMMEDIATE`: one writer
at a time across processes). Every stream carries its holder (host, pid) and a lease the holder renews from a
background thread; a stream whose lease ran out, or whose holder on this host is no longer running, does not
count and is removed by the next writer, so a killed process never blocks a proxy. Every call is bounded: a
database locked longer than `busy_seconds` raises `LedgerUnavailable`, which ends the job with the reason.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from vsphere_proxy.faults import JobFault
from vsphere_proxy.ledger import Stream

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (id TEXT PRIMARY KEY, job TEXT NOT NULL, proxy TEXT NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS streams_proxy ON streams (proxy);
CREATE INDEX IF NOT EXISTS streams_job ON streams (job);
CREATE TABLE IF NOT EXISTS stream_datastores (stream TEXT NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    datastore TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (stream, datastore));
CREATE INDEX IF NOT EXISTS stream_datastores_datastore ON stream_datastores (datastore);
"""
_LIVE = "expires > ?"


class LedgerUnavailable(JobFault):
    """The ledger file cannot be opened or stayed locked past its bound; the message names the file."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class SqliteLedger:
    """The `Ledger` of every embedded job on this host that names the same file."""

    def __init__(self, path: Path | str, *, ttl: float = 60.0, busy_seconds: float = 15.0) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self.busy_seconds = busy_seconds
        self.host = platform.node()
        self.pid = os.getpid()
        self._local = threading.local()
        self._mine: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        # created 0600 before SQLite opens it; an existing file is never opened here: closing any descriptor
        # of it would drop the POSIX locks this process's connections hold on it
        try:
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise LedgerUnavailable(f"ledger {self.path}: cannot create ({e.strerror})") from None
        try:
            self._db().executescript(_SCHEMA)
        except sqlite3.OperationalError as e:
            raise LedgerUnavailable(f"ledger {self.path}: {e} (waited {busy_seconds:g} s)") from None

    # -- connections ----------------------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=self.busy_seconds, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as e:
                raise LedgerUnavailable(f"ledger {self.path}: {e}") from None
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, ledger: SqliteLedger) -> None:
            self.ledger = ledger

        def __enter__(self) -> sqlite3.Connection:
            db = self.ledger._db()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise LedgerUnavailable(f"ledger {self.ledger.path}: {e} (waited {self.ledger.busy_seconds:g} s)"
                                        ) from None
            return db

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            db = self.ledger._db()
            if exc_type is None:
                db.execute("COMMIT")
            else:
                db.execute("ROLLBACK")

    def _write(self) -> SqliteLedger._Tx:
        return SqliteLedger._Tx(self)

    def _read(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        try:
            return self._db().execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:
            raise LedgerUnavailable(f"ledger {self.path}: {e}") from None

    # -- leases ---------------------------------------------------------------------------------------------------

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        """Remove streams whose lease ran out, and those of this host's holders that are no longer running."""
        db.execute("DELETE FROM streams WHERE expires <= ?", (now,))
        for (pid,) in db.execute("SELECT DISTINCT pid FROM streams WHERE host = ? AND pid != ?",
                                 (self.host, self.pid)).fetchall():
            if not _alive(int(pid)):  # type: ignore[call-overload]
                db.execute("DELETE FROM streams WHERE host = ? AND pid = ?", (self.host, pid))

    def _keep(self) -> None:
        """Renew this process's leases until it holds no stream (the next acquire starts it again)."""
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if not self._mine:
                    self._keeper = None
                    return
            self.renew()

    def renew(self) -> set[str]:
        """Extend the leases of this process's streams; the ids it still holds."""
        with self._lock:
            mine = sorted(self._mine)
        if not mine:
            return set()
        with self._write() as db:
            db.executemany("UPDATE streams SET expires = ? WHERE id = ? AND pid = ? AND host = ?",
                           [(time.time() + self.ttl, s, self.pid, self.host) for s in mine])
            held = {r[0] for r in db.execute(
                f"SELECT id FROM streams WHERE pid = ? AND host = ? AND id IN ({','.join('?' * len(mine))})",
                (self.pid, self.host, *mine))}
        with self._lock:
            self._mine &= held | (self._mine - set(mine))
        return held

    def close(self) -> None:
        """Stop renewing; the streams still held expire with their lease."""
        self._stop.set()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- the Ledger protocol --------------------------------------------------------------------------------------

    def acquire(self, stream: Stream, proxy_limit: int, datastore_limit: int | None = None) -> bool:
        now = time.time()
        datastores = list(dict.fromkeys(stream.datastores))
        with self._write() as db:
            self._purge(db, now)
            if db.execute("SELECT 1 FROM streams WHERE id = ?", (stream.id,)).fetchone():
                raise ValueError(f"stream {stream.id} is already active")
            (active,) = db.execute("SELECT COUNT(*) FROM streams WHERE proxy = ?", (stream.proxy,)).fetchone()
            if active >= proxy_limit:
                return False
            if datastore_limit is not None and datastores:
                busiest = db.execute(
                    f"SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM stream_datastores WHERE datastore IN "
                    f"({','.join('?' * len(datastores))}) GROUP BY datastore)", datastores).fetchone()[0]
                if busiest is not None and busiest >= datastore_limit:
                    return False
            db.execute("INSERT INTO streams VALUES (?, ?, ?, ?, ?, ?)",
                       (stream.id, stream.job, stream.proxy, self.host, self.pid, now + self.ttl))
            db.executemany("INSERT INTO stream_datastores VALUES (?, ?, ?)",
                           [(stream.id, ds, i) for i, ds in enumerate(datastores)])
        with self._lock:
            self._mine.add(stream.id)
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="ledger-leases", daemon=True)
                self._keeper.start()
        return True

    def _stream(self, db: sqlite3.Connection, stream_id: str) -> Stream | None:
        row = db.execute("SELECT id, job, proxy FROM streams WHERE id = ?", (stream_id,)).fetchone()
        if row is None:
            return None
        stores = tuple(r[0] for r in db.execute(
            "SELECT datastore FROM stream_datastores WHERE stream = ? ORDER BY position", (stream_id,)))
        return Stream(row[0], row[1], row[2], stores)

    def release(self, stream_id: str) -> Stream | None:
        with self._write() as db:
            stream = self._stream(db, stream_id)
            if stream is not None:
                db.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
        with self._lock:
            self._mine.discard(stream_id)
        return stream

    def narrow(self, stream_id: str, datastores: Collection[str]) -> Stream | None:
        keep = set(datastores)
        with self._write() as db:
            stream = self._stream(db, stream_id)
            if stream is None:
                return None
            gone = [ds for ds in stream.datastores if ds not in keep]
            db.executemany("DELETE FROM stream_datastores WHERE stream = ? AND datastore = ?",
                           [(stream_id, ds) for ds in gone])
            return Stream(stream.id, stream.job, stream.proxy, tuple(ds for ds in stream.datastores if ds in keep))

    def proxy_active(self, proxy: str) -> int:
        return int(self._read(f"SELECT COUNT(*) FROM streams WHERE proxy = ? AND {_LIVE}", proxy, time.time())[0][0])

    def datastore_active(self, datastore: str) -> int:
        return int(self._read(f"SELECT COUNT(*) FROM stream_datastores JOIN streams ON streams.id = stream "
                              f"WHERE datastore = ? AND {_LIVE}", datastore, time.time())[0][0])

    def job_active(self, job: str) -> int:
        return int(self._read(f"SELECT COUNT(*) FROM streams WHERE job = ? AND {_LIVE}", job, time.time())[0][0])

    def streams(self) -> Sequence[Stream]:
        rows = self._read(f"SELECT id, job, proxy FROM streams WHERE {_LIVE} ORDER BY id", time.time())
        stores: dict[str, list[str]] = {}
        for sid, ds in self._read("SELECT stream, datastore FROM stream_datastores ORDER BY stream, position"):
            stores.setdefault(str(sid), []).append(str(ds))
        return tuple(Stream(str(i), str(j), str(p), tuple(stores.get(str(i), ()))) for i, j, p in rows)
