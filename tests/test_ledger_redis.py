"""The ledger on a real redis-server: the same guarantees as the in-memory one across clients, plus leases that
expire unless the proxy's heartbeat renews them."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest

from testbed.redis_server import RedisServer
from vsphere_proxy.ledger import Stream
from vsphere_proxy.ledger_redis import RedisLedger


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer.start() as s:
        yield s


@pytest.fixture
def ledger(server: RedisServer) -> RedisLedger:
    return RedisLedger(server.client(), prefix=f"t{secrets.token_hex(4)}:", ttl=30)


def test_counts_limits_and_idempotent_release(ledger: RedisLedger) -> None:
    a = Stream("j1/a/0", "j1", "p1", ("ds1", "ds2"))
    assert ledger.acquire(a, proxy_limit=1)
    assert not ledger.acquire(Stream("j1/b/0", "j1", "p1", ("ds3",)), proxy_limit=1)
    assert ledger.acquire(Stream("j2/c/0", "j2", "p2", ("ds1",)), proxy_limit=5, datastore_limit=2)
    assert not ledger.acquire(Stream("j2/d/0", "j2", "p2", ("ds1",)), proxy_limit=5, datastore_limit=2)
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds1"), ledger.job_active("j2")) == (1, 2, 1)
    with pytest.raises(ValueError, match="already active"):
        ledger.acquire(a, proxy_limit=9)
    assert ledger.release(a.id) == a and ledger.release(a.id) is None
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds1"), ledger.datastore_active("ds2")) == (0, 1, 0)
    assert [s.id for s in ledger.streams()] == ["j2/c/0"]


def test_narrow_stops_counting_the_datastores_a_stream_left(ledger: RedisLedger) -> None:
    ledger.acquire(Stream("s", "j", "p", ("ds1", "ds2")), proxy_limit=1)
    assert ledger.narrow("s", {"ds2", "ds9"}) == Stream("s", "j", "p", ("ds2",))
    assert (ledger.datastore_active("ds1"), ledger.datastore_active("ds2")) == (0, 1)
    assert ledger.narrow("missing", {"ds1"}) is None
    assert ledger.release("s") == Stream("s", "j", "p", ("ds2",)) and ledger.datastore_active("ds2") == 0


def test_racing_clients_never_exceed_a_proxys_limit(server: RedisServer) -> None:
    prefix, limit = f"race{secrets.token_hex(4)}:", 4
    ledgers = [RedisLedger(server.client(), prefix=prefix) for _ in range(6)]
    peak, lock, stop = [0], threading.Lock(), time.monotonic() + 1.5

    def worker(n: int, ledger: RedisLedger) -> None:
        i = 0
        while time.monotonic() < stop:
            sid = f"w{n}/{i}"
            i += 1
            if ledger.acquire(Stream(sid, f"job{n % 2}", "p", ("ds",)), proxy_limit=limit):
                active = ledger.proxy_active("p")
                with lock:
                    peak[0] = max(peak[0], active)
                ledger.release(sid)

    threads = [threading.Thread(target=worker, args=(n, ledger)) for n, ledger in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= peak[0] <= limit
    assert ledgers[0].proxy_active("p") == 0 and ledgers[0].streams() == ()


def test_a_lease_not_renewed_expires_and_gives_its_stream_back(server: RedisServer) -> None:
    ledger = RedisLedger(server.client(), prefix=f"lease{secrets.token_hex(4)}:", ttl=0.4)
    ledger.acquire(Stream("dead/0", "j", "dead", ("ds",)), proxy_limit=1)
    ledger.acquire(Stream("alive/0", "j", "alive", ("ds",)), proxy_limit=1)
    for _ in range(4):
        time.sleep(0.2)
        assert ledger.renew_streams(["alive/0"]) == {"alive/0"}
    assert ledger.proxy_active("dead") == 0 and ledger.datastore_active("ds") == 1
    assert [s.id for s in ledger.streams()] == ["alive/0"]
    assert ledger.acquire(Stream("dead/1", "j", "dead", ("ds",)), proxy_limit=1)


def test_renewing_chosen_streams_keeps_only_them_and_expiry_counts_as_a_release(server: RedisServer) -> None:
    ledger = RedisLedger(server.client(), prefix=f"t{time.monotonic_ns()}:", ttl=1.0)
    for n in range(3):
        assert ledger.acquire(Stream(f"s{n}", "job", "p1", ("ds1",)), 5)
    before = ledger.releases()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert ledger.renew_streams(["s0", "gone"]) == {"s0"}  # a stream no longer held is not brought back
        time.sleep(0.1)
    assert ledger.holds("s0") and not ledger.holds("s1") and not ledger.holds("s2")
    assert ledger.releases() == before + 2
    ledger.release("s0")
    assert ledger.releases() == before + 3 and ledger.proxy_active("p1") == 0
