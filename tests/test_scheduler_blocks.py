"""Unit tests of the patent's blocks: stream limit, ledger, priority list, next proxy, datastore score, pick."""

from __future__ import annotations

import threading

import pytest

from vsphere_proxy.ledger import InMemoryLedger, Stream
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.scheduler import (
    PriorityEntry,
    StreamFormula,
    datastore_score,
    max_streams,
    next_available_proxy,
    pick_vm,
    priority_list,
    threshold_for,
)

GB = 1 << 30


def proxy(name: str, cpus: int = 4, ram_mb: int = 8192) -> Proxy:
    return Proxy(name, ProxyKind.PHYSICAL, cpus, ram_mb)


def stream(i: int | str, proxy_name: str, *datastores: str, job: str = "job-1") -> Stream:
    return Stream(f"{job}/{i}", job, proxy_name, datastores)


def test_max_streams_is_the_smaller_of_cpu_and_memory_bounds() -> None:
    assert max_streams(proxy("p", cpus=4, ram_mb=8192)) == 40  # 10 x 4 < 8192 // 100
    assert max_streams(proxy("p", cpus=8, ram_mb=2048)) == 20  # 2048 // 100 < 80
    assert max_streams(proxy("p", cpus=2, ram_mb=99)) == 0  # never used
    assert max_streams(proxy("p", cpus=4, ram_mb=8192), StreamFormula(per_cpu=2, mb_per_stream=1024)) == 8


def test_ledger_counts_and_release_is_idempotent() -> None:
    ledger = InMemoryLedger()
    assert ledger.acquire(stream(1, "p1", "ds-a", "ds-b"), proxy_limit=2)
    assert ledger.acquire(stream(2, "p1", "ds-a"), proxy_limit=2)
    assert not ledger.acquire(stream(3, "p1", "ds-c"), proxy_limit=2)
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds-a"), ledger.datastore_active("ds-c")) == (2, 2, 0)
    assert ledger.release("job-1/1") is not None
    assert ledger.release("job-1/1") is None
    assert (ledger.proxy_active("p1"), ledger.datastore_active("ds-a"), ledger.datastore_active("ds-b")) == (1, 1, 0)
    with pytest.raises(ValueError, match="already active"):
        ledger.acquire(stream(2, "p1"), proxy_limit=9)


def test_a_stream_stops_counting_on_datastores_it_is_done_with() -> None:
    ledger = InMemoryLedger()
    assert ledger.acquire(stream(1, "p1", "ds-a", "ds-b"), proxy_limit=2)
    narrowed = ledger.narrow("job-1/1", {"ds-b", "ds-c"})
    assert narrowed is not None and narrowed.datastores == ("ds-b",)  # never adds ds-c
    assert (ledger.datastore_active("ds-a"), ledger.datastore_active("ds-b"), ledger.datastore_active("ds-c")) == (
        0, 1, 0)
    assert ledger.proxy_active("p1") == 1 and ledger.narrow("job-1/9", {"ds-a"}) is None
    ledger.release("job-1/1")
    assert ledger.datastore_active("ds-b") == 0


