"""The embedded engine's shared ledger: the Ledger contract, limits that hold across OS processes, a killed
holder that blocks nothing, and a locked file that fails in one line within its bound."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from vsphere_proxy.ledger import Stream
from vsphere_proxy.ledger_sqlite import LedgerUnavailable, SqliteLedger


def test_the_ledger_contract(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    a = Stream("j1/a", "j1", "p1", ("ds1", "ds2"))
    assert ledger.acquire(a, proxy_limit=2, datastore_limit=1)
    assert not ledger.acquire(Stream("j2/b", "j2", "p2", ("ds2",)), 2, datastore_limit=1), "ds2 is at its cap"
    assert ledger.acquire(Stream("j2/b", "j2", "p1", ("ds3",)), 2, datastore_limit=1)
    assert not ledger.acquire(Stream("j2/c", "j2", "p1", ()), 2), "p1 is at its limit"
    with pytest.raises(ValueError, match="already active"):
        ledger.acquire(a, 5)
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds2"), ledger.job_active("j2")) == (2, 1, 1)
    assert ledger.narrow("j1/a", ["ds1"]) == Stream("j1/a", "j1", "p1", ("ds1",))
    assert ledger.datastore_active("ds2") == 0
    assert sorted(s.id for s in ledger.streams()) == ["j1/a", "j2/b"]
    assert ledger.release("j1/a") == Stream("j1/a", "j1", "p1", ("ds1",))
    assert ledger.release("j1/a") is None, "releasing twice is a no-op"
    assert ledger.proxy_active("p1") == 1
    assert (tmp_path / "ledger.sqlite").stat().st_mode & 0o077 == 0


def _hammer(path: str, who: str, limit: int, rounds: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ledger = SqliteLedger(path)
    worst = 0
    for i in range(rounds):
        sid = f"{who}/{i}"
        if ledger.acquire(Stream(sid, who, "p1", ("ds1",)), limit):
            worst = max(worst, ledger.proxy_active("p1"))
            time.sleep(0.001)
            ledger.release(sid)
    out.put(worst)


def test_two_processes_never_hold_more_than_the_limit_together(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite")
    SqliteLedger(path)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, f"job{n}", 2, 150, out)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    worst = [out.get(timeout=5) for _ in procs]
    assert all(p.exitcode == 0 for p in procs)
    assert max(worst) <= 2 and max(worst) >= 1, worst


def _hold(path: str, ready: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    ledger = SqliteLedger(path, ttl=3600)
    assert ledger.acquire(Stream("dead/a", "dead", "p1", ("ds1",)), 2)
    assert ledger.acquire(Stream("dead/b", "dead", "p1", ("ds1",)), 2)
    ready.set()
    time.sleep(3600)


def test_a_killed_holder_blocks_no_proxy(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready))
    holder.start()
    assert ready.wait(60)
    ledger = SqliteLedger(path)
    assert not ledger.acquire(Stream("live/a", "live", "p1", ()), 2), "the holder is alive: p1 is full"
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert ledger.acquire(Stream("live/a", "live", "p1", ()), 2), "a dead holder's streams do not count"
    assert [s.job for s in ledger.streams()] == ["live"]


def test_a_locked_ledger_fails_in_one_line_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = SqliteLedger(path, busy_seconds=0.3)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        began = time.monotonic()
        with pytest.raises(LedgerUnavailable, match=f"ledger {path}: database is locked") as caught:
            ledger.acquire(Stream("j/a", "j", "p1", ()), 2)
        assert time.monotonic() - began < 5
        assert "\n" not in str(caught.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
