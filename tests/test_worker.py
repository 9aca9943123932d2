"""A proxy worker's own duties on a real Redis, with VM attempts on local flat files: streams whose lease is gone
are dropped, a heartbeat marks the proxy alive and renews only the leases of its open attempts, and an attempt
no coordinator feeds any more is ended (cleaned up, recorded, reported) after `idle_seconds`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_engine import LocalFilesSession, setup

from testbed.redis_server import RedisServer
from vsphere_proxy.coordinator import Assignment, WorkVM
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.worker import ProxyWorker, assignment_from_json, assignment_to_json, events_key, heartbeat_key
from vsphere_proxy.ledger import Stream
from vsphere_proxy.ledger_redis import RedisLedger
from vsphere_proxy.repository import Repository
from vsphere_proxy.tiers import Tier

MIB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer.start() as s:
        yield s


class Bed:
    def __init__(self, tmp_path: Path, server: RedisServer) -> None:
        self.vms, _ = setup(tmp_path, {"db-01": [(2 * MIB, "ds1"), (2 * MIB, "ds1")], "hangs": [(2 * MIB, "ds1")]})
        self.hang = threading.Event()
        self.repo = Repository.init(tmp_path / "repo")
        self.client = server.client()
        self.ledger = RedisLedger(self.client, prefix=f"t{time.monotonic_ns()}:", ttl=1.0)
        self.sessions: list[LocalFilesSession] = []
        self.recorded: list[tuple[str, AttemptEnd]] = []
        self.root = tmp_path
        vms = {v.name: v for v in self.vms}

        class Preparer:
            def prepare(_, a: Assignment) -> LocalFilesSession:
                s = LocalFilesSession(self.root, self.repo, a, vms[a.vm], set(), self.hang)
                self.sessions.append(s)
                return s

        self.worker = ProxyWorker("p1", 2, lambda job: Preparer(), self.ledger, self.client,
                                  record=lambda job, end: self.recorded.append((job, end)), lease=1.0,
                                  heartbeat=0.1, idle_seconds=0.5)

    def assignment(self, vm: WorkVM, disk: int, stream: str, opens: bool) -> Assignment:
        return Assignment("job-1", vm.name, "p1", "san", Tier.SAN, 1, 1, stream, disk, len(vm.disks), opens, False,
                          None, None, "test")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.client.lrange(events_key("job-1"), 0, -1)]


@pytest.fixture
def bed(tmp_path: Path, server: RedisServer) -> Iterator[Bed]:
    b = Bed(tmp_path, server)
    b.client.delete(events_key("job-1"))
    yield b
    b.worker.stop()


def test_assignments_travel_as_json_unchanged(bed: Bed) -> None:
    a = bed.assignment(bed.vms[0], 1, "job-1/db-01/1/0", True)
    assert assignment_from_json(json.loads(json.dumps(assignment_to_json(a)))) == a


def test_a_stream_whose_lease_is_gone_is_dropped_before_any_snapshot(bed: Bed) -> None:
    a = bed.assignment(bed.vms[0], 0, "job-1/db-01/1/0", True)
    event = bed.worker.handle({"assignment": assignment_to_json(a), "job": {"id": "job-1"}, "sent": time.time()})
    assert not event["result"]["disk_done"] and "lease gone" in event["result"]["error"]
    assert bed.sessions == [] and bed.recorded == []
    assert bed.events() == [event]


def test_an_attempt_no_coordinator_feeds_is_ended_cleaned_up_and_its_lease_left_to_expire(bed: Bed) -> None:
    vm = bed.vms[0]
    a = bed.assignment(vm, 0, "job-1/db-01/1/0", True)
    assert bed.ledger.acquire(Stream(a.stream, "job-1", "p1", ("ds1",)), 2)
    event = bed.worker.handle({"assignment": assignment_to_json(a), "job": {"id": "job-1"}, "sent": time.time()})
    assert event["result"]["disk_done"] and event["result"]["end"] is None  # disk 1 still to read
    bed.worker.start()
    assert bed.client.pttl(heartbeat_key("p1")) > 0
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:  # the heartbeat keeps the idle attempt's lease alive meanwhile
        assert bed.ledger.holds(a.stream)
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while not bed.recorded:
        assert time.monotonic() < deadline, "the idle attempt was never ended"
        time.sleep(0.05)
    [(job, end)] = bed.recorded
    assert job == "job-1" and not end.ok and "its coordinator is gone" in end.error
    assert bed.sessions[0].finished is False  # cleaned up: the point aborted (a snapshot would be removed)
    assert [e["kind"] for e in bed.events()] == ["progress", "stream", "end"]  # progress: its first block
    deadline = time.monotonic() + 3
    while bed.ledger.holds(a.stream):  # no longer renewed: it expires
        assert time.monotonic() < deadline, "the lease outlived its attempt"
        time.sleep(0.05)
    bed.worker.stop()
    assert not bed.client.exists(heartbeat_key("p1"))


def test_a_stream_given_up_by_its_coordinator_is_aborted_and_commits_nothing(bed: Bed) -> None:
    vm = next(v for v in bed.vms if v.name == "hangs")  # its reads wait for bed.hang (at most 5 s)
    a = bed.assignment(vm, 0, "job-1/hangs/1/0", True)
    assert bed.ledger.acquire(Stream(a.stream, "job-1", "p1", ("ds1",)), 2)
    bed.worker.start()
    runs = threading.Thread(target=bed.worker.handle, args=({"assignment": assignment_to_json(a)},))
    runs.start()
    deadline = time.monotonic() + 5
    while a.stream not in bed.worker.runner.inflight():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    bed.ledger.release(a.stream)  # the coordinator took the VM back (it thought the proxy was down)
    deadline = time.monotonic() + 3
    while not bed.recorded:
        assert time.monotonic() < deadline, "the attempt went on after its lease was given up"
        time.sleep(0.02)
    bed.hang.set()
    runs.join(10)
    [(_, end)] = bed.recorded
    assert not end.ok and end.point_id is None and "given up by its coordinator" in end.error
    assert bed.sessions[0].finished is False and bed.repo.points() == []