def test_a_proxy_never_exceeds_its_limit_when_jobs_race() -> None:
    ledger, limit, peak, lock = InMemoryLedger(), 5, [0], threading.Lock()
    start = threading.Barrier(6)

    def job(j: int) -> None:
        start.wait()
        for i in range(300):
            s = stream(i, "p1", "ds", job=f"job-{j}")
            if ledger.acquire(s, limit):
                with lock:
                    peak[0] = max(peak[0], ledger.proxy_active("p1"))
                ledger.release(s.id)

    threads = [threading.Thread(target=job, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= peak[0] <= limit
    assert ledger.proxy_active("p1") == 0 and ledger.datastore_active("ds") == 0


def test_priority_list_reconstructs_the_patents_table_1() -> None:
    # US 9563514 Table 1: VMs A, B, P, Q, R with 1, 2 or 3 eligible proxies; the list starts with VM R (one
    # eligible proxy, proxy 2), then VM B; ties on eligible count go to the larger VM, then by name.
    entries = [
        PriorityEntry("A", ("proxy1", "proxy3"), 300 * GB, ("ds1",)),
        PriorityEntry("B", ("proxy1", "proxy2"), 400 * GB, ("ds2",)),
        PriorityEntry("P", ("proxy1", "proxy2", "proxy3"), 200 * GB, ("ds3",)),
        PriorityEntry("Q", ("proxy1", "proxy2", "proxy3"), 200 * GB, ("ds3",)),
        PriorityEntry("R", ("proxy2",), 100 * GB, ("ds4",)),
    ]
    assert [e.vm for e in priority_list(entries)] == ["R", "B", "A", "P", "Q"]
    assert [e.vm for e in priority_list(reversed(entries))] == ["R", "B", "A", "P", "Q"]


def test_next_available_proxy_has_the_lowest_utilization_across_jobs() -> None:
    ledger = InMemoryLedger()
    p1, p2, p3 = proxy("p1"), proxy("p2"), proxy("p3")
    limits = {"p1": 4, "p2": 10, "p3": 2}
    for i in range(2):
        ledger.acquire(stream(i, "p1", job="other-job"), 4)  # 2/4 = 50 %
    for i in range(3):
        ledger.acquire(stream(10 + i, "p2"), 10)  # 3/10 = 30 %
    assert next_available_proxy([p1, p2, p3], ledger, limits) is p3  # 0 %
    ledger.acquire(stream(20, "p3"), 2)  # 50 %
    assert next_available_proxy([p1, p2, p3], ledger, limits) is p2
    ledger.acquire(stream(21, "p3"), 2)  # full
    assert next_available_proxy([p1, p3], ledger, limits) is p1
    assert next_available_proxy([p3], ledger, limits) is None
    assert next_available_proxy([proxy("b"), proxy("a")], ledger, {"a": 3, "b": 3}).name == "a"  # tie by name
    assert next_available_proxy([proxy("z")], ledger, {"z": 0}) is None


def test_datastore_score_is_the_busiest_datastore_of_the_vm() -> None:
    ledger = InMemoryLedger()
    ledger.acquire(stream(1, "p1", "ds-a"), 9)
    ledger.acquire(stream(2, "p2", "ds-a", "ds-b"), 9)
    assert datastore_score(["ds-a", "ds-b"], ledger) == 2
    assert datastore_score(["ds-b"], ledger) == 1
    assert datastore_score(["ds-c"], ledger) == 0
    assert datastore_score([], ledger) == 0


def test_pick_prefers_idle_datastores_then_raises_the_threshold_up_to_the_cap() -> None:
    ledger = InMemoryLedger()
    plist = priority_list([
        PriorityEntry("big", ("p1",), 900 * GB, ("hot",)),
        PriorityEntry("mid", ("p1", "p2"), 500 * GB, ("hot", "cold")),
        PriorityEntry("small", ("p1", "p2"), 100 * GB, ("cold",)),
        PriorityEntry("other", ("p2",), 50 * GB, ("cold",)),
    ])
    ledger.acquire(stream("x", "p9", "hot"), 9)
    pick = pick_vm("p1", plist, ledger, threshold=1, cap=3)
    assert (pick.entry.vm, pick.threshold, pick.raises) == ("small", 1, 0)
    assert ("big", "datastore score 1 >= threshold 1") in pick.skipped
    assert ("other", "p1 not eligible") in pick.skipped
    ledger.acquire(stream("y", "p9", "cold"), 9)
    pick = pick_vm("p1", plist, ledger, threshold=1, cap=3)  # every eligible VM is busy: raise once
    assert (pick.entry.vm, pick.threshold, pick.raises) == ("big", 2, 1)
    pick = pick_vm("p1", plist, ledger, threshold=1, cap=1)  # capped: nothing
    assert pick.entry is None and pick.threshold == 1
    assert pick_vm("p3", plist, ledger, threshold=1, cap=3).entry is None  # eligible for nothing


def test_threshold_for_is_the_one_raise_rule() -> None:
    assert threshold_for(0, threshold=1, cap=4) == 1  # below the threshold in force: no raise
    assert threshold_for(1, threshold=1, cap=4) == 2  # raised just above the score
    assert threshold_for(2, threshold=1, cap=4) == 3  # by as many steps as it takes
    assert threshold_for(3, threshold=1, cap=4) == 4
    assert threshold_for(4, threshold=1, cap=4) is None  # never past the cap
    assert threshold_for(1, threshold=3, cap=3) == 3
    assert "US 9563514" in (threshold_for.__doc__ or "")


def test_pick_raises_the_threshold_as_threshold_for_says() -> None:
    ledger = InMemoryLedger()
    plist = priority_list([PriorityEntry("a", ("p1",), 10 * GB, ("ds",)), PriorityEntry("b", ("p1",), 5 * GB, ("ds",))])
    for n in range(5):
        pick = pick_vm("p1", plist, ledger, threshold=1, cap=3)
        raised = threshold_for(n, 1, 3)
        assert (pick.entry is None) == (raised is None)
        if raised is not None:
            assert pick.entry is not None
            assert (pick.entry.vm, pick.threshold, pick.raises, pick.score) == ("a", raised, raised - 1, n)
        ledger.acquire(stream(n, "p9", "ds"), 99)


def test_the_patent_blocks_exist_and_cite_it() -> None:
    import vsphere_proxy.scheduler as scheduler

    for block in ("max_streams", "eligible_proxies", "priority_list", "next_available_proxy", "datastore_score"):
        fn = getattr(scheduler, block)
        assert callable(fn) and "US 9563514" in (fn.__doc__ or ""), block


def test_the_scheduler_is_pure() -> None:
    import ast
    from pathlib import Path

    import vsphere_proxy.scheduler as scheduler

    tree = ast.parse(Path(scheduler.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    forbidden = {"adapters", "pyVmomi", "sqlalchemy", "celery", "socket", "time", "threading", "random"}
    assert not {m for m in imported if m.split(".")[0] in forbidden}
