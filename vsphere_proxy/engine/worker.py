"""A proxy worker of the distributed engine: it runs the streams coordinators send to its queue, with the same
`StreamRunner` as the embedded engine, and tells each job's coordinator what happened.

Per stream (one Celery task): drop it when its lease is gone from the ledger (its coordinator gave it up or
died), else read the disk. When the stream ends its attempt (snapshot removed, restore point committed or not),
the attempt goes to the catalog here, so that a coordinator that dies loses nothing. Every stream's result, and
its progress (bytes read so far, once a second), is pushed as JSON to its job's event list in Redis, which the
coordinator reads.

A heartbeat thread, every `heartbeat` seconds: marks the proxy alive (a key that expires after `lease`), renews
the leases of the streams of its open attempts, fails attempts whose streams stalled or whose lease is gone (their
coordinator took the VM back: the proxy looked down to it), and ends attempts no coordinator handed a disk for
`idle` seconds (their coordinator is gone: the snapshot must not stay). A restore point is committed only while
the stream that ends the attempt still holds its lease, so a VM taken back is never backed up twice.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.events import AttemptEnd, StreamResult
from vsphere_proxy.engine.session import Preparer, VmSession
from vsphere_proxy.engine.streams import StreamRunner
from vsphere_proxy.tiers import Tier

log = logging.getLogger(__name__)

KEYS = "vsphere-proxy:"
EVENTS_TTL = 86_400  # a job's event list outlives a dead coordinator by a day, for `--resume`


def events_key(job: str) -> str:
    return f"{KEYS}events:{job}"


def heartbeat_key(proxy: str) -> str:
    return f"{KEYS}heartbeat:{proxy}"


def queue_name(proxy: str) -> str:
    return f"proxy.{proxy}"


def assignment_to_json(a: Assignment) -> dict[str, Any]:
    return {"job": a.job, "vm": a.vm, "proxy": a.proxy, "mode": a.mode, "tier": int(a.tier), "round": a.round,
            "attempt": a.attempt, "stream": a.stream, "disk": a.disk, "disk_count": a.disk_count, "opens": a.opens,
            "extra": a.extra, "datastore_score": a.datastore_score, "threshold": a.threshold, "reason": a.reason}


def assignment_from_json(d: Mapping[str, Any]) -> Assignment:
    return Assignment(d["job"], d["vm"], d["proxy"], d["mode"], Tier(d["tier"]), int(d["round"]), int(d["attempt"]),
                      d["stream"], int(d["disk"]), int(d["disk_count"]), bool(d["opens"]), bool(d["extra"]),
                      d.get("datastore_score"), d.get("threshold"), d.get("reason", ""))


class LeaseLedger(Protocol):
    """What a worker needs of the ledger (`RedisLedger`)."""

    def holds(self, stream_id: str) -> bool: ...

    def renew_streams(self, stream_ids: list[str]) -> set[str]: ...


class EventBus(Protocol):
    """What a worker needs of Redis besides the ledger (a `redis.Redis`)."""

    def rpush(self, name: str, *values: str) -> Any: ...

    def expire(self, name: str, time: int) -> Any: ...

    def set(self, name: str, value: str, px: int | None = None) -> Any: ...

    def delete(self, *names: str) -> Any: ...


class _ByJob:
    """One `Preparer` per job, made on the job's first stream from the job's context in the task."""

    def __init__(self, factory: Callable[[Mapping[str, Any]], Preparer], keep: int = 8) -> None:
        self.factory = factory
        self.keep = keep
        self.contexts: dict[str, Mapping[str, Any]] = {}
        self.preparers: dict[str, Preparer] = {}
        self.lock = threading.Lock()

    def prepare(self, assignment: Assignment) -> VmSession:
        with self.lock:
            preparer = self.preparers.get(assignment.job)
            if preparer is None:
                preparer = self.factory(self.contexts.get(assignment.job, {"id": assignment.job}))
                self.preparers[assignment.job] = preparer
                while len(self.preparers) > self.keep:  # oldest job first
                    self.preparers.pop(next(iter(self.preparers)))
        return preparer.prepare(assignment)


class ProxyWorker:
    """The streams of one proxy, whatever job they belong to."""

    def __init__(self, proxy: str, limit: int, preparers: Callable[[Mapping[str, Any]], Preparer],
                 ledger: LeaseLedger, bus: EventBus, *, record: Callable[[str, AttemptEnd], None] | None = None,
                 lease: float = 30.0, heartbeat: float = 10.0, stall_seconds: float = 300.0,
                 idle_seconds: float = 120.0, stream_bytes_per_s: float | None = None,
                 progress_every: float = 1.0) -> None:
        self.proxy = proxy
        self.limit = limit
        self.ledger = ledger
        self.bus = bus
        self.record = record
        self.lease = lease
        self.heartbeat = heartbeat
        self.stall_seconds = stall_seconds
        self.idle_seconds = idle_seconds
        self._jobs = _ByJob(preparers)
        self.progress_every = progress_every
        self._reported: dict[str, float] = {}  # stream -> when its progress was last published
        self.runner = StreamRunner(self._jobs, ready_timeout=stall_seconds, on_progress=self._progress,
                                   throttle={proxy: stream_bytes_per_s} if stream_bytes_per_s else None,
                                   confirm=ledger.holds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.identity = {"proxy": proxy, "pid": os.getpid(), "host": platform.node(), "limit": limit}

    # ---- one stream (a Celery task) -------------------------------------------------------------------------

    def handle(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        started = time.time()
        a = assignment_from_json(payload["assignment"])
        with self._jobs.lock:
            self._jobs.contexts[a.job] = payload.get("job") or {"id": a.job}
        if a.proxy != self.proxy:
            result = StreamResult(a.vm, a.attempt, a.disk, a.stream, False, None,
                                  f"stream for proxy {a.proxy} reached the worker of {self.proxy}")
        elif not self.ledger.holds(a.stream):
            result = StreamResult(a.vm, a.attempt, a.disk, a.stream, False, None,
                                  f"{a.stream}: lease gone before the stream started (its coordinator gave it up)")
        else:
            result = self.runner.run(a)
        self._reported.pop(a.stream, None)
        if result.end is not None:
            self._ended(a.job, result.end)
        event = {"kind": "stream", "proxy": self.proxy, "assignment": payload["assignment"],
                 "result": result.to_json(), "sent": payload.get("sent"),
                 "started": started, "finished": time.time()}
        self._publish(a.job, event)
        return event

    def _progress(self, a: Assignment, position: int) -> None:
        """At most one progress event per stream every `progress_every` seconds."""
        now = time.monotonic()
        if now - self._reported.get(a.stream, 0.0) < self.progress_every:
            return
        self._reported[a.stream] = now
        self._publish(a.job, {"kind": "progress", "proxy": self.proxy, "vm": a.vm, "attempt": a.attempt,
                              "disk": a.disk, "position": position})

    def _ended(self, job: str, end: AttemptEnd) -> None:
        if self.record is None:
            return
        try:
            self.record(job, end)
        except Exception:  # the coordinator still learns of it; `--resume` then reads it again
            log.exception("recording %s attempt %d of job %s in the catalog failed", end.vm, end.attempt, job)

    def _publish(self, job: str, event: Mapping[str, Any]) -> None:
        key = events_key(job)
        self.bus.rpush(key, json.dumps(event, separators=(",", ":")))
        self.bus.expire(key, EVENTS_TTL)

    # ---- the heartbeat ------------------------------------------------------------------------------------

    def beat(self) -> None:
        """Once: alive mark, lease renewal, stalled and idle attempts ended."""
        self.bus.set(heartbeat_key(self.proxy), json.dumps(self.identity), px=int(self.lease * 1000))
        inflight = self.runner.inflight()
        renewed = self.ledger.renew_streams(sorted(self.runner.open_streams()))
        given_up = {key: s for s, key in inflight.items() if s not in renewed}
        ends = [(*key, f"{s} was given up by its coordinator (lease gone)") for key, s in given_up.items()]
        ends += [(at.job, at.vm, at.attempt, why) for at, why in self.runner.stalled(self.stall_seconds)]
        ends += [(at.job, at.vm, at.attempt, f"no disk handed to it for {self.idle_seconds:g} s: its coordinator "
                  "is gone") for at in self.runner.idle(self.idle_seconds)]
        for job, vm, attempt, why in ends:
            # in a thread of its own: its streams get a lease's length to leave (a disk being attached is
            # detached) before the end is reported, while the heartbeat goes on renewing the other streams
            threading.Thread(target=self._end, args=(job, vm, attempt, why), name=f"end-{vm}", daemon=True).start()

    def _end(self, job: str, vm: str, attempt: int, why: str) -> None:
        try:
            end = self.runner.end((job, vm, attempt), why, wait=self.lease)
            if end is not None:
                log.warning("%s attempt %d of job %s ended: %s", vm, attempt, job, why)
                self._ended(job, end)
                self._publish(job, {"kind": "end", "proxy": self.proxy, "end": end.to_json()})
        except Exception:
            log.exception("ending %s attempt %d of job %s failed", vm, attempt, job)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.beat()
                except Exception:  # Redis away for a moment: try again at the next beat
                    log.exception("heartbeat of %s failed", self.proxy)
                self._stop.wait(self.heartbeat)

        self._thread = threading.Thread(target=loop, name=f"heartbeat-{self.proxy}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.heartbeat + 5)
        try:
            self.bus.delete(heartbeat_key(self.proxy))
        except Exception:
            log.warning("could not clear the heartbeat of %s", self.proxy)
